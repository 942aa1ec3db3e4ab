"""Import advertorch on current PyTorch without touching site-packages.

advertorch 0.2.3 (its last release) does ``from torch.autograd.gradcheck import
zero_gradients`` in ``advertorch/attacks/fast_adaptive_boundary.py``. PyTorch 1.9
removed that helper, so ``import advertorch.attacks`` fails with ``ImportError:
cannot import name 'zero_gradients'``. It is advertorch's only reference to a removed
name: putting the (four-line) function back on the ``torch.autograd.gradcheck`` module
object before advertorch is imported is enough, and LinfPGDAttack /
CarliniWagnerL2Attack then run unchanged.

The module object must come from :func:`importlib.import_module`:
``import torch.autograd.gradcheck as m`` binds the *function* ``gradcheck`` that
``torch.autograd`` re-exports under the same name, not the submodule.

Example::

    from fastclip.pipeline._advertorch_compat import import_advertorch_attacks
    attacks = import_advertorch_attacks()
    pgd = attacks.LinfPGDAttack(model, eps=0.02, nb_iter=50, eps_iter=0.002)
"""

from __future__ import annotations

import collections.abc
import importlib
import types

import torch

__all__ = ["zero_gradients", "patch_torch_for_advertorch", "import_advertorch_attacks"]


def zero_gradients(x: torch.Tensor | collections.abc.Iterable) -> None:
    """Zero the ``.grad`` of a tensor or of every tensor in a nested iterable, in place.

    The function as PyTorch < 1.9 defined it in ``torch.autograd.gradcheck``.
    """
    if isinstance(x, torch.Tensor):
        if x.grad is not None:
            x.grad.detach_()
            x.grad.zero_()
    elif isinstance(x, collections.abc.Iterable):
        for elem in x:
            zero_gradients(elem)


def patch_torch_for_advertorch() -> None:
    """Restore ``torch.autograd.gradcheck.zero_gradients`` if this PyTorch lacks it.

    Idempotent; a PyTorch that still has the function is left alone.
    """
    gradcheck_module = importlib.import_module("torch.autograd.gradcheck")
    if not hasattr(gradcheck_module, "zero_gradients"):
        gradcheck_module.zero_gradients = zero_gradients


def import_advertorch_attacks() -> types.ModuleType:
    """``advertorch.attacks``, imported after :func:`patch_torch_for_advertorch`."""
    patch_torch_for_advertorch()
    return importlib.import_module("advertorch.attacks")
