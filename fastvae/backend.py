"""Choosing between the fused Triton kernels and the plain PyTorch reference path.

Every fused op takes ``backend=None | "auto" | "triton" | "torch"``:

* ``None`` / ``"auto"``: the Triton kernels for CUDA tensors when Triton imports,
  the reference path otherwise. The environment variable ``FASTVAE_BACKEND``
  replaces this default (it takes the same names).
* ``"triton"``: always the kernels. CPU tensors run them in Triton's interpreter,
  which must be switched on (``TRITON_INTERPRET=1``) before fastvae first
  launches a kernel; without it this is an error, not a silent fallback.
* ``"torch"``: always the reference path (plain PyTorch ops, autograd).
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKEND_ENV_VAR = "FASTVAE_BACKEND"
BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Looked up once, without importing Triton: `import fastvae` stays fast and
# torch.compile reads a constant instead of tracing an import.
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def kernels_interpreted() -> bool:
    """Whether fastvae's kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a kernel is defined, so the answer is taken
    from one of fastvae's own kernels rather than from the environment now.
    """
    if not TRITON_AVAILABLE:
        return False
    from fastvae.kernels.launch import is_interpreted

    return is_interpreted()


def requested_backend(backend: str | None) -> str:
    """The backend name asked for: the argument, else ``FASTVAE_BACKEND``, else ``"auto"``."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(BACKEND_ENV_VAR) or "auto"
        source = f"the environment variable {BACKEND_ENV_VAR}"
    if not isinstance(backend, str) or backend not in BACKENDS:
        choices = ", ".join(map(repr, BACKENDS)) + (" or None" if source == "backend" else " (or unset it)")
        raise ValueError(f"{source} must be one of {choices}, got {backend!r}")
    return backend


def resolve_backend(backend: str | None, device: torch.device, dtypes: dict[str, torch.dtype]) -> str:
    """Pick ``"triton"`` or ``"torch"`` for tensors on ``device``.

    ``dtypes`` maps argument names to their dtypes: the kernels compute in
    float32 and take float16, bfloat16 or float32, so ``"auto"`` sends other
    dtypes (float64) to the reference path and ``"triton"`` refuses them.
    """
    name = requested_backend(backend)
    kernel_dtypes = all(dtype in KERNEL_DTYPES for dtype in dtypes.values())
    if name == "torch":
        return "torch"
    if name == "auto":
        use_triton = device.type == "cuda" and kernel_dtypes and TRITON_AVAILABLE
        return "triton" if use_triton else "torch"
    if not TRITON_AVAILABLE:
        raise RuntimeError("backend='triton' needs the triton package, which does not import here; use backend='torch'")
    for arg, dtype in dtypes.items():
        if dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"backend='triton' takes float16, bfloat16 or float32 tensors, but {arg} is {dtype}; "
                "use backend='torch' for it"
            )
    if device.type == "cpu" and not kernels_interpreted():
        raise ValueError(
            "backend='triton' got CPU tensors: the kernels need CUDA tensors, or Triton's interpreter "
            "(set TRITON_INTERPRET=1 before fastvae first launches a kernel); use backend='torch' on the CPU"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' runs on CUDA tensors (or the CPU interpreter), got a {device.type} tensor")
    return "triton"
