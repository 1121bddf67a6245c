"""pytest-benchmark suite of the ops: ``pytest benchmarks --benchmark-only``.

Forward+backward of every op case at 2**24 elements and more, for eager
PyTorch, ``torch.compile`` and fastvae, on a GPU. Without one it runs the smoke
grid of the eager reference only (the fused kernels need a GPU). The runner
(``python -m benchmarks``) measures more: every pass, the bandwidth floor,
kernel counts and memory.
"""
import pytest
import torch

from benchmarks.harness import synchronize
from benchmarks.ops import implementation, op_cases, passes

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
CASES = [c for c in op_cases("default" if ON_GPU else "smoke", [torch.float32, torch.bfloat16])
         if not ON_GPU or c.nominal_elements >= 1 << 24]
IMPLS = ("eager", "compile", "fastvae") if ON_GPU else ("eager",)


def case_id(case) -> str:
    variant = f"[{case.variant}]" if case.variant else ""
    return f"{case.op}{variant}-{'x'.join(map(str, case.shape))}-{str(case.dtype).replace('torch.', '')}"


@pytest.mark.parametrize("impl_name", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_op_forward_backward(benchmark, case, impl_name):
    benchmark.group = case_id(case)
    step = passes(case, implementation(case, impl_name), DEVICE)["forward+backward"]
    step()  # compiles, for torch.compile and Triton alike: not part of the timing

    def run():
        step()
        synchronize(DEVICE)

    benchmark(run)
