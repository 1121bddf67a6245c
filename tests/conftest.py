"""Test setup: where the Triton kernels run.

Without CUDA the kernels run in Triton's interpreter on CPU tensors; Triton
reads ``TRITON_INTERPRET`` when a kernel is defined, so it is set here, before
any test imports fastvae's kernels. torch.compile's on-disk cache is one per
checkout (see below). With CUDA the kernels are compiled and the
same tests run on the GPU at larger shapes; the CPU cases are then skipped.
"""
import hashlib
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.compile's caches are keyed on the traced graph, which names a custom op but not its schema: after a
# fastvae op gains an output, a cache entry written by another checkout (or an older version) on this machine
# would be replayed with the old outputs. Each checkout gets a cache of its own (unless one is set).
_CHECKOUT = hashlib.sha1(os.path.dirname(os.path.dirname(os.path.abspath(__file__))).encode()).hexdigest()[:12]
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"fastvae-inductor-{_CHECKOUT}"))

import pytest  # noqa: E402

from fastvae.backend import kernels_interpreted  # noqa: E402


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """A device the Triton kernels can run on: the CPU under the interpreter, or a GPU."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if request.param == "cpu" and not kernels_interpreted():
        pytest.skip("kernels are compiled for the GPU (TRITON_INTERPRET is not set)")
    return torch.device(request.param)


@pytest.fixture(scope="session")
def sm90_variants():
    """Every kernel variant the ops (and the noise benchmark) launch at small shapes, compiled for sm_90 once per session.

    A list of the static audit's rows (see ``benchmarks/static/audit.py``); compiled cubins are also cached on
    disk across sessions (``FASTVAE_STATIC_CACHE``). Needs the interpreter: the launches are recorded from the
    Triton path on CPU tensors.
    """
    if not kernels_interpreted():
        pytest.skip("records launches on CPU tensors, which needs TRITON_INTERPRET=1")
    from benchmarks.static.audit import audit_variants, noise_launches, record_cases, record_extra, small_cases

    dtypes = (torch.float32, torch.bfloat16)
    launches = record_cases(small_cases(dtypes))
    launches.update(record_extra(dtypes))
    launches.update(noise_launches())  # the noise benchmark's kernels too
    return audit_variants(launches)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Each test draws fresh random inputs, from a seed pytest reports if it fails."""
    seed = torch.seed() % 2**31
    torch.manual_seed(seed)
    print(f"torch seed {seed}")  # shown with a failing test's captured output
    yield seed


def pytest_configure(config):
    # torch.compile's own deprecation noise, not ours.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
