"""Is drawing Philox noise inside a kernel free? ``tl.randn``, ``tl.randn4x`` and fastvae's own generator.

``tl.randn`` runs a whole 10-round Philox block per normal and keeps one of
its four outputs; ``tl.randn4x`` keeps all four. fastvae's reparameterize
kernels draw with :func:`fastvae.kernels.reparameterize_kl.standard_normal`:
the four normals of ``tl.randn4x``'s scheme, with the Philox rounds' products
taken from one wide multiply and, compiled, the hardware's approximations of
the Box-Muller log, sine and cosine. Each kernel here only writes ``n``
float32 normals (4n bytes), so its time against the copy-bandwidth floor
shows whether the generator, not memory, bounds a kernel that draws its noise.
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
    # The reparameterize kernels' tile layout and Philox counters (one row of n columns), Triton's tl.randn4x.
    groups = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)[:, None]
    lanes = tl.arange(0, 4)[None, :]
    offsets = groups * 4 + lanes
    n0, n1, n2, n3 = tl.randn4x(seed, groups)
    normals = tl.where(lanes == 0, n0, tl.where(lanes == 1, n1, tl.where(lanes == 2, n2, n3)))
    tl.store(out_ptr + offsets, normals, mask=offsets < n)


@triton.jit
def _fastvae_noise_kernel(out_ptr, n, seed, BLOCK: tl.constexpr):
    # fastvae's generator on one row of n columns: what the reparameterize kernels draw, nothing else.
    groups = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)[None, :, None]
    lanes = tl.arange(0, 4)[None, None, :]
    offsets = groups * 4 + lanes
    rows = tl.zeros([1, 1, 1], dtype=tl.int64)
    tl.store(out_ptr + offsets, standard_normal(seed, 0, rows, groups, lanes, 0), mask=offsets < n)


NOISE_KERNELS = {"tl.randn": _randn_kernel, "tl.randn4x": _randn4x_kernel, "fastvae": _fastvae_noise_kernel}


def measure_noise(device: torch.device, exponents=(20, 24, 28)) -> list[dict]:
    """Time each way of writing ``2**e`` normals; records carry their 4n-byte floor."""
    records = []
    for exp in exponents:
        n = 1 << exp
        out = torch.empty(n, device=device)
        grid = (triton.cdiv(n, BLOCK),)
        ways = {
            name: (lambda kernel=kernel: kernel[grid](out, n, 1234, BLOCK=BLOCK, num_warps=NUM_WARPS))
            for name, kernel in NOISE_KERNELS.items()
        }
        ways["torch.randn"] = lambda: out.normal_()
        for name, fn in ways.items():
            records.append({
                "suite": "noise", "op": "normal noise", "variant": name, "shape": [n], "elements": n,
                "dtype": "float32", "impl": name, "pass": "write", "ms": median_ms(fn, device),
                "floor_bytes": 4 * n,
            })
    return records
