"""One command at a time in a run folder: a live run holds it, a killed one does not (fastvae.training.runlock).

The holders here are real ``fastvae train`` processes; the commands refused run in this process (fast).
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastvae.training import loop, runlock
from fastvae.training.rundir import FILES
from tests.test_cli import TINY, assert_one_line_error, metrics, run

# A run that goes on until it is killed: a step per line of metrics.jsonl, no checkpoint before the end.
FOREVER = ["--steps", "10000000", "--checkpoint-every", "10000000", "--log-every", "1", "--quiet"]


def start_training(*argv) -> subprocess.Popen:
    """``python -m fastvae train *argv`` in a process of its own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "fastvae", "train", *map(str, argv)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_steps(process: subprocess.Popen, out, steps: int, timeout: float = 120) -> None:
    """Wait until the run in ``out`` has logged more than ``steps`` steps (it holds its folder by then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the holder exited with {process.returncode}: {process.stderr.read()}")
        if os.path.exists(out / FILES["metrics"]) and len(metrics(out)) > steps:
            return
        time.sleep(0.2)
    pytest.fail(f"the holder logged no step past {steps} in {timeout} s")


def kill_9(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


@pytest.fixture
def holders():
    """The holder processes a test starts, killed at its end whatever happens."""
    started = []
    yield started
    for process in started:
        if process.poll() is None:
            kill_9(process)


def test_a_second_run_on_a_live_folder_is_refused_and_a_killed_one_is_taken_over(tmp_path, holders):
    """The reported case: two runs given one --out before the first checkpoint. The second is refused, naming the
    first, which goes on unharmed; after kill -9 of the first, its lock is gone and a new run takes the folder over."""
    out = tmp_path / "r"
    first = start_training(*TINY, *FOREVER, "--out", out)
    holders.append(first)
    wait_for_steps(first, out, 2)
    for argv in (
        ["train", *TINY, "--steps", 3, "--out", out],
        ["train", "--out", out, "--resume"],
    ):
        assert_one_line_error(*run(*argv)[:3:2], f"{out} is in use by process {first.pid} (fastvae train ", "--out")
    logged = len(metrics(out))
    wait_for_steps(first, out, logged)  # the first run goes on, its metrics kept
    assert [r["step"] for r in metrics(out)][:logged] == list(range(1, logged + 1))
    kill_9(first)

    status, _, stderr = run("train", *TINY, "--steps", 3, "--out", out)
    assert status == 0, stderr
    assert "(taken over: it held no checkpoint)" in stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    holder = json.loads((out / runlock.LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid()  # the last holder's name stays in the file; its lock went with it


def test_every_command_writing_into_a_live_run_folder_is_refused(tmp_path, holders):
    """Resuming, a new run, encoding and sampling into a folder whose run is alive: exit 2, one line naming the
    live process, nothing written; evaluating only reads (checkpoints are replaced whole), so it goes on."""
    out = tmp_path / "r"
    assert run("train", *TINY, "--steps", 2, "--hidden", 8, "--out", out, "--quiet")[0] == 0
    live = start_training("--out", out, "--resume", *FOREVER)
    holders.append(live)
    wait_for_steps(live, out, 3)
    names = set(os.listdir(out))
    for argv in (
        ["train", "--out", out, "--resume", "--steps", 4],
        ["train", *TINY, "--out", out],
        ["encode", out],
        ["sample", out],
        ["encode", out, "--out", out / "codes.npz"],
        ["sample", out, "--out", out / "s.png"],
    ):
        assert_one_line_error(*run(*argv)[:3:2], f"is in use by process {live.pid} (fastvae train --out {out}")
    assert set(os.listdir(out)) == names
    status, stdout, stderr = run("eval", out, "--k", 2)
    assert status == 0 and "held-out ELBO" in stdout, stderr
    encoded = tmp_path / "elsewhere.npz"  # its checkpoint written elsewhere: not into the live folder
    assert run("encode", out, "--out", encoded)[0] == 0 and encoded.exists()

    kill_9(live)  # a lock left by a killed process holds nothing
    status, _, stderr = run("train", "--out", out, "--resume", "--steps", 4, "--quiet")
    assert status == 0, stderr
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    assert run("sample", out, "--n", 4)[0] == 0


def test_the_lock_is_held_until_the_evaluation_and_figures_are_written(tmp_path, monkeypatch):
    """Within one process too: a command started while a run writes its last files is refused."""
    out, refused = tmp_path / "r", []
    evaluate = loop.evaluate_held_out

    def evaluate_and_try_another(*args, **kwargs):
        refused.append(run("sample", out, "--n", 4))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_held_out", evaluate_and_try_another)
    assert run("train", *TINY, "--steps", 2, "--hidden", 8, "--out", out, "--quiet")[0] == 0
    ((status, _, stderr),) = refused
    assert_one_line_error(status, stderr, f"is in use by process {os.getpid()}")
    monkeypatch.undo()
    assert run("sample", out, "--n", 4)[0] == 0  # released when the run ended


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    def unsupported(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runlock.fcntl, "flock", unsupported)
    status, _, stderr = run("train", *TINY, "--steps", 2, "--hidden", 8, "--out", tmp_path / "r", "--quiet")
    assert status == 0, stderr
    assert stderr == (
        f"fastvae train: warning: cannot lock the run folder {tmp_path / 'r'} ({os.strerror(errno.ENOLCK)}): "
        "another command writing into it at the same time would not be stopped\n"
    )


def test_a_folder_that_is_not_a_run_folder_is_not_locked_by_sample_or_encode(tmp_path):
    with runlock.hold_run_folder(str(tmp_path), create=False):
        pass
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="does not exist"):
        with runlock.hold_run_folder(str(tmp_path / "missing")):
            pass
