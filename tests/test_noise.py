"""The normal noise fastvae's kernels draw, in distribution: moments, a Kolmogorov-Smirnov test on a million draws,
the tails beyond 4 and 5 sigma, against N(0, 1) and against ``torch.randn``.

The generator is :func:`fastvae.kernels.reparameterize_kl.standard_normal` (Philox4x32-10, Box-Muller), run here by
the noise benchmark's kernel (``benchmarks/noise.py``) over one long row, in blocks large enough for the interpreter
to draw 2**20 normals in about a second. Under the interpreter the Box-Muller transform takes the exact log, sine
and cosine (``tl.randn4x``'s values, bit for bit); compiled, the hardware's approximations, which move a normal by
at most some 1e-5 (``_box_muller``'s docstring), far below what a million draws resolve (the KS statistic's
threshold here is 2.7e-3): on a GPU these tests check that path, on 2**24 draws.

Every threshold is a 5-sigma bound or a 1e-6 tail of the statistic's distribution under the null, so a correct
generator fails none of them under any seed, and the controls show each would catch a wrong one.
"""

import math

import pytest
import torch

from tests.utils import pick

# P(K > KS_THRESHOLD) = 1e-6 for the Kolmogorov distribution: K = sqrt(n) D (one sample), sqrt(n / 2) D (two).
KS_THRESHOLD = math.sqrt(-math.log(1e-6 / 2) / 2)
TAIL_4 = math.erfc(4 / math.sqrt(2))  # P(|z| > 4) = 6.33e-5
TAIL_5 = math.erfc(5 / math.sqrt(2))  # P(|z| > 5) = 5.73e-7
MAX_NORMAL = math.sqrt(-2 * math.log(1e-7))  # the Box-Muller radius's cap, u1 kept above 1e-7: 5.68


def _noise(n, device, seed):
    import triton

    from benchmarks.noise import _fastvae_noise_kernel

    block = pick(device, 1 << 18, 1 << 12)  # big blocks for the interpreter, the ops' tiles on a GPU
    out = torch.empty(n, device=device)
    _fastvae_noise_kernel[(triton.cdiv(n, block),)](out, n, seed, BLOCK=block)
    return out.double()


@pytest.fixture(scope="module")
def draws():
    """2**20 normals of the kernel (2**24 on a GPU), with torch.randn's of the same size, per device."""
    cache = {}

    def get(device):
        if device.type not in cache:
            n = pick(device, 1 << 20, 1 << 24)
            seed = int(torch.randint(0, 2**62, ()))
            cache[device.type] = (_noise(n, device, seed).cpu(), torch.randn(n, dtype=torch.float64).cpu())
        return cache[device.type]

    return get


def _moments_z_scores(x: torch.Tensor) -> dict[str, float]:
    """Mean, variance, skewness and excess kurtosis of ``x`` as z-scores under N(0, 1) (large-sample variances
    1, 2, 6 and 24 over n)."""
    n = x.numel()
    centred = x - x.mean()
    var = centred.pow(2).mean()
    return {
        "mean": float(x.mean() * math.sqrt(n)),
        "variance": float((x.var() - 1) / math.sqrt(2 / n)),
        "skewness": float(centred.pow(3).mean() / var**1.5 / math.sqrt(6 / n)),
        "excess kurtosis": float((centred.pow(4).mean() / var**2 - 3) / math.sqrt(24 / n)),
    }


def _ks_one_sample(x: torch.Tensor) -> float:
    """sqrt(n) sup |F_n - Phi| of ``x`` against the standard normal."""
    n = x.numel()
    cdf = torch.special.ndtr(x.sort().values)
    steps = torch.arange(1, n + 1, dtype=torch.float64) / n
    return math.sqrt(n) * float(torch.maximum(steps - cdf, cdf - (steps - 1 / n)).max())


def _ks_two_sample(x: torch.Tensor, y: torch.Tensor) -> float:
    """sqrt(n m / (n + m)) sup |F_x - F_y|."""
    n, m = x.numel(), y.numel()
    values, order = torch.cat([x, y]).sort()
    steps = torch.where(order < n, 1.0 / n, -1.0 / m).to(torch.float64).cumsum(0)
    last_of_each_value = torch.ones_like(values, dtype=torch.bool)
    last_of_each_value[:-1] = values[1:] != values[:-1]  # compare the two CDFs only after all ties are counted
    return math.sqrt(n * m / (n + m)) * float(steps[last_of_each_value].abs().max())


def _tail_ok(count: int, expected: float) -> bool:
    """A Poisson count within 5 sigma of its mean (plus 3, for small means: P(X > 0.6 + 3.9 + 3) < 1e-6)."""
    return abs(count - expected) <= 5 * math.sqrt(expected) + 3


def test_noise_moments_are_standard_normal(device, draws):
    noise, reference = draws(device)
    for name, z in _moments_z_scores(noise).items():
        assert abs(z) < 5, (name, z)
    # The same bound holds for torch.randn, and catches a variance off by 1%.
    assert all(abs(z) < 5 for z in _moments_z_scores(reference).values())
    assert abs(_moments_z_scores(1.01 * noise)["variance"]) > 5


def test_noise_passes_kolmogorov_smirnov_against_the_normal_and_torch_randn(device, draws):
    noise, reference = draws(device)
    assert _ks_one_sample(noise) < KS_THRESHOLD
    assert _ks_two_sample(noise, reference) < KS_THRESHOLD
    assert _ks_one_sample(reference) < KS_THRESHOLD
    # Controls: a 5% wider normal, and one clipped at 2 sigma, fail the same tests.
    assert _ks_one_sample(1.05 * noise) > KS_THRESHOLD
    assert _ks_two_sample(1.05 * noise, reference) > KS_THRESHOLD
    assert _ks_one_sample(noise.clamp(-2.0, 2.0)) > KS_THRESHOLD


def test_noise_tails_beyond_4_and_5_sigma(device, draws):
    noise, reference = draws(device)
    n = noise.numel()
    for x in (noise, reference):
        assert _tail_ok(int((x.abs() > 4).sum()), n * TAIL_4)
        assert _tail_ok(int((x.abs() > 5).sum()), n * TAIL_5)
    # Box-Muller's cap (plus the approximations' slack, compiled), and a control: a normal 10% too narrow has a
    # third of the tail beyond 4 sigma, which the bound rejects at this n.
    assert noise.abs().max() <= MAX_NORMAL + 1e-4
    assert not _tail_ok(int((0.9 * noise).abs().gt(4).sum()), n * TAIL_4)


def test_noise_is_the_interpreters_tl_randn4x(device):
    """Interpreted, fastvae's generator gives tl.randn4x's normals bit for bit (the same Philox counters, the same
    exact Box-Muller): the tests above check the distribution of the transform the compiled kernels approximate."""
    if device.type != "cpu":
        pytest.skip("compiled, the Box-Muller transform takes the hardware's approximations")
    import triton

    from benchmarks.noise import BLOCK, _randn4x_kernel

    n = 3 * BLOCK + 5
    ours, theirs = _noise(n, device, 987654321).float(), torch.empty(n)
    _randn4x_kernel[(triton.cdiv(n, BLOCK),)](theirs, n, 987654321, BLOCK=BLOCK)
    assert torch.equal(ours, theirs)
