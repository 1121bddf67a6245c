"""Is drawing Philox noise inside a kernel free? ``tl.randn`` against ``tl.randn4x``.

``tl.randn`` runs a whole 10-round Philox block per normal and keeps one of
its four outputs; ``tl.randn4x`` keeps all four. Each kernel here only writes
``n`` float32 normals (4n bytes), so its time against the copy-bandwidth floor
shows whether the generator, not memory, bounds a kernel that draws its noise.
fastvae's reparameterize kernels use the ``randn4x`` scheme.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from benchmarks.harness import median_ms
from fastvae.kernels.reparameterize_kl import standard_normal

BLOCK = 4096
# As the launch planner gives the ops' 4096-element tiles; with 4 warps the tl.randn4x kernel spills a register.
NUM_WARPS = 8


@triton.jit
def _randn_kernel(out_ptr, n, seed, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.randn(seed, offsets), mask=offsets < n)


@triton.jit
def _randn4x_kernel(out_ptr, n, seed, BLOCK: tl.constexpr):
    # The same tile layout and Philox counters as the reparameterize kernels: one row of n columns.
    groups = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)[:, None]
    lanes = tl.arange(0, 4)[None, :]
    offsets = groups * 4 + lanes
    tl.store(out_ptr + offsets, standard_normal(seed, 0, 0, groups, lanes, 0), mask=offsets < n)


def measure_noise(device: torch.device, exponents=(20, 24, 28)) -> list[dict]:
    """Time each way of writing ``2**e`` normals; records carry their 4n-byte floor."""
    records = []
    for exp in exponents:
        n = 1 << exp
        out = torch.empty(n, device=device)
        grid = (triton.cdiv(n, BLOCK),)
        ways = {
            "tl.randn": lambda: _randn_kernel[grid](out, n, 1234, BLOCK=BLOCK, num_warps=NUM_WARPS),
            "tl.randn4x": lambda: _randn4x_kernel[grid](out, n, 1234, BLOCK=BLOCK, num_warps=NUM_WARPS),
            "torch.randn": lambda: out.normal_(),
        }
        for name, fn in ways.items():
            records.append({
                "suite": "noise", "op": "normal noise", "variant": name, "shape": [n], "elements": n,
                "dtype": "float32", "impl": name, "pass": "write", "ms": median_ms(fn, device),
                "floor_bytes": 4 * n,
            })
    return records
