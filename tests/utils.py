"""Helpers shared by the tests: shapes per device, tolerances per dtype, compiling kernels for a GPU."""
import json
import os
import subprocess
import sys

import torch

# float32 ~ 1e-5 relative; half precisions round their outputs to ~3 significant digits.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **kw):
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: ``actual``'s)."""
    tol = dict(TOLERANCES[dtype or actual.dtype])
    tol.update(kw)
    torch.testing.assert_close(actual, expected, equal_nan=True, check_dtype=True, **tol)


def pick(device: torch.device, cpu, cuda):
    """A size for ``device``: small under the CPU interpreter, large enough to matter on a GPU."""
    return cpu if device.type == "cpu" else cuda


# Runs outside the interpreter (which cannot compile): Triton's front end, LLVM and the ptxas its wheel ships.
_COMPILE_FOR_CUDA = """
import json, sys
from importlib import import_module
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

target = GPUTarget("cuda", 90, 32)
for module, kernel, signature, constexprs, num_warps in json.loads(sys.argv[1]):
    source = ASTSource(getattr(import_module(module), kernel), signature, constexprs)
    triton.compile(source, target=target, options={"num_warps": num_warps})
"""


def compile_for_cuda(jobs: list[tuple[str, str, dict, dict, int]]) -> None:
    """Compile kernels to sm_90 cubins without a GPU, to catch what only the compiler rejects.

    Each job is ``(module, kernel name, signature, constexprs, num_warps)``, the
    signature mapping each non-constexpr argument to a Triton type (``"*bf16"``,
    ``"i64"``, ``"fp32"``). The interpreter runs code the compiler refuses
    (returns of different types, for one), so CPU-only CI needs this too.
    """
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_CUDA, json.dumps(jobs)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
