"""``Clipper``: FastClip on any model (torchvision, timm, hand-written), left a plain ``nn.Module``.

One traced forward at the model's input shape (:func:`fastclip.analysis.discovery.trace_layers`)
finds every convolution (1d/2d/3d, transposed, any stride, padding mode, dilation or
groups), every linear layer (on vectors or on token sequences ``(..., D)``, measured on
``D``: a token-wise map has its weight's norm) and every conv whose output goes straight
into a batch norm, wherever the two sit, each at the input size it really sees. The
Clipper holds a :class:`fastclip.SpectralNorm` wrapper around each of them (a Conv+BN
composition's wrapper around an ``nn.Sequential(conv, bn)`` that references the model's
own modules) *outside* the model: the model keeps its modules, its forward, its
``state_dict`` keys and its weight storage, with no hook and nothing in its inference
path, so its checkpoints load into the original architecture.

``clipper.step()`` after each optimiser step is one training step of every wrapper,
their per-step PowerQR iterations in a few grouped ops (:class:`fastclip.batched.BatchedTracker`
over the explicit list of wrappers), and their clips on schedule (in lockstep on a GPU).
Batch norm (``bn``): ``"compose"`` clips each Conv+BN composition through BN's gamma
(this project's default, as the ``fastclip`` method's wBN mode); ``"clamp"`` clamps every
BN's gamma every ``bn_count`` steps (Gouk et al., the clipBN mode) and clips no
composition; ``"free"`` leaves BN alone and only tracks the compositions.

What it cannot bound is listed in :attr:`Clipper.skipped` (name -> reason) and counted in
one log line. Under ``torch.distributed`` every rank computes the same clip from the same
weights: the start vectors come from a seeded generator, and the running statistics of
the batch norms it reads are broadcast from rank 0 before each step (what DDP's
``broadcast_buffers`` does at the next forward anyway).

Example (``loader``, ``opt``: the user's)::

    model = torchvision.models.resnet18(num_classes=10)
    clipper = fastclip.Clipper(model, (3, 32, 32), clip=1.0)
    for x, y in loader:
        opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
        clipper.step()
    clipper.clip_now()
    clipper.sigmas()["layer1.0.conv1+layer1.0.bn1"]  # <= 1.01
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from fastclip.analysis.discovery import LayerTrace, base_type, trace_layers
from fastclip.batched import BatchedTracker
from fastclip.linalg.batchnorm import clamp_bn_
from fastclip.linalg.operator import BN_TYPES, CONV_TYPES, full_precision, plain_layer_type
from fastclip.spectral import power_qr
from fastclip.wrapper import SpectralNorm
from fastclip.wrapping.config import SpectralNormConfig

__all__ = ["BN_MODES", "Clipper"]

log = logging.getLogger(__name__)

#: What ``bn=`` accepts.
BN_MODES = ("compose", "clamp", "free")

#: The ``fastclip`` method's defaults that differ by batch-norm mode (wBN, clipBN, and
#: noBN for a model without batch norm); "free" takes clipBN's.
_MODE_DEFAULTS = {
    "compose": {"clip_steps": 50, "clip_opt_iter": 5},
    "clamp": {"clip_steps": 100, "clip_opt_iter": 5},
    "free": {"clip_steps": 100, "clip_opt_iter": 5},
    "none": {"clip_steps": 100, "clip_opt_iter": 1},
}
#: The ``fastclip`` method's own settings and defaults beyond SpectralNormConfig's fields
#: (whose defaults it shares, except ``init_delay`` 0 and the fixed step 0.35).
_METHOD_DEFAULTS: dict[str, Any] = {
    "init_delay": 0,
    "clip_opt_stepsize": 0.35,
    "composition_stepsize": 0.01,
    "composition_params": "bn",
    "bn_count": 50,
    "seed": 0,
}
_CONFIG_OPTIONS = tuple(n for n in SpectralNormConfig.field_names() if n not in ("clip", "clip_params"))
OPTIONS = tuple(sorted({*_CONFIG_OPTIONS, *_METHOD_DEFAULTS}))

#: The end of the reason of a module skipped for parameters of its own (a class token, a
#: layer scale): the layers inside it are still clipped.
_OWN_PARAMETERS = " outside any conv, linear or batch norm"
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.instancenorm._InstanceNorm)


def _inner_model(model: Any) -> nn.Module:
    """The model inside DDP / DataParallel / ``torch.compile`` wrappers (their names are not
    the model's)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _check_clip(clip: Any) -> float:
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not 0 < float(clip) <= 1e6:
        raise ValueError(f"clip must be a number in (0, 1e6], got {clip!r}")
    return float(clip)


def _settings(options: dict[str, Any], mode: str) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(
            f"Clipper: unknown option(s) {', '.join(unknown)}; expected one of {', '.join(OPTIONS)}"
        )
    base = SpectralNormConfig()
    s = {
        **{n: getattr(base, n) for n in _CONFIG_OPTIONS},
        **_METHOD_DEFAULTS,
        **_MODE_DEFAULTS[mode],
        **options,
    }
    if s["composition_params"] not in ("bn", "all"):
        raise ValueError(f"composition_params must be 'bn' or 'all', got {s['composition_params']!r}")
    for name in ("bn_count", "seed"):
        v = s[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < (1 if name == "bn_count" else 0):
            raise ValueError(f"{name} must be an integer >= {1 if name == 'bn_count' else 0}, got {v!r}")
    return s


def _own_parameters(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters(recurse=False)]


class Clipper:
    """Bound every conv, linear and Conv+BN composition of ``model`` (see the module
    docstring).

    Args:
        model: any ``nn.Module`` (also inside DDP or ``torch.compile``; the Clipper reads
            the modules inside them, named as in the bare model).
        input_shape: one sample's input shape, no batch dimension, e.g. ``(3, 32, 32)``.
        clip: the bound ``c`` of every clipped operator, in (0, 1e6].
        bn: ``"compose"``, ``"clamp"`` or ``"free"`` (module docstring).
        writer: a SummaryWriter-like object (``add_scalar``): ``train/lsv_<name>`` every
            ``summary_steps`` steps.
        **options: the ``fastclip`` method's settings (:data:`OPTIONS`): every
            :class:`fastclip.wrapping.config.SpectralNormConfig` field but ``clip`` and
            ``clip_params`` (``clip_steps`` 50 for "compose", 100 otherwise; ``init_delay``
            0; ``clip_opt_iter`` 5, 1 for a model without batch norm; ...), and
            ``composition_stepsize`` (0.01), ``composition_params`` ("bn": a
            composition's clip changes gamma only; "all"), ``bn_count`` (50, "clamp"),
            ``seed`` (0: the start vectors' generator).

    Attributes:
        skipped: name -> one-line reason, for every module with parameters it does not bound
            (with ``bn="free"`` batch norm is left alone by choice and not listed).
        layers: the names it tracks, compositions as ``"<conv>+<bn>"``.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        clip: float = 1.0,
        bn: str = "compose",
        writer: Any = None,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Clipper takes an nn.Module, got {type(model).__name__}")
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {', '.join(map(repr, BN_MODES))}, got {bn!r}")
        self.clip = _check_clip(clip)
        try:
            shape = tuple(int(d) for d in input_shape)
        except (TypeError, ValueError):
            shape = ()
        if not shape or any(d <= 0 for d in shape):
            raise ValueError(
                f"input_shape must be positive sizes without the batch dimension, got {input_shape!r}"
            )
        self.model = _inner_model(model)
        self.input_shape = shape
        self.bn = bn
        has_bn = any(isinstance(m, BN_TYPES) for m in self.model.modules())
        self.settings = _settings(options, bn if has_bn else "none")
        self.writer = writer
        self.skipped: dict[str, str] = {}
        trace = trace_layers(self.model, shape)
        layers, comps, self._bns = self._discover(trace)
        if not layers:
            raise ValueError(
                f"{type(self.model).__name__} has no conv or linear layer Clipper can bound at input_shape "
                f"{shape} ({len(self.skipped)} modules skipped: {', '.join(map(repr, list(self.skipped)[:3]))})"
            )
        # (typed Any: the wrappers' buffers, set at the start, are Tensor | None to a type checker)
        self._wrappers: list[Any] = [self._wrap(n, m, False) for n, m, _ in layers]
        self._wrappers += [self._wrap(f"{c}+{b}", nn.Sequential(cm, bm), True) for c, b, cm, bm, _ in comps]
        self._shapes = [s for *_, s in layers] + [s for *_, s in comps]
        self._step = 0
        self._device = self._model_device()
        self._start_vectors()
        # the model's weight storage is left alone (share_weights=False): the groups stack
        # the weights at each pass, so compiled graphs and checkpoints see the model as it was
        self.tracker = BatchedTracker(self.model, wrappers=self._wrappers, share_weights=False)
        msg = (
            f"Clipper: {len(layers)} conv/linear layers and {len(comps)} Conv+BN compositions "
            f"({'clipped' if bn == 'compose' else 'tracked'}) bounded to {self.clip:g} (bn={bn!r}); "
            f"{len(self.skipped)} modules skipped"
        )
        if self.skipped:
            log.warning("%s: %s (see clipper.skipped)", msg, ", ".join(map(repr, list(self.skipped)[:4])))
        else:
            log.info(msg)

    # -- discovery -----------------------------------------------------------------
    def _discover(self, trace: LayerTrace) -> tuple[list[Any], list[Any], list[Any]]:
        """(name, layer, input shape) of the layers to clip, (conv, bn, conv module, bn
        module, input shape) of the compositions, the BNs to clamp or read; fills
        :attr:`skipped`."""
        layers: list[Any] = []
        comps: list[Any] = []
        bns: list[Any] = []
        ok: set[str] = set()
        dead: list[str] = []  # skipped prefixes: what lies inside them is theirs
        for name, m in self.model.named_modules():
            if any(name.startswith(d + ".") or not d for d in dead):
                continue
            reason = self._layer_reason(name, m, trace)
            if reason is None:
                shape = trace.shapes[name]
                layers.append((name, m, shape[-1:] if base_type(m) is nn.Linear else shape))
                ok.add(name)
            elif reason:
                self.skipped[name] = reason
                if not reason.endswith(_OWN_PARAMETERS):  # a container's own parameter: its layers go on
                    dead.append(name)
        pairs = {b: c for c, b in trace.pairs.items() if c in ok}
        for name, m in self.model.named_modules():
            if not isinstance(m, BN_TYPES) or any(name.startswith(d + ".") or not d for d in dead):
                continue
            usable = m.running_var is not None and m.weight is not None and name in trace.calls
            if self.bn == "clamp":
                if usable:
                    bns.append(m)
                else:
                    self.skipped[name] = "batch norm without running statistics or gamma: no clamp applies"
            elif name in pairs and m.running_var is not None:
                conv = pairs[name]
                comps.append((conv, name, trace.modules[conv], m, trace.shapes[conv]))
                bns.append(m)
            elif self.bn == "compose":
                self.skipped[name] = (
                    "batch norm not fed by one conv's output alone: no Conv+BN composition to clip "
                    "(bn='clamp' bounds it)"
                )
        return layers, comps, bns

    @staticmethod
    def _layer_reason(name: str, m: nn.Module, trace: LayerTrace) -> str | None:
        """None for a conv or linear layer to clip, a reason for a module with parameters
        it cannot bound, "" for anything else (containers, activations, batch norm)."""
        t = base_type(m)
        if issubclass(t, (*CONV_TYPES, nn.Linear)):
            if parametrize.is_parametrized(m):
                return "parametrized layer (torch.nn.utils.parametrize): its weight is computed"
            if plain_layer_type(m) is None:
                return f"{type(m).__name__} has its own forward: not a plain conv or linear map"
            if name not in trace.calls:
                return "not called in the forward pass at this input shape"
            sizes = sorted(
                set(trace.calls[name] if t is not nn.Linear else [c[-1:] for c in trace.calls[name]])
            )
            if len(sizes) > 1:
                return f"used at {len(sizes)} input sizes {', '.join(map(str, sizes))}: one bound per size"
            return None
        if isinstance(m, BN_TYPES):
            return ""
        if isinstance(m, nn.MultiheadAttention):
            return "attention: not a linear map of its input"
        if isinstance(m, _NORM_TYPES):
            return f"{type(m).__name__}: normalises by the input's own statistics, not a linear map"
        own = _own_parameters(m)
        if own:
            return f"{type(m).__name__} has parameters ({', '.join(own)}){_OWN_PARAMETERS}"
        return ""

    def _wrap(self, name: str, module: nn.Module, composition: bool) -> SpectralNorm:
        s = self.settings
        cfg = SpectralNormConfig(
            clip=self.clip,
            **{n: s[n] for n in _CONFIG_OPTIONS if n != "clip_opt_stepsize"},
            clip_opt_stepsize=s["composition_stepsize"] if composition else s["clip_opt_stepsize"],
            clip_params="auto" if s["composition_params"] == "bn" else "all",
        )
        flag = not composition or self.bn == "compose"
        return SpectralNorm(
            module, flag, summary=self.writer is not None, writer=self.writer, identifier=name, config=cfg
        )

    # -- state on the device ---------------------------------------------------------
    def _model_device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _follow_device(self) -> None:
        """Move the wrappers' own buffers (never the model) to where the model now is."""
        dev = self._model_device()
        if dev == self._device:
            return
        for w in self._wrappers:
            for key in ("sigma", "step", "vectors", "input_shape"):
                if w._buffers.get(key) is not None:
                    w._buffers[key] = w._buffers[key].to(dev)
            w._op = None
        self._device = dev

    @torch.no_grad()
    def _start_vectors(self) -> None:
        """Every wrapper's vectors from ``init_pqr_iter`` PowerQR iterations on a seeded
        random start (the same on every rank)."""
        gen = torch.Generator().manual_seed(int(self.settings["seed"]))
        for w, shape in zip(self._wrappers, self._shapes):
            for key in ("sigma", "step"):
                w._buffers[key] = w._buffers[key].to(self._device)
            with full_precision(self._device):
                op = w._operator(tuple(shape))
                w.input_shape = torch.tensor(shape, dtype=torch.long, device=self._device)
                w._shape = tuple(shape)
                X = torch.randn((w.k, *shape), generator=gen, dtype=torch.float64).to(op.device, op.dtype)
                r = power_qr(op, X=X, n_iter=w.init_pqr_iter)
            w.vectors = r.right.clone()
            w.sigma.copy_(r.values[0])

    def _sync(self) -> None:
        """Rank 0's running statistics of the batch norms the Clipper reads, on every rank
        (each rank's forward updated its own from its own batch; the mean cancels in the
        linear part, but not to the last bit in a clip's fits)."""
        if not (self._bns and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        stats = [t for b in self._bns for t in (b.running_mean, b.running_var) if t is not None]
        flat = torch.cat([t.reshape(-1) for t in stats])
        dist.broadcast(flat, src=0)
        torch._foreach_copy_(
            stats, [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in stats]), stats)]
        )

    def _check_finite(self, wrappers: list[Any]) -> None:
        """One clear error, naming the layer, instead of a clip of NaN or inf weights."""
        named = []
        for w in wrappers:
            mods = list(w.module) if w.kind == "composition" else [w.module]
            for layer, mod in zip(w.identifier.split("+"), mods):
                for n, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
                    if t is not None and t.is_floating_point():
                        named.append((layer, n, t))
        if not named:
            return
        flags = torch.stack([torch.isfinite(t).all() for _, _, t in named]).tolist()
        for (layer, n, _), fine in zip(named, flags):
            if not fine:
                raise FloatingPointError(
                    f"Clipper: {layer}.{n} has non-finite values at step {self._step}; "
                    "expected finite weights before a clip (did the training step diverge?)"
                )

    def _clippers(self) -> list[SpectralNorm]:
        return [w for w in self._wrappers if w.clip_flag]

    # -- public ------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return [w.identifier for w in self._wrappers]

    def wrappers(self) -> Iterator[tuple[str, SpectralNorm]]:
        """(name, wrapper) of every tracked operator (outside the model)."""
        return ((w.identifier, w) for w in self._wrappers)

    @torch.no_grad()
    def step(self) -> None:
        """One training step, after the optimiser's: every operator's tracking in grouped
        ops, its clip when due (every ``clip_steps`` steps from ``init_delay``), the
        batch-norm clamp every ``bn_count`` steps with ``bn="clamp"``, the log."""
        self._follow_device()
        self._sync()
        due = [w for w in self._wrappers if w.schedule.clip_due()]
        if due:
            self._check_finite(due)
        with full_precision(self._device):
            if not self.tracker.step():  # nothing to group (e.g. Conv1d only): one by one, in order
                for w in self._wrappers:
                    w.track_(w.shape)
            if self.bn == "clamp" and self._step % self.settings["bn_count"] == 0:
                for b in self._bns:
                    clamp_bn_(b, self.clip)
        self._step += 1

    @torch.no_grad()
    def clip_now(self) -> None:
        """Clip every operator now, whatever the schedule (before an evaluation or a
        checkpoint): layers first, then the compositions; clamp BN with ``bn="clamp"``."""
        self._follow_device()
        self._sync()
        clippers = self._clippers()
        self._check_finite(clippers)
        with full_precision(self._device):
            for w in clippers:  # (the compositions come last in the list)
                w.clip_()
            if self.bn == "clamp":
                for b in self._bns:
                    clamp_bn_(b, self.clip)

    def sigmas(self) -> dict[str, float]:
        """Tracked sigma_1 of every operator by name (compositions ``"<conv>+<bn>"``),
        read back in one transfer."""
        values = torch.stack([w.sigma.detach().double() for w in self._wrappers]).tolist()
        return dict(zip(self.layers, values))

    def state_dict(self) -> dict[str, Any]:
        """The Clipper's own state (not the model's): the step, and per operator its
        vectors, sigma, step and input shape."""
        return {
            "step": self._step,
            "layers": {
                w.identifier: {
                    "vectors": w.vectors.detach().clone(),
                    "sigma": w.sigma.detach().clone(),
                    "step": w.step.detach().clone(),
                    "input_shape": w.input_shape.clone(),
                }
                for w in self._wrappers
            },
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (the same trajectory on; bit-identical on the CPU).
        The operators must be the same: a mismatch is one ``ValueError`` naming them."""
        if not isinstance(state, dict) or "layers" not in state or "step" not in state:
            raise ValueError("expected a Clipper state_dict with 'step' and 'layers'")
        layers = state["layers"]
        missing = [n for n in self.layers if n not in layers]
        extra = [n for n in layers if n not in self.layers]
        if missing or extra:
            raise ValueError(
                f"Clipper state does not match this model: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        self._follow_device()
        for w in self._wrappers:
            s = layers[w.identifier]
            if tuple(s["vectors"].shape) != tuple(w.vectors.shape):
                raise ValueError(
                    f"Clipper state for {w.identifier}: vectors of shape {tuple(s['vectors'].shape)}, "
                    f"expected {tuple(w.vectors.shape)}"
                )
            w.vectors.copy_(s["vectors"])
            w.sigma.copy_(s["sigma"])
            w.set_step(int(s["step"]))
        self._step = int(state["step"])

    def __repr__(self) -> str:
        return (
            f"Clipper({type(self.model).__name__}, input_shape={self.input_shape}, clip={self.clip:g}, "
            f"bn={self.bn!r}, layers={len(self._wrappers)}, skipped={len(self.skipped)})"
        )
