"""Helpers shared by the tests: shapes per device and tolerances per dtype."""
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
