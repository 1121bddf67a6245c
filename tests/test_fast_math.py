"""The kernels' fast float32 math (``fastvae.kernels.launch``) against float64: its error bounds, where it switches.

Under the interpreter these run the plain formulas (numpy's log2, a division), which checks the range reduction
around them; on a GPU they run the SFU instructions whose documented accuracy the bounds below state.
"""
import math

import torch
import triton
import triton.language as tl

from fastvae.kernels.launch import fast_log, fast_rcp
from tests.utils import pick


@triton.jit
def _fast_math_kernel(x_ptr, log_ptr, rcp_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=1.0)
    tl.store(log_ptr + offsets, fast_log(x), mask=mask)
    tl.store(rcp_ptr + offsets, fast_rcp(x), mask=mask)


def run(x):
    log, rcp = torch.empty_like(x), torch.empty_like(x)
    block = 1024
    _fast_math_kernel[(triton.cdiv(x.numel(), block),)](x, log, rcp, x.numel(), BLOCK=block)
    return log, rcp


def inputs(device, n_random):
    """Every binade's 1, the edges of the mantissa's range [1/sqrt 2, sqrt 2) and their neighbours, log-uniform
    draws: positive normal float32 numbers whose reciprocals are normal too."""
    edges = torch.tensor([1.0, 1 / math.sqrt(2), math.sqrt(2), 1.5, 2 - 2**-23], dtype=torch.float32)
    edges = torch.cat([edges, torch.nextafter(edges, torch.zeros(())), torch.nextafter(edges, 2 * edges)])
    scales = 2.0 ** torch.arange(-125, 125, dtype=torch.float64)
    grid = (scales[:, None] * edges.double()[None, :]).flatten()
    draws = torch.exp(torch.empty(n_random, dtype=torch.float64).uniform_(-86, 86))
    x = torch.cat([grid, draws]).float()
    x = x[(x >= 2.0**-125) & (x <= 2.0**125)]
    return x.to(device)


def test_fast_log_and_reciprocal_within_their_bounds(device):
    x = inputs(device, pick(device, 2000, 1 << 20))
    log, rcp = run(x)
    want = torch.log(x.double())
    # lg2.approx within 2^-22 on [0.5, 2], times log 2, and the roundings of e + log2(m) and of the product.
    assert ((log.double() - want).abs() <= 1.7e-7 + 1.2e-7 * want.abs()).all()
    # rcp.approx.ftz: within 1 ulp of 1 / x (at most 2^-23 of it) for normal x and result.
    exact = 1 / x.double()
    assert ((rcp.double() - exact).abs() <= 2.0**-23 * exact).all()


def test_fast_log_keeps_nan_and_is_exact_at_powers_of_two(device):
    x = torch.tensor([float("nan"), 1.0, 0.5, 0.125, 1024.0, 2.0**-100], device=device)
    log, rcp = run(x)
    assert torch.isnan(log[0]) and torch.isnan(rcp[0])
    want = torch.tensor([0.0, -1.0, -3.0, 10.0, -100.0], dtype=torch.float64) * math.log(2.0)
    # e log 2 plus log2(1) = 0 exactly: one rounding of the product.
    assert torch.allclose(log[1:].double().cpu(), want, rtol=2**-23, atol=0)
