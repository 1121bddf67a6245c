"""Argument checks shared by the fused ops.

Each check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right
kind, wrong value) with the argument's name, before any kernel sees the input.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("none", "sum", "mean")


def check_float_tensor(name: str, value: object) -> None:
    """``value`` must be a real floating-point tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {value.dtype}")


def check_same_shape(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name}, {tuple(ref.shape)}, got {tuple(value.shape)}"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors (``None`` skipped) must live on one device."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")


def check_broadcasts_to(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``value`` must broadcast to ``ref``'s shape (without making it larger)."""
    try:
        shape = torch.broadcast_shapes(value.shape, ref.shape)
    except RuntimeError:
        shape = None
    if shape != ref.shape:
        raise ValueError(
            f"{name} must broadcast to the shape of {ref_name}, {tuple(ref.shape)}, got {tuple(value.shape)}"
        )


def check_int_in_range(name: str, value: object, low: int, high: int) -> None:
    """``value`` must be an ``int`` (not a bool) in ``[low, high]``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")


def check_positive_number(name: str, value: object) -> None:
    """``value`` must be ``None`` or a finite positive real number."""
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive number or None, got {type(value).__name__}")
    if not (0 < value < float("inf")):
        raise ValueError(f"{name} must be a positive finite number or None, got {value}")


def check_clamp_range(name: str, value: object) -> None:
    """``value`` must be ``None`` or a pair ``(lo, hi)`` of finite real numbers with ``lo < hi``."""
    if value is None:
        return
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair (lo, hi) of numbers or None, got {value!r}")
    for bound in value:
        if not isinstance(bound, (int, float)) or isinstance(bound, bool):
            raise TypeError(f"{name} must be a pair (lo, hi) of numbers or None, got {value!r}")
    lo, hi = value
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must be a pair (lo, hi) of finite numbers with lo < hi, got {value!r}")


def check_choice(name: str, value: object, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_generator(generator: object, device: torch.device) -> None:
    """An explicit generator must be a ``torch.Generator`` for the tensors' device type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator is for {generator.device.type} but the tensors are on {device}")


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32, or float64 when an input is float64 (as the kernels do)."""
    acc = torch.float32
    for dtype in dtypes:
        acc = torch.promote_types(acc, dtype)
    return acc


def check_flag(name: str, value: object) -> None:
    """``value`` must be a ``bool``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")


def reduce_per_sample(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` to a tensor of per-sample values.

    ``"none"`` returns it as is, ``"sum"`` its sum, ``"mean"`` its mean over
    samples. The reduction touches one value per sample, never the elements.
    """
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    return per_sample


def reduced_with_per_sample(
    loss: torch.Tensor, per_sample: torch.Tensor, reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, per-sample values)`` for a loss op's ``return_per_sample=True``: the values ``loss`` was reduced
    from, detached (``loss`` itself, detached, for ``reduction="none"``): values to log, never differentiated."""
    return loss, (loss if reduction == "none" else per_sample).detach()
