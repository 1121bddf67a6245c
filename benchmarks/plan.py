"""The runner's plan: every case in order of importance, each with an estimated cost, run within a time budget.

A GPU is available to this project for one 10-minute command at a time, so
``python -m benchmarks --budget-s S`` runs the cases tier by tier and starts
a case only if its estimate still fits; what does not fit is recorded as
skipped, with the reason, in ``results.json``. The tiers (change the order
in :data:`TIERS`):

1. ``headline``: each op and variant at 2**24 elements, float32 and
   bfloat16, eager against torch.compile against fastvae, at the first
   per-sample shape (the ratios the README quotes);
2. ``train target``: the training step at the batch of the speed target;
3. ``launch-bound target``: the MLP VAE's step at batch 128 (issue 12's
   goal: 3x eager, as fast as ``torch.compile(mode="reduce-overhead")``, no
   host sync), with CUDA graphs where the checkout can capture the step;
4. ``headline, more shapes``: the other cases of 2**24 elements and above;
5. ``train``: the other training steps (the other launch-bound batches too);
6. ``noise``: ``tl.randn``, ``tl.randn4x`` and fastvae's generator;
7. ``sweep``: the rest of the grid (smaller sizes, the launch-bound sweep).

Estimates: the compile time of a case's ``torch.compile`` implementations as
measured on the CPU by ``python -m benchmarks --static``
(``benchmarks/results/static/results.json``; GPU compiles differ, so this is
a guide) plus a fixed cost per timed pass and its runs at a few times the
bandwidth floor. After a GPU run, ``results.json`` holds each case's real
seconds to calibrate against.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HEADLINE = 1 << 24
BANDWIDTH_FOR_ESTIMATES = 3.0e12  # bytes/s: an H100's measured copy bandwidth (.library/device/KINDS.md)
SECONDS_PER_PASS = 0.6  # do_bench's warm-up (25 ms) and repetitions (100 ms), the kernel count, per pass
RUNS_PER_PASS = 60  # timed runs per pass (warm-up + repetitions) at several times the floor
SLOWDOWN = 5.0  # how far above the bandwidth floor the slowest implementation may run
DEFAULT_COMPILE_S = 15.0  # a case with no measured compile time
COMPILE_WARMUP_S = 30.0  # the first torch.compile of a process (the static run's first case took ~40 s)
TRAIN_STEP_S = 2.0  # timing one training step implementation, beyond compiling
TARGET_BATCH = 16384
LAUNCH_BOUND_TARGET = ("mlp", 128)  # issue 12: the MLP VAE at batch 128
TIERS = ("headline", "train target", "launch-bound target", "headline, more shapes", "train", "noise", "sweep")
STATIC_RESULTS = Path(__file__).parent / "results" / "static" / "results.json"


@dataclass
class Item:
    """One case of the plan: what it is, its tier, its estimated seconds, and how to run it."""

    tier: str
    name: str
    estimate_s: float
    run: Callable[[], list[dict]]
    compiles: bool = False  # runs torch.compile
    status: str = "planned"
    seconds: float | None = None
    detail: str = ""

    def record(self) -> dict:
        return {
            "tier": self.tier,
            "case": self.name,
            "estimate_s": round(self.estimate_s, 1),
            "status": self.status,
            "seconds": None if self.seconds is None else round(self.seconds, 1),
            "detail": self.detail,
        }


@dataclass
class CompileTimes:
    """torch.compile times measured on the CPU by the static run, per op and per training model and impl."""

    ops: dict = field(default_factory=dict)  # op -> [seconds of each of its cases]
    train: dict = field(default_factory=dict)  # (model, impl) -> seconds

    @classmethod
    def load(cls, path: Path = STATIC_RESULTS) -> "CompileTimes":
        if not path.exists():
            return cls()
        payload = json.loads(path.read_text())
        times = cls()
        for r in payload.get("ops", []):
            seconds = r["impls"].get("compile", {}).get("compile_s")
            if seconds is not None:
                times.ops.setdefault(r["op"], []).append(seconds)
        for r in payload.get("train", []):
            for impl, counts in r["impls"].items():
                if counts.get("compile_s") is not None:
                    times.train[(r["model"], impl)] = counts["compile_s"]
        return times

    def op(self, case) -> float:
        """The median over the op's measured cases: the first compile of a process also pays a warm-up."""
        seconds = sorted(self.ops.get(case.op, []))
        return seconds[len(seconds) // 2] if seconds else DEFAULT_COMPILE_S


def op_estimate(case, impls, compile_times: CompileTimes) -> float:
    from benchmarks.ops import PASSES

    floor_s = case.floor_bytes["forward+backward"] / BANDWIDTH_FOR_ESTIMATES
    per_pass = SECONDS_PER_PASS + RUNS_PER_PASS * SLOWDOWN * floor_s
    compile_s = compile_times.op(case) if "compile" in impls else 0.0
    return compile_s + len(impls) * len(PASSES) * per_pass


def train_estimate(case, impls, compile_times: CompileTimes) -> float:
    """Compile times as measured on the CPU (``compile reduce-overhead`` as ``compile``: the CUDA graphs it records
    cost steps, not compiling), plus :data:`TRAIN_STEP_S` per implementation."""
    compile_s = sum(
        compile_times.train.get((case.model, i.removesuffix(" reduce-overhead")), DEFAULT_COMPILE_S)
        for i in impls
        if "compile" in i
    )
    return compile_s + len(impls) * TRAIN_STEP_S


def train_tier(case) -> str:
    if case.regime == "launch-bound":
        return "launch-bound target" if (case.model, case.batch) == LAUNCH_BOUND_TARGET else "train"
    return "train target" if case.batch == TARGET_BATCH and case.model in ("mlp", "conv") else "train"


def op_tier(case, first_shape: dict) -> str:
    if case.nominal_elements < HEADLINE:
        return "sweep"
    if case.nominal_elements < 2 * HEADLINE and first_shape.get((case.op, case.variant)) == tuple(case.shape[1:]):
        return "headline"
    return "headline, more shapes"


def order(items: list[Item]) -> list[Item]:
    """Tier by tier, keeping each tier's own order; the first item that compiles also pays the warm-up."""
    items = sorted(items, key=lambda item: TIERS.index(item.tier))
    first = next((item for item in items if item.compiles), None)
    if first is not None:
        first.estimate_s += COMPILE_WARMUP_S
    return items


def run_within(
    items: list[Item], budget_s: float | None, log=print, on_progress: Callable[[list[dict]], None] | None = None
) -> list[dict]:
    """Run ``items`` in order, starting each only if its estimate fits what is left of ``budget_s``.

    A case that fails is recorded with its error and the run goes on. Returns
    the records of the cases run; each item's status says what happened to it.
    """
    start = time.perf_counter()
    records: list[dict] = []
    for i, item in enumerate(items, 1):
        elapsed = time.perf_counter() - start
        if budget_s is not None and elapsed + item.estimate_s > budget_s:
            item.status = "skipped"
            item.detail = f"budget: {elapsed:.0f} s used of {budget_s:.0f} s, estimate {item.estimate_s:.0f} s"
            continue
        log(f"[{i}/{len(items)}] {item.tier}: {item.name} (estimate {item.estimate_s:.0f} s, " f"{elapsed:.0f} s used)")
        begin = time.perf_counter()
        try:
            records += item.run()
            item.status = "done"
        except Exception as error:  # noqa: BLE001 - one failing case must not lose the others' results
            item.status = "failed"
            item.detail = f"{type(error).__name__}: {error}"[:500]
            log(traceback.format_exc())
        item.seconds = time.perf_counter() - begin
        if on_progress is not None:
            on_progress(records)
    return records


def describe(items: list[Item], budget_s: float | None) -> str:
    """The plan as a table: order, tier, case, estimate, and (after :func:`simulate`) what a run would do."""
    lines = [f"{'#':>3}  {'tier':<22} {'estimate':>8} {'start':>6}  case"]
    used = 0.0
    for i, item in enumerate(items, 1):
        skipped = item.status == "skipped"
        start = "—" if skipped else f"{used:.0f}s"
        lines.append(
            f"{i:>3}  {item.tier:<22} {item.estimate_s:>7.0f}s {start:>6}  {item.name}"
            + ("  (skipped: budget)" if skipped else "")
        )
        used += 0 if skipped else item.estimate_s
    runs = sum(item.status != "skipped" for item in items)
    total = sum(item.estimate_s for item in items)
    limit = "no limit" if budget_s is None else f"{budget_s:.0f} s"
    lines.append(
        f"{runs} of {len(items)} cases fit a budget of {limit} by their estimates ({used:.0f} s of {total:.0f} s for all)"
    )
    return "\n".join(lines)


def simulate(items: list[Item], budget_s: float | None) -> None:
    """Mark what a run with estimates as real times would do (for ``--dry-run``)."""
    used = 0.0
    for item in items:
        if budget_s is not None and used + item.estimate_s > budget_s:
            item.status, item.detail = "skipped", f"budget: estimate {item.estimate_s:.0f} s does not fit"
        else:
            item.status, used = "would run", used + item.estimate_s
