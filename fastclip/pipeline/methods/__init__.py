"""Clipping methods as plug-ins of one training loop, and their command-line flags.

Every method is a :class:`~fastclip.pipeline.methods.base.Method` with a per-method config
dataclass holding each published hyper-parameter and its default:

=========  ==========================================================================
orig       no clipping
fastclip   FastClip (ours): the :class:`fastclip.wrapper.SpectralNorm` wrapper on every
           conv and linear layer (and in wBN on each Conv+BN composition)
gouk       Gouk et al. 2021: power iteration on the true operator after every step,
           ``W <- W / max(1, sigma_1 / c)``
miyato     Miyato et al. 2018: ``torch.nn.utils.parametrizations.spectral_norm``
           (bounds the reshaped kernel matrix, not the convolution)
nsedghi    Senderovich et al. 2022 / Sedghi et al. 2019: per-frequency SVD clamp of
           the circular convolution every 100 steps
lip4conv   Delattre et al. 2023: Gram-iteration bound as a loss penalty
=========  ==========================================================================

Example::

    >>> import fastclip.pipeline.methods as methods
    >>> m = methods.get("gouk", clip=1.0, mode="wBN", n_iter=5)
    >>> model = m.prepare(model, (3, 32, 32))

Command-line flags (:func:`add_method_arguments` / :func:`method_overrides`): every
method-specific field ``f`` of method ``M`` becomes ``--M-f`` with underscores as
dashes (``--fastclip-clip-steps 100``, ``--gouk-n-iter 5``, ``--lip4conv-weight 0.1``);
the fields every method shares, except ``clip`` (the training script's own ``--clip``),
are plain flags (``--bn-count``). All default to "not given", so the dataclass
default (or, for fastclip, the per-mode default) applies unless a flag is passed.
Passing a flag of a method other than the one being run is an error, not silently
ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from fastclip.pipeline.limits import int_at_least, real_in
from fastclip.pipeline.methods.base import MODES, Method, MethodConfig, check_mode, field_range
from fastclip.pipeline.methods.fastclip import FastClip, FastClipConfig
from fastclip.pipeline.methods.gouk import Gouk, GoukConfig
from fastclip.pipeline.methods.lip4conv import Lip4Conv, Lip4ConvConfig
from fastclip.pipeline.methods.miyato import Miyato, MiyatoConfig
from fastclip.pipeline.methods.nsedghi import NSedghi, NSedghiConfig
from fastclip.pipeline.methods.orig import Orig, OrigConfig

__all__ = [
    "METHODS",
    "MODES",
    "Method",
    "MethodConfig",
    "available",
    "get",
    "get_class",
    "check_mode",
    "add_method_arguments",
    "method_overrides",
    "flag_name",
    "Orig",
    "FastClip",
    "Gouk",
    "Miyato",
    "NSedghi",
    "Lip4Conv",
    "OrigConfig",
    "FastClipConfig",
    "GoukConfig",
    "MiyatoConfig",
    "NSedghiConfig",
    "Lip4ConvConfig",
]

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Orig, FastClip, Gouk, Miyato, NSedghi, Lip4Conv)
}

#: Shared config fields that the training script exposes under its own name.
_SCRIPT_FLAGS = ("clip",)


def available() -> list[str]:
    """Names of the registered methods, in the paper's order.

    Example::

        >>> available()
        ['orig', 'fastclip', 'gouk', 'miyato', 'nsedghi', 'lip4conv']
    """
    return list(METHODS)


def get_class(name: str) -> type[Method]:
    """The Method class registered as ``name`` (``ValueError`` naming the choices otherwise)."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def get(name: str, clip: float = 1.0, mode: str = "wBN", **overrides: Any) -> Method:
    """A fresh method instance with target norm ``clip`` (c) for batch-norm ``mode``.

    ``overrides`` set fields of the method's config dataclass (``get_class(name).Config``);
    unknown names raise ``ValueError`` listing the valid ones.

    Example::

        >>> m = get("fastclip", clip=1.0, mode="noBN")
        >>> m.config.clip_steps, m.config.clip_opt_iter        # the authors' noBN defaults
        (100, 1)
    """
    cls = get_class(name)
    check_mode(mode)
    return cls(mode=mode, clip=clip, **overrides)


# -- command-line flags --------------------------------------------------------------------
_SHARED = {f.name for f in dataclasses.fields(MethodConfig)}


def flag_name(method: str, field: str) -> str:
    """The command-line flag of ``field`` of ``method``'s config: ``--<method>-<field>``
    for method-specific fields, ``--<field>`` for the shared ones (dashes for underscores).

    Example::

        >>> flag_name("fastclip", "clip_steps"), flag_name("gouk", "bn_count")
        ('--fastclip-clip-steps', '--bn-count')
    """
    if field in _SHARED:
        return "--" + field.replace("_", "-")
    return f"--{method}-{field.replace('_', '-')}"


def _dest(method: str, field: str) -> str:
    return field if field in _SHARED else f"{method}_{field}"


def _scalar_type(tp: Any) -> Any:
    """int/float/str/bool out of an annotation such as ``int | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        if len(args) != 1:
            raise TypeError(f"cannot make a flag for a field of type {tp}")
        tp = args[0]
    if tp not in (int, float, str, bool):
        raise TypeError(f"cannot make a flag for a field of type {tp}")
    return tp


def _default_text(f: dataclasses.Field) -> str:
    per_mode = f.metadata.get("per_mode")
    if per_mode:
        return "default by mode: " + ", ".join(f"{m} {v}" for m, v in per_mode.items())
    return f"default {f.default}"


def add_method_arguments(
    parser: argparse.ArgumentParser, methods: list[str] | None = None
) -> argparse.ArgumentParser:
    """Add one flag per hyper-parameter of the given methods (default: all) to ``parser``,
    in one argument group per method, generated from the config dataclasses and their
    ``metadata["help"]``. Flags default to ``None`` (= use the method's default);
    read them back with :func:`method_overrides`. ``clip`` is left to the caller.

    Example::

        >>> p = add_method_arguments(argparse.ArgumentParser())
        >>> args = p.parse_args(["--gouk-n-iter", "10"])
        >>> method_overrides(args, "gouk")
        {'n_iter': 10}
    """
    names = available() if methods is None else [get_class(m).name for m in methods]
    hints_base = typing.get_type_hints(MethodConfig)
    shared = parser.add_argument_group("hyper-parameters shared by the clipping methods")
    for f in dataclasses.fields(MethodConfig):
        if f.name in _SCRIPT_FLAGS:
            continue
        _add_flag(
            shared,
            flag_name("", f.name),
            f.name,
            _scalar_type(hints_base[f.name]),
            f"{f.metadata.get('help', f.name)} (default {f.default})",
            f=f,
        )
    for name in names:
        cls = METHODS[name]
        hints = typing.get_type_hints(cls.Config)
        fields = [f for f in dataclasses.fields(cls.Config) if f.name not in _SHARED]
        if not fields:
            continue
        group = parser.add_argument_group(f"{name} hyper-parameters (used with --method {name})")
        for f in fields:
            _add_flag(
                group,
                flag_name(name, f.name),
                _dest(name, f.name),
                _scalar_type(hints[f.name]),
                f"{f.metadata.get('help', f.name)} ({_default_text(f)})",
                f.metadata.get("choices"),
                f=f,
            )
    return parser


def _add_flag(
    group: Any, flag: str, dest: str, tp: type, help_text: str, choices: Any = None, f: Any = None
) -> None:
    if tp in (int, float) and f is not None:
        # The field's valid range (the same check Method's constructor makes), so a bad
        # value is refused by the parser, before any run starts.
        low, high, open_low = field_range(f, tp)
        checked = (
            int_at_least(int(low), maximum=int(high)) if tp is int else real_in(low, high, open_min=open_low)
        )
        group.add_argument(
            flag, dest=dest, type=checked, default=None, metavar=tp.__name__.upper(), help=help_text
        )
    elif tp is bool:
        group.add_argument(
            flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
        )
    elif choices:
        group.add_argument(flag, dest=dest, type=tp, choices=choices, default=None, help=help_text)
    else:
        group.add_argument(
            flag, dest=dest, type=tp, default=None, metavar=tp.__name__.upper(), help=help_text
        )


def method_overrides(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The config overrides for method ``name`` that were given on the command line
    (flags added by :func:`add_method_arguments`), as ``{field: value}`` for
    :func:`get`. Raises ``ValueError`` if a flag of another method was given, so a
    misspelt run (``--method gouk --fastclip-clip-steps 10``) fails loudly.

    Example::

        >>> m = get(args.method, clip=args.clip, mode=args.mode, **method_overrides(args, args.method))
    """
    cls = get_class(name)
    given = {}
    for f in dataclasses.fields(cls.Config):
        if f.name in _SCRIPT_FLAGS:
            continue
        value = getattr(args, _dest(name, f.name), None)
        if value is not None:
            given[f.name] = value
    for other, other_cls in METHODS.items():
        if other == name:
            continue
        for f in dataclasses.fields(other_cls.Config):
            if f.name in _SHARED:
                continue
            if getattr(args, _dest(other, f.name), None) is not None:
                raise ValueError(
                    f"{flag_name(other, f.name)} is a hyper-parameter of method {other!r}, "
                    f"but the method is {name!r}"
                )
    return given
