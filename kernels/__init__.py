"""fastvae's Triton kernels, one module per fused op (installed as ``fastvae.kernels``).

Importing this package needs Triton 3.6 or newer (the kernels are compiled and
interpreted with it in CI); :mod:`fastvae` imports it only when a kernel is
launched.
"""

import re

import triton

MIN_TRITON = (3, 6)


def _release(version: str) -> tuple[int, ...]:
    """``(major, minor)`` of a version string such as ``"3.6.0"`` or ``"3.7.0+git1234"``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


if _release(triton.__version__) < MIN_TRITON:
    raise ImportError(
        f"fastvae's Triton kernels need triton >= {'.'.join(map(str, MIN_TRITON))}, but triton "
        f"{triton.__version__} is installed: pip install 'triton>={'.'.join(map(str, MIN_TRITON))}' "
        "(or use backend='torch')"
    )
