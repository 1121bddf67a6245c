"""The metrics of a run: :class:`MetricsLog` (``metrics.jsonl``) and reading it back.

What a person sees while the run works is :mod:`fastvae.training.progress`'s job.

A record (one line of ``metrics.jsonl``) is ``{"step", "epoch", ...the values the
model logs with the step (``kl_weight``), "lr", "loss", ...the batch means of the
model's per-image metrics (``recon``, ``kl``), "samples_per_s"}``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings

import torch

from fastvae.errors import ConfigError, NonFiniteLossError
from fastvae.training.distributed import Distributed
from fastvae.training.files import write_atomic


def read_metrics(path: str) -> list[dict]:
    """The records of the ``metrics.jsonl`` file ``path`` (none if it does not exist).

    A last line that is not a whole record (what a crash while appending
    leaves) is dropped with a warning; a damaged line before it is a
    :class:`ConfigError`.
    """
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    records = []
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "step" in record:
            records.append(record)
        elif number != lines[-1][0]:
            raise ConfigError(f"{path}: line {number} is not a metrics record; repair or remove it")
        else:
            warnings.warn(f"{path}: dropped its last line, which was cut off (as a crash leaves it)", stacklevel=2)
    return records


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop the lines logged after ``last_step`` (after the checkpoint a resumed run starts from), and a cut-off one."""
    kept = [r for r in read_metrics(path) if r["step"] <= last_step]
    write_atomic(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in kept), binary=False)


class MetricsLog:
    """Per-step metrics held on the device and written every few steps, so the GPU is not synced each step.

    :meth:`flush` averages them over ranks, checks that the loss is finite,
    appends them to ``metrics.jsonl`` (rank 0) and returns them. ``names`` are
    the model's metrics in the records (``recon``, ``kl``, ...). ``advice`` ends
    the message of a loss that is not finite: what the run could change.
    """

    def __init__(self, path: str | None, ctx: Distributed, local_batch: int, advice: str = "Try a lower --lr"):
        self.path = path
        self.ctx = ctx
        self.local_batch = local_batch
        self.advice = advice
        self.names: tuple[str, ...] = ()
        self.pending: list[tuple[dict, torch.Tensor]] = []
        self.window_start = time.perf_counter()

    def add(self, info: dict, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        """Hold one step's ``info`` (plain values), ``loss`` ``()`` and the batch means of ``metrics`` (``(B,)`` each)."""
        self.hold(info, self.step_values(loss, metrics))

    def step_values(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[loss, batch mean of each metric]`` as one float tensor on the device (what :meth:`hold` takes):
        computed inside a captured step too, whose replays rewrite it."""
        self.names = tuple(metrics)
        means = [value.detach().mean() for value in metrics.values()]
        return torch.stack([loss.detach(), *means])

    def hold(self, info: dict, values: torch.Tensor) -> None:
        """Hold one step's ``info`` and its :meth:`step_values` (on the device; read at the next flush)."""
        self.pending.append((info, values))

    def flush(self, last_good: str) -> list[dict]:
        if not self.pending:
            return []
        values = self.ctx.mean(torch.stack([v for _, v in self.pending]).float()).tolist()
        now = time.perf_counter()
        rate = len(self.pending) * self.local_batch * self.ctx.world_size / max(now - self.window_start, 1e-9)
        self.window_start = now
        records = []
        for (info, _), (loss, *means) in zip(self.pending, values):
            metrics = dict(zip(self.names, means))
            if not math.isfinite(loss):
                self._write(records)
                parts = ", ".join(f"{name} {value}" for name, value in metrics.items())
                raise NonFiniteLossError(
                    f"the loss became {loss} at step {info['step']} ({parts}); training stopped "
                    f"and {last_good}. {self.advice}"
                )
            records.append({**info, "loss": loss, **metrics, "samples_per_s": rate})
        self.pending.clear()
        self._write(records)
        return records

    def _write(self, records: list[dict]) -> None:
        if self.path is not None and records:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
