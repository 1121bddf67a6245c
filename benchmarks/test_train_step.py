"""pytest-benchmark suite of the training step: ``pytest benchmarks --benchmark-only``.

One optimizer step of the MLP and conv VAEs for each implementation on a GPU;
without one, the smoke grid of the eager reference only.
"""
import pytest
import torch

from benchmarks.harness import synchronize
from benchmarks.train_step import IMPLS, make_step, train_cases

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
CASES = train_cases("default" if ON_GPU else "smoke", ["fp32", "bf16"])


@pytest.mark.parametrize("impl", IMPLS if ON_GPU else ("eager",))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.model}-{c.batch}-{c.precision}")
def test_train_step(benchmark, case, impl):
    benchmark.group = f"{case.model}-{case.batch}-{case.precision}"
    step = make_step(case, impl, DEVICE)
    step()
    step()  # compile and warm up outside the timing

    def run():
        step()
        synchronize(DEVICE)

    benchmark(run)
