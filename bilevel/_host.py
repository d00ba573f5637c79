"""Reading tensors on the host: whether the code may (not under ``vmap``), a whole vmapped batch at once, and how
often a masked loop reads its early stop.

Two of these questions have no public torch API: whether ``vmap`` is active, and the plain tensor under a vmapped
one. This module is the engine's only user of the private ``torch._C._functorch`` calls that answer them (present
in torch 2.13, tested); they are looked up once, and where they are missing each answer falls back to one that
keeps every result the same:

- ``_under_vmap``: from ``torch._C._are_functorch_transforms_active`` (which ``torch.autograd.Function`` itself
  relies on), true under any ``torch.func`` transform: there loops run their masked budget and the raise / warn
  policies are left to the caller outside the transform. Without that call too it is ``False`` (a host read
  under ``vmap`` then fails loudly in torch, never silently).
- ``_unwrapped``: ``None``. ``_all_true`` is then ``False`` under a transform, so a masked loop runs its whole
  budget (the same result, only without the early stop).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_functorch = getattr(torch._C, "_functorch", None)
_CAN_UNWRAP = all(hasattr(_functorch, name) for name in ("is_functorch_wrapped_tensor", "get_unwrapped"))
_CAN_READ_STACK = hasattr(_functorch, "get_interpreter_stack") and hasattr(getattr(_functorch, "TransformType", None),
                                                                           "Vmap")
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)

_CHECK_EVERY_ACCELERATOR = 8  # iterations between host reads off the CPU: a read waits for the device's queue


def _under_vmap() -> bool:
    """Whether a ``vmap`` is active: there a Python ``if`` on a tensor is an error, so only a masked update can stop
    an iterate. Without the private interpreter stack: whether any ``torch.func`` transform is active."""
    if _CAN_READ_STACK:
        vmap = _functorch.TransformType.Vmap
        return any(i.key() == vmap for i in (_functorch.get_interpreter_stack() or ()))
    return _transforms_active is not None and bool(_transforms_active())


def _under_transform() -> bool:
    """Whether any ``torch.func`` transform is active (``True`` when this torch cannot tell: the caller then takes
    the path that is right under a transform)."""
    return _transforms_active is None or bool(_transforms_active())


def _unwrapped(x: Tensor) -> Optional[Tensor]:
    """The plain tensor under any functorch wrappers (under ``vmap``: every batch entry at once), or ``None`` if this
    torch lacks the private API that reads it."""
    if not _CAN_UNWRAP:
        return None
    while _functorch.is_functorch_wrapped_tensor(x):
        x = _functorch.get_unwrapped(x)
    return x


def _all_true(mask: Tensor) -> bool:
    """``bool(mask.all())``, also under ``vmap``, where it is true once every batch entry is, so a masked loop can
    stop as soon as the whole batch is done (one host sync per call). ``False`` under ``vmap`` if the batch cannot
    be read (see ``_unwrapped``): the caller then runs its full budget."""
    plain = _unwrapped(mask)
    if plain is None:
        if _under_vmap():
            return False
        plain = mask
    return bool(plain.all())


def _check_now(k: int, check_every: int) -> bool:
    """Whether iteration ``k`` reads the early stop on the host: every ``check_every`` iterations, never if 0."""
    return check_every > 0 and k % check_every == 0


def _cadence(check_every: Optional[int], device: torch.device) -> int:
    """``check_every``, or its default for ``device``: 1 on the CPU, 8 elsewhere."""
    if check_every is not None:
        return check_every
    return 1 if device.type == "cpu" else _CHECK_EVERY_ACCELERATOR


def _check_every_ok(value) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
