"""What ``fastvae train`` and ``fastvae eval`` show a person: tqdm bars on a terminal, status lines, --quiet."""

import contextlib
import io

import torch

from fastvae.cli import main
from fastvae.data import loading_message
from fastvae.training.progress import Progress
from tests.test_cli import TINY, run


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def run_on_terminal(*argv) -> tuple[int, str, str]:
    """``fastvae *argv`` in this process with stderr on a (fake) terminal: exit status, stdout, stderr."""
    out, terminal = io.StringIO(), FakeTerminal()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(terminal):
        status = main([str(a) for a in argv])
    return status, out.getvalue(), terminal.getvalue()


def test_bars_of_training_evaluation_and_figures_on_a_terminal(tmp_path):
    status, stdout, shown = run_on_terminal("train", *TINY, "--steps", 6, "--log-every", 3, "--out", tmp_path / "a")
    assert status == 0
    assert shown.startswith("training the mlp VAE on digits")
    last_training = [part for part in shown.split("\r") if part.startswith("training:")][-1]
    assert "6/6" in last_training and "step/s" in last_training
    assert "loss " in last_training and "recon " in last_training and "kl " in last_training
    assert "samples/s" in last_training
    assert "held-out evaluation: 100%" in shown and "30/30" in shown  # the 30 held-out images
    assert "figures: 100%" in shown and "4/4" in shown
    assert "held-out ELBO" in stdout and "\r" not in stdout  # results stay on stdout, bars on stderr


def test_quiet_shows_nothing_on_a_terminal(tmp_path):
    # (Without --quiet and without a terminal: status lines only; see test_cli.py's tiny_run.)
    status, _, shown = run_on_terminal(
        "train", *TINY, "--steps", 4, "--log-every", 2, "--out", tmp_path / "q", "--quiet"
    )
    assert status == 0 and shown == ""


def test_eval_shows_its_bar_on_a_terminal_only(tmp_path):
    assert run("train", *TINY, "--steps", 2, "--out", tmp_path / "r", "--quiet")[0] == 0
    status, stdout, shown = run_on_terminal("eval", tmp_path / "r", "--k", 3)
    assert status == 0 and "held-out ELBO" in stdout
    assert "held-out evaluation: 100%" in shown
    status, _, stderr = run("eval", tmp_path / "r", "--k", 3)  # stderr captured: not a terminal
    assert status == 0 and stderr == ""


def test_only_the_main_process_shows_anything():
    for is_main in (False, True):
        with contextlib.redirect_stderr(FakeTerminal()) as terminal:
            progress = Progress(quiet=False, is_main=is_main)
            progress.say("hello")
            with progress.bar(total=3, desc="work", unit="it") as bar:
                bar.update(3)
        shown = terminal.getvalue()
        if is_main:
            assert progress.bars and shown.startswith("hello\n") and "work: 100%" in shown
        else:
            assert not progress.bars and shown == ""


def test_long_one_off_steps_say_what_they_do_on_a_terminal(tmp_path, monkeypatch):
    assert loading_message("shapes", num_images=None) == "generating 20,000 shapes images"
    assert loading_message("mnist") is None
    shapes = ["--data", "shapes", "--num-images", 20, "--batch-size", 9, "--steps", 1, "--hidden", 8, "--eval-k", 1]
    status, _, shown = run_on_terminal("train", *shapes, "--out", tmp_path / "s")
    assert status == 0
    assert shown.startswith("generating 20 shapes images...\ntraining the mlp VAE on shapes")
    status, _, stderr = run("train", *shapes, "--out", tmp_path / "s2")  # not a terminal: a log gets no such line
    assert status == 0 and stderr.startswith("training the mlp VAE on shapes")
    monkeypatch.setattr(torch, "compile", lambda module: module)  # the message, not the compilation
    status, _, shown = run_on_terminal("train", *TINY, "--steps", 1, "--compile", "--out", tmp_path / "c")
    assert status == 0
    assert shown.splitlines()[1].startswith("torch.compile: compiling the model in its first step")


def bar_on_a_pseudo_terminal(columns: int) -> str:
    """What a finished bar writes to a real pseudo-terminal of ``columns`` columns (0: one never given a size, as
    ``script -qc "fastvae train ..." log </dev/null`` makes it)."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    from fastvae.training.progress import progress_bar

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24 if columns else 0, columns, 0, 0))
    with os.fdopen(slave, "w") as terminal, contextlib.redirect_stderr(terminal):
        with progress_bar(total=3, desc="work", unit="it", enabled=True) as bar:
            bar.update(3)
    written = b""
    try:
        while chunk := os.read(master, 4096):  # until the closed terminal raises EIO (or ends)
            written += chunk
    except OSError:
        pass
    finally:
        os.close(master)
    return written.decode().split("\r")[-2]  # the last drawing of the bar


def test_a_terminal_without_a_size_gets_bars_of_a_fixed_width():
    from fastvae.training.progress import FALLBACK_COLUMNS

    shown = bar_on_a_pseudo_terminal(0)
    assert shown.startswith("work: 100%|") and shown.endswith("it/s]") and len(shown) == FALLBACK_COLUMNS
    assert len(bar_on_a_pseudo_terminal(60)) == 59  # a terminal's own width (tqdm leaves the last column free)
