"""The seed sweep of tests/conftest.py (``pytest --seeds N``), run on a small test file of its own."""
import os
import re
import subprocess
import sys

import torch

TESTS = '''
import torch

def test_randomized():
    assert torch.randn(()) < 0.5  # fails under the seeds whose first draw is 0.5 or more

def test_seeds_itself():
    torch.manual_seed(1)
    assert torch.randn(()) < 10

def test_draws_nothing():
    # 6e-6 off where 1e-5 + 1.3e-6 * 1 is allowed: 0.527 of the tolerance
    torch.testing.assert_close(torch.tensor(1.0), torch.tensor(1.0 + 6e-6))
'''


def test_the_sweep_runs_randomized_tests_under_every_seed_and_the_others_once(tmp_path):
    (tmp_path / "test_sample.py").write_text(TESTS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-m", "tests.sweep", "6", "--seed-start", "3", "-p", "tests.conftest", "-rf",
         str(tmp_path / "test_sample.py")],
        cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    failing = []
    for seed in range(3, 9):
        torch.manual_seed(seed)
        if torch.randn(()) >= 0.5:
            failing.append(seed)
    reported = sorted(int(s) for s in re.findall(r"FAILED \S+::test_randomized\[seed(\d+)\]", done.stdout))
    assert reported == failing, done.stdout
    summary = done.stdout.strip().splitlines()[-1]
    # The randomized test under its 6 seeds, the two others under the first only (5 seeds each skipped).
    assert f"{len(failing)} failed, {6 - len(failing) + 2} passed, 10 skipped" in summary, done.stdout
    assert re.search(r"0\.527\s+seed 3\s+\S+::test_draws_nothing", done.stdout), done.stdout
