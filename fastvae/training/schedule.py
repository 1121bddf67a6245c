"""The learning-rate schedule of a run: a pure function of the optimizer step.

The loop sets the optimizer's learning rate from :func:`learning_rate` before
every step, so a resumed run follows the schedule of an uninterrupted one
exactly (nothing but the step and the run's length is needed; there is no
scheduler state to save), and ``metrics.jsonl``'s ``lr`` is the value the step used.
"""

from __future__ import annotations

import math

# The choices of --lr-schedule: the peak learning rate throughout, or a cosine decay from it to 0 over the run.
LR_SCHEDULES = ("constant", "cosine")


def learning_rate(peak: float, schedule: str, step: int, total_steps: int) -> float:
    """The learning rate of the optimizer step ``step`` (from 0) of a run of ``total_steps`` steps.

    ``"constant"``: ``peak``. ``"cosine"``: ``peak * (1 + cos(pi * step / total_steps)) / 2``,
    from ``peak`` at step 0 down towards 0 (reached at ``total_steps``, one past the last step).
    """
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    raise ValueError(f"unknown lr_schedule {schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
