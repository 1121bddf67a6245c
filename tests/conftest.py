"""Test setup: where the Triton kernels run, fresh random inputs per test, and the seed sweep.

Without CUDA the kernels run in Triton's interpreter on CPU tensors; Triton
reads ``TRITON_INTERPRET`` when a kernel is defined, so it is set here, before
any test imports fastvae's kernels. torch.compile's on-disk cache is one per
checkout (see below). With CUDA the kernels are compiled and the
same tests run on the GPU at larger shapes; the CPU cases are then skipped.

Random inputs. Every test starts with torch's generator seeded from
``torch.seed()``, a fresh seed each run, printed with a failing test's output
(``torch seed N``): each run searches new inputs. So **a randomized test must
pass under any seed**: choose its tolerances from an error analysis of what
the computations compared can differ by at the inputs' scale (as
``tests/test_reparameterize_kl_prior.py::test_logvar_limit_is_the_eager_clamp``
does), never by trying seeds until one passes; a test whose inputs must be
fixed seeds them itself (``torch.manual_seed``, a ``torch.Generator``).

The seed sweep checks that: ``pytest --seeds N [--seed-start S] tests/...``
(or ``python -m tests.sweep N tests/...``) runs each test under seeds S, S+1,
..., S+N-1 (ids ``[...-seedS]``). A test that draws nothing from torch's global
generator before seeding it itself runs once, under the first seed; the other
seeds of it are skipped as deterministic. A failure names its seed; rerun it
alone with ``--seeds 1 --seed-start SEED``. At the end the sweep lists the
tests whose comparisons (``torch.testing.assert_close``, and the error bounds
of ``tests.utils.assert_within``) came closest to their tolerance (the worst
ratio of error to tolerance, and its seed): a test near 1 needs its error
analysis redone, whatever the seeds showed. Run it over a test
module you add or change that draws random inputs (200 seeds for the op tests).
"""
import functools
import hashlib
import os
import re
import signal
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
from tests import utils as test_utils  # noqa: E402


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
def _fresh_seed(request):
    """Each test draws fresh random inputs, from a seed pytest reports if it fails (the sweep's, under --seeds)."""
    sweep = request.config.getoption("seeds") is not None
    seed = request.getfixturevalue("sweep_seed") if sweep else torch.seed() % 2**31
    torch.manual_seed(seed)
    print(f"torch seed {seed}")  # shown with a failing test's captured output
    if not sweep:
        yield seed
        return
    draws = _GlobalDraws(request.node)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "manual_seed", draws.reseeding(torch.manual_seed))
        patch.setattr(torch.testing, "assert_close", _Margins.recording(torch.testing.assert_close, draws.key, seed))
        patch.setattr(test_utils, "MARGIN_OBSERVERS", [functools.partial(_Margins.record, draws.key, seed)])
        yield seed
    draws.finish()


class _Margins:
    """Under --seeds: how close each test's ``torch.testing.assert_close`` calls came to their tolerance, the
    worst ``|actual - expected| / (atol + rtol |expected|)`` over its elements, calls and seeds (1 fails)."""

    worst: dict[str, tuple[float, int]] = {}  # the test without its seed -> (ratio, seed)

    @classmethod
    def recording(cls, assert_close, key: str, seed: int):
        def recorded(actual, expected, *args, **kwargs):
            assert_close(actual, expected, *args, **kwargs)
            cls.record(key, seed, _tolerance_ratio(actual, expected, kwargs.get("rtol"), kwargs.get("atol")))

        return recorded

    @classmethod
    def record(cls, key: str, seed: int, ratio: float | None) -> None:
        """A comparison of the test ``key`` under ``seed`` came to ``ratio`` of its tolerance (also
        ``tests.utils.assert_within``'s error analyses)."""
        if ratio is not None and ratio >= cls.worst.get(key, (-1.0, 0))[0]:
            cls.worst[key] = (ratio, seed)


def _tolerance_ratio(actual, expected, rtol, atol) -> float | None:
    if not (isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor)) or not actual.numel():
        return None
    if rtol is None or atol is None:
        from torch.testing._comparison import default_tolerances

        rtol, atol = default_tolerances(actual, expected)
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    finite = torch.isfinite(a) & torch.isfinite(e)
    error, allowed = (a - e).abs()[finite], (atol + rtol * e.abs())[finite]
    if not error.numel():
        return 0.0
    # A zero tolerance (atol=0 at an expected 0) allows exactly nothing: inf if missed, else 0 (not 0/0).
    beyond = torch.where(error > 0, float("inf"), 0.0)
    return float(torch.where(allowed > 0, error / allowed.clamp_min(torch.finfo(torch.float64).tiny), beyond).max())


def pytest_terminal_summary(terminalreporter, config):
    """Under --seeds: the tests whose comparisons came closest to their tolerance, with the seed."""
    if config.getoption("seeds") is None or not _Margins.worst:
        return
    closest = sorted(_Margins.worst.items(), key=lambda item: -item[1][0])
    terminalreporter.section("closest to their tolerance (worst |actual - expected| / (atol + rtol |expected|))")
    for key, (ratio, seed) in closest[: config.getoption("margins")]:
        terminalreporter.write_line(f"{ratio:8.3g}  seed {seed:<5d} {key}")


class _GlobalDraws:
    """Under --seeds: whether a test drew from torch's global generator before seeding it itself (randomized), or
    not (deterministic: the sweep runs it under its first seed only)."""

    randomized: dict[str, bool] = {}  # the test without its seed -> whether it is randomized

    def __init__(self, item):
        self.key = _unseeded_id(item)
        self.state = torch.get_rng_state()
        self.drew = None

    def reseeding(self, manual_seed):
        def seeded(seed):
            if self.drew is None:
                self.drew = not torch.equal(torch.get_rng_state(), self.state)
            return manual_seed(seed)

        return seeded

    def finish(self) -> None:
        if self.drew is None:
            self.drew = not torch.equal(torch.get_rng_state(), self.state)
        _GlobalDraws.randomized.setdefault(self.key, self.drew)


def _unseeded_id(item) -> str:
    """The test's id without its sweep seed: ``test[cpu-seed3-mse]`` -> ``test[cpu-mse]``."""
    return re.sub(r"\[seed\d+\]|(?<=\[)seed\d+-|-seed\d+(?=[\]-])", "", item.nodeid)


def pytest_addoption(parser):
    group = parser.getgroup("fastvae")
    group.addoption("--seeds", type=int, default=None, metavar="N",
                    help="the seed sweep: run each randomized test under N seeds (see tests/conftest.py)")
    group.addoption("--seed-start", type=int, default=0, metavar="S", help="the sweep's first seed (default: 0)")
    group.addoption("--margins", type=int, default=20, metavar="K",
                    help="under --seeds: list the K tests that came closest to their tolerance (default: 20)")


def pytest_generate_tests(metafunc):
    seeds = metafunc.config.getoption("seeds")
    if seeds is not None:
        start = metafunc.config.getoption("seed_start")
        metafunc.fixturenames.append("sweep_seed")
        metafunc.parametrize("sweep_seed", range(start, start + seeds), ids=lambda seed: f"seed{seed}")


def pytest_collection_modifyitems(config, items):
    """Under --seeds, every test under the first seed (which decides whether a test's other seeds run), then every
    test under the next: a sweep stopped early has covered its first seeds completely."""
    if config.getoption("seeds") is None:
        return
    order = {}
    for item in items:
        order.setdefault(_unseeded_id(item), len(order))
    items.sort(key=lambda item: (item.callspec.params["sweep_seed"], order[_unseeded_id(item)]))


def pytest_runtest_setup(item):
    if item.config.getoption("seeds") is None or "sweep_seed" not in getattr(item, "callspec", None).params:
        return
    if item.callspec.params["sweep_seed"] != item.config.getoption("seed_start"):
        if _GlobalDraws.randomized.get(_unseeded_id(item)) is False:
            pytest.skip("deterministic: draws nothing from torch's global generator; ran under the first seed")


def _stop_sweep(signum, frame):
    raise KeyboardInterrupt


def pytest_configure(config):
    if config.getoption("seeds") is not None:
        # A sweep is often stopped from outside: kill PID, or Ctrl-C, also where it was started in the background
        # (which ignores SIGINT). Either ends it as Ctrl-C does, with the summary of what it covered.
        signal.signal(signal.SIGTERM, _stop_sweep)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # torch.compile's own deprecation noise, not ours.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
