"""What a run shows a person while it works: status lines and ``tqdm`` progress bars, on stderr.

:class:`Progress` decides once per process what is shown: nothing on ranks
other than 0 of a torchrun job, nothing under ``--quiet``; status lines (what the
run is doing: its start, long one-off steps such as generating a dataset or
compiling the model) otherwise; and the bars (training, held-out evaluation,
figures) only when stderr is a terminal or a Jupyter notebook, so logs of
batch jobs get no carriage returns. The metrics log (``metrics.jsonl``) is
:mod:`fastvae.training.metrics`'s job, not this module's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from tqdm.auto import tqdm

# The bars' width and the rows tqdm may use where the terminal reports a size of 0 (a pseudo-terminal never
# given one, as `script` and some CI runners make it), with which tqdm would draw empty lines.
FALLBACK_COLUMNS, FALLBACK_ROWS = 100, 20


def interactive_stderr() -> bool:
    """Whether a person is watching stderr: a terminal, or a Jupyter kernel (where tqdm draws a widget)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress_bar(*, total: int, desc: str, unit: str, enabled: bool, initial: int = 0) -> tqdm:
    """A ``tqdm`` bar on stderr counting ``total`` ``unit``\\ s from ``initial``; a silent one unless ``enabled``.

    Its width follows the terminal's, or is :data:`FALLBACK_COLUMNS` where the terminal says it has none.
    """
    size = terminal_size()
    fixed = size is not None and 0 in size
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=not fixed,
        ncols=FALLBACK_COLUMNS if fixed else None,
        nrows=FALLBACK_ROWS if fixed else None,
        disable=not enabled,
        leave=True,
    )


def terminal_size() -> tuple[int, int] | None:
    """``(columns, lines)`` of stderr's terminal (0 for a pseudo-terminal never given a size); ``None`` if it is
    not a terminal."""
    try:
        return tuple(os.get_terminal_size(sys.stderr.fileno()))
    except (AttributeError, OSError, ValueError):  # not a file (a notebook's stream), or not a terminal
        return None


class Progress:
    """The status lines and bars of one process of a run (see the module's docstring for what shows when)."""

    def __init__(self, *, quiet: bool, is_main: bool = True):
        self.lines = is_main and not quiet
        self.bars = self.lines and interactive_stderr()

    def say(self, message: str) -> None:
        """Print the status line ``message`` on stderr (above any bar that is showing)."""
        if self.lines:
            tqdm.write(message, file=sys.stderr)
            sys.stderr.flush()

    def working(self, message: str) -> None:
        """Say what a long one-off step is doing, where the bars show (a person would see a screen stand still).

        Not in logs: there bad input must stay a one-line error, and the step's time shows in the next line's.
        """
        if self.bars:
            self.say(f"{message}...")

    def bar(self, *, total: int, desc: str, unit: str, initial: int = 0) -> tqdm:
        """A :func:`progress_bar` that shows if this process shows bars."""
        return progress_bar(total=total, desc=desc, unit=unit, enabled=self.bars, initial=initial)

    def training_bar(self, total_steps: int, first_step: int) -> TrainingBar:
        """The bar of the training steps ``first_step + 1 .. total_steps``."""
        return TrainingBar(self.bar(total=total_steps, desc="training", unit="step", initial=first_step))


class TrainingBar:
    """The training bar: steps done, time left, and the last logged loss, metrics and samples/s beside it."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def update(self, record: dict, metrics: Sequence[str]) -> None:
        """Move to ``record``'s step (a ``metrics.jsonl`` record), showing its loss and its values of ``metrics``."""
        if self.bar.disable:
            return
        shown = {"loss": record["loss"], **{name: record[name] for name in metrics}}
        postfix = ", ".join(f"{name} {value:.2f}" for name, value in shown.items())
        self.bar.set_postfix_str(f"{postfix}, {record['samples_per_s']:,.0f} samples/s", refresh=False)
        self.bar.update(record["step"] - self.bar.n)

    def close(self) -> None:
        self.bar.close()
