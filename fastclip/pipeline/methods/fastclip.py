"""``fastclip``: the :class:`fastclip.wrapper.SpectralNorm` wrapper on every layer.

``prepare`` wraps every conv and linear layer so that, in training mode, each forward
pass refines the layer's top singular vector by one warm-started PowerQR iteration and
every ``clip_steps`` steps (after ``init_delay``) clips sigma_1 to c. The wrappers share
one :class:`fastclip.wrapping.config.SpectralNormConfig` built from this method's
hyper-parameters (:meth:`FastClip.wrapper_config`).
The clipping happens inside the forward pass; ``after_step`` has nothing to do except
the clipBN clamp of the base class.

Batch-norm modes (as the seed notebook's CNNBN, for every
:class:`fastclip.pipeline.models.layers.ConvBN`):

* ``wBN``: the pair's conv is clipped, its BN tracked only (``clip_flag=False``), and
  the pair itself wrapped so the Conv+BN *composition* is clipped too. BN's own norm
  may grow while the composition stays bounded: the paper's recommended use. The
  composition's clip changes BN's gamma only (``composition_params="bn"``, this
  project's default): the published update also shrinks the conv, which BN's running
  variance undoes within ~1/momentum steps, so at every clip the conv shrinks further
  while BN's scale grows to compensate (``composition_params="all"`` gives the
  published update; docs/design.md has the comparison).
  Each step the pair's and its conv's PowerQR iterations share one batched pass of the
  conv (:func:`fastclip.spectral.power_qr_many`).
* ``noBN``: the model has no BN; convs and linears are clipped.
* ``clipBN``: convs and linears clipped, BN tracked only here and clamped by the base
  class every ``bn_count`` steps (Gouk et al.).

Defaults that differ by mode (the authors' settings): ``clip_steps`` 50 (wBN) / 100
(noBN, clipBN); ``clip_opt_iter`` 5 (wBN, clipBN) / 1 (noBN). ``init_delay`` defaults to
0, as in the authors' ResNet18 and DLA (their wrapper's default of 500 was used only by
the SimpleConv notebook): pass ``init_delay=500`` to reproduce that one.
``exact`` (the authors' default: also raise a conv's sigma_1 to c when it is below
c - 0.05) is **off** here: in wBN the composition is clipped first (mostly by shrinking
the conv), and then raising that conv back to c undoes the composition's clip.
``exact=True`` (``--fastclip-exact``) restores the published variant. ``line_search``
(exact line search instead of the published fixed step of 0.35, which can diverge) is
this project's default; ``line_search=False`` gives the published update.

At the end of every epoch (:meth:`FastClip.finish_epoch`) every wrapper clips once more,
so the model that is evaluated and checkpointed is bounded, not up to ``clip_steps - 1``
optimiser steps past its last clip.

Each wrapper's identifier is the layer's qualified name in the unwrapped model
(``layer1.0.conv1.conv``, ``layer1.0.conv1`` for the composition), so TensorBoard
shows ``train/lsv_<name>`` when a writer is passed to ``prepare``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fastclip.batched import attach
from fastclip.linalg.batchnorm import bn_singular_values
from fastclip.linalg.operator import BN_TYPES, unwrap
from fastclip.pipeline.methods.base import Method, MethodConfig, named_layers
from fastclip.pipeline.models.layers import ConvBN
from fastclip.wrapper import SpectralNorm, SpectralNormConfig, clip_all_

__all__ = ["FastClip", "FastClipConfig", "original_named_modules"]


@dataclass
class FastClipConfig(MethodConfig):
    clip_steps: int | None = field(
        default=None,
        metadata={"help": "clip every N training steps", "per_mode": {"wBN": 50, "noBN": 100, "clipBN": 100}},
    )
    clip_opt_iter: int | None = field(
        default=None,
        metadata={
            "help": "least-squares iterations per clip",
            "per_mode": {"wBN": 5, "noBN": 1, "clipBN": 5},
        },
    )
    init_delay: int = field(
        default=0,
        metadata={
            "help": "first clip after this many steps (authors: 0 for ResNet18/DLA, 500 in the SimpleConv notebook)"
        },
    )
    k: int = field(default=1, metadata={"help": "singular vectors tracked per layer"})
    pqr_iter: int = field(default=1, metadata={"help": "warm-started PowerQR iterations per training step"})
    init_pqr_iter: int = field(default=100, metadata={"help": "PowerQR iterations from the random start"})
    track_steps: int = field(
        default=1,
        metadata={
            "help": "refine the tracked vectors every N steps (1: every step, published; 0: only at clip and "
            "summary steps)"
        },
    )
    clip_opt_stepsize: float = field(
        default=0.35,
        metadata={"help": "step of the fixed-step update of a conv or linear (only without line search)"},
    )
    composition_stepsize: float = field(
        default=0.01,
        metadata={
            "help": "step of the fixed-step update of a Conv+BN composition (only without line search)"
        },
    )
    deflate_iter: int = field(
        default=1, metadata={"help": "clip rounds per clip step, re-estimating in between"}
    )
    exact: bool = field(
        default=False,
        metadata={
            "help": "also raise a conv's sigma_1 to c when it is below c - 0.05 (the authors' default; off "
            "here because in wBN it undoes the Conv+BN composition's clip)"
        },
    )
    line_search: bool = field(
        default=True,
        metadata={"help": "exact line search / CGLS for the clip update (off: the published fixed step)"},
    )
    refine_iter: int = field(
        default=15, metadata={"help": "cap on layer passes of the converged estimate made at each clip step"}
    )
    refine_tol: float = field(default=1e-3, metadata={"help": "relative residual tolerance of that estimate"})
    clip_block: int = field(
        default=4,
        metadata={
            "help": "Lanczos block size of the clip-time estimate (every direction found above c is fitted)"
        },
    )
    max_clip_rounds: int = field(
        default=10,
        metadata={"help": "keep fitting while sigma_1 > 1.01 c, up to this many rounds per clip step"},
    )
    composition: bool = field(
        default=True,
        metadata={"help": "wBN: also clip each Conv+BN composition (the paper's recommended use)"},
    )
    summary_steps: int = field(default=50, metadata={"help": "TensorBoard lsv scalar every N steps"})
    clip_margin: float = field(
        default=0.02,
        metadata={
            "help": "directions above c are fitted to c (1 - margin); fewer clip rounds (published: 0)"
        },
    )
    rescale_above: float = field(
        default=2.0,
        metadata={
            "help": "a layer found above this many times c at a clip step is first scaled to c, then fitted "
            "(0: never, the published clip)"
        },
    )
    composition_params: str = field(
        default="bn",
        metadata={
            "help": "what a Conv+BN composition's clip changes: bn (gamma only; BN's running variance "
            "undoes a shrunk conv) or all (conv and BN weights, published)",
            "choices": ("bn", "all"),
        },
    )


def original_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` with the names the modules had before wrapping: a wrapper and
    the layer inside it (``<name>.module``) both get ``<name>``."""

    def walk(mod: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in mod.named_children():
            if getattr(mod, "_fastclip_wrapper", False) and child_name == "module":
                name = prefix
            else:
                name = f"{prefix}.{child_name}" if prefix else child_name
            yield name, child
            yield from walk(child, name)

    yield "", model
    yield from walk(model, "")


class FastClip(Method):
    """Clip every conv and linear layer (and, in wBN, every Conv+BN composition) with
    the SpectralNorm wrapper.

    Example::

        >>> m = FastClip(mode="wBN", clip=1.0)
        >>> model = m.prepare(get_model("ResNet18"), (3, 32, 32), writer=writer)
        >>> m.layer_norms(model)["layer1.0.conv1"]   # tracked sigma_1 of a Conv+BN pair
    """

    name = "fastclip"
    Config = FastClipConfig

    def __init__(self, mode: str = "wBN", **overrides: Any) -> None:
        super().__init__(mode=mode, **overrides)
        for f in dataclasses.fields(self.config):
            per_mode = f.metadata.get("per_mode")
            if per_mode and getattr(self.config, f.name) is None:
                setattr(self.config, f.name, per_mode[self.mode])
        self.wrapper_config()  # validates the settings the wrappers will get

    def wrapper_config(self, composition: bool = False) -> SpectralNormConfig:
        """The wrappers' :class:`SpectralNormConfig` from this method's hyper-parameters:
        the fields of the same name, the composition's own step size, and
        ``composition_params`` as the wrapper's ``clip_params``."""
        c = self.config
        shared = {n: getattr(c, n) for n in SpectralNormConfig.field_names() if hasattr(c, n)}
        shared["clip_opt_stepsize"] = c.composition_stepsize if composition else c.clip_opt_stepsize
        shared["clip_params"] = "auto" if c.composition_params == "bn" else "all"
        return SpectralNormConfig(**shared)

    @property
    def writes_layer_norms(self) -> bool:
        """The wrappers write ``train/lsv_<layer>`` themselves when they have a writer."""
        return self.writer is not None

    def _wrap(
        self, module: nn.Module, identifier: str, clip_flag: bool = True, composition: bool = False
    ) -> SpectralNorm:
        return SpectralNorm(
            module,
            clip_flag=clip_flag,
            summary=self.writer is not None,
            writer=self.writer,
            identifier=identifier,
            config=self.wrapper_config(composition),
        )

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...], writer: Any = None) -> nn.Module:
        model = super().prepare(model, input_shape, writer=writer)
        if any(getattr(m, "_fastclip_wrapper", False) for m in model.modules()):
            raise ValueError("the model already contains SpectralNorm wrappers; prepare a model only once")
        modules = dict(model.named_modules())
        layers = {n for n, _ in named_layers(model)}
        bns = {n for n, _ in named_layers(model, BN_TYPES)}
        pairs = {n for n, m in modules.items() if isinstance(m, ConvBN) and isinstance(m.bn, BN_TYPES)}
        # (name, wrapper) decided first, replaced afterwards: parents are looked up by name
        # in the unwrapped model.
        plan: list[tuple[str, SpectralNorm]] = []
        for n in sorted(layers):
            plan.append((n, self._wrap(modules[n], n)))
        if self.mode != "noBN":
            for n in sorted(bns):
                plan.append((n, self._wrap(modules[n], n, clip_flag=False)))
        if self.mode == "wBN" and self.config.composition:
            for n in sorted(pairs):
                if n not in self.input_shapes:
                    raise ValueError(
                        f"Conv+BN pair {n!r} was not used in the forward pass at input shape "
                        f"{tuple(input_shape)}"
                    )
                plan.append((n, self._wrap(modules[n], n, composition=True)))
        parents = {n: modules[n.rpartition(".")[0]] for n, _ in plan if n}
        for n, wrapper in plan:
            if not n:
                model = wrapper
                continue
            setattr(parents[n], n.rpartition(".")[2], wrapper)
        attach(model)  # every wrapper's per-step work in batched ops (fastclip.batched)
        return model

    def finish_epoch(self, model: nn.Module) -> None:
        """Clip every clipping wrapper now (:func:`fastclip.wrapper.clip_all_`:
        compositions first, wrappers before their ``init_delay`` skipped), then the
        clipBN clamp."""
        clip_all_(model)
        super().finish_epoch(model)

    def layer_norms(self, model: nn.Module) -> dict[str, float]:
        """sigma_1 tracked by each wrapper (conv, linear, Conv+BN composition; a BN by its
        closed form, current even right after a clipBN clamp), keyed by the layer's name
        in the unwrapped model; 0.0 for a layer that has not seen a training batch yet."""
        norms = {}
        for _, m in original_named_modules(model):
            if isinstance(m, SpectralNorm):
                inner = unwrap(m.module)
                if m.kind == "bn":
                    norms[m.identifier] = float(bn_singular_values(inner, k=1)[0])
                else:
                    norms[m.identifier] = float(m.sigma)
        for name, m in original_named_modules(model):
            if isinstance(m, BN_TYPES) and name not in norms:
                norms[name] = float(bn_singular_values(m, k=1)[0])
        return norms
