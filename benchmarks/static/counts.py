"""Kernels launched, bytes kept for the backward and modelled bytes moved, per op and per training step.

Counted on the CPU, for what a GPU would run (see :mod:`benchmarks.static.capture`):

* ``eager``: the reference path, one event per ATen call that launches a kernel;
* ``fastvae``: the Triton path, its launches recorded (not run: the kernels'
  work does not change what is launched, kept or moved) plus the ATen calls
  around them; the launch planner sized for an H100;
* ``compile``: ``torch.compile`` of the reference. Only what it keeps for the
  backward is counted (its partitioner decides that before any code is
  generated). Its kernels and their traffic are not: Inductor's CPU backend
  emits one C++ function per graph with several loop nests, fused otherwise
  than its GPU backend does, and this CPU build of torch cannot generate the
  GPU code.

Every implementation also gets a *graph floor*: what a pass would move as one
kernel, reading each input once and writing each output once (the forward's
outputs include what it keeps for the backward; the backward reads those, the
upstream gradients, and writes the input gradients).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

import torch

from benchmarks.ops import OpCase, _grad_outputs, implementation, op_cases
from benchmarks.static.capture import (
    Event,
    KernelCounter,
    Launch,
    LaunchRecorder,
    SavedTensors,
    counting,
    cuda_like_philox,
    footprint_bytes,
    planning_for_h100,
    summarise,
)
from benchmarks.train_step import IMAGE_SHAPE, MODELS, PRECISIONS, build_model

HEADLINE_ELEMENTS = 1 << 24
IMPLS = ("eager", "compile", "fastvae")
TRAIN_IMPLS = ("eager", "compile", "fastvae", "fastvae+compile")
CPU = torch.device("cpu")


def headline_cases(dtypes: list[torch.dtype], max_elements: int = HEADLINE_ELEMENTS) -> list[OpCase]:
    """Each op, variant and sample shape of the runner's default grid at its largest size up to ``max_elements``
    (the vector quantizer's cases are counted apart, by :mod:`benchmarks.static.vq`)."""
    chosen: dict[tuple, OpCase] = {}
    for case in op_cases("default", dtypes):
        if case.notes.get("counted_apart"):
            continue
        key = (case.op, case.variant, case.shape[1:], case.dtype)
        if case.elements <= max_elements and (key not in chosen or case.elements > chosen[key].elements):
            chosen[key] = case
    return list(chosen.values())


def _bytes(tensors) -> int:
    return sum(footprint_bytes(t) for t in tensors if isinstance(t, torch.Tensor))


def _unit_bytes(case: OpCase) -> int:
    return case.elements * torch.tensor([], dtype=case.dtype).element_size()


@contextlib.contextmanager
def _as_on_a_gpu():
    """Launch planning for an H100 and Philox counters without ATen calls, as on a GPU."""
    with planning_for_h100(), cuda_like_philox(), _hidden_counting_mode(), _many_compiles():
        yield


@contextlib.contextmanager
def _many_compiles():
    """Every case compiles its own static-shape graph: never fall back to eager after a few (as the runner does)."""
    config = torch._dynamo.config
    saved = config.recompile_limit, config.accumulated_recompile_limit
    config.recompile_limit, config.accumulated_recompile_limit = 1024, 4096
    try:
        yield
    finally:
        config.recompile_limit, config.accumulated_recompile_limit = saved


@contextlib.contextmanager
def _hidden_counting_mode():
    """Code that asks whether it is being traced (a dispatch mode is on) must not take the counter for a tracer."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    def current_mode():
        mode = _get_current_dispatch_mode()
        return None if isinstance(mode, KernelCounter) else mode

    modules = [
        m
        for name, m in list(sys.modules.items())
        if name.startswith("fastvae") and getattr(m, "_get_current_dispatch_mode", None) is not None
    ]
    originals = [(m, m._get_current_dispatch_mode) for m in modules]
    for m in modules:
        m._get_current_dispatch_mode = current_mode
    try:
        yield
    finally:
        for m, original in originals:
            m._get_current_dispatch_mode = original


def count_op(case: OpCase, impl_name: str, launches: list[Launch] | None = None, execute: bool = False) -> dict:
    """Counts of one implementation of ``case``: forward (autograd on), then backward from the runner's gradients."""
    torch.manual_seed(0)
    impl = implementation(case, impl_name)
    inputs = case.make_inputs(CPU)
    wrt = [inputs[name] for name in case.grad_wrt if inputs.get(name) is not None]
    input_tensors = [t for t in inputs.values() if isinstance(t, torch.Tensor)]
    result = {}
    with _as_on_a_gpu():
        compile_s = None
        if impl_name == "compile":
            start = time.perf_counter()
            warm = impl(inputs)
            torch.autograd.grad(warm, wrt, _grad_outputs(warm, inputs))
            compile_s = time.perf_counter() - start
            del warm
        forward, backward = [], []
        count = contextlib.nullcontext() if impl_name == "compile" else counting(forward, launches, execute=execute)
        with SavedTensors() as saved, count:
            out = impl(inputs)
        grads_out = _grad_outputs(out, inputs)
        count = contextlib.nullcontext() if impl_name == "compile" else counting(backward, launches, execute=execute)
        with count:
            grads = torch.autograd.grad(out, wrt, grads_out)
    if impl_name != "compile":
        result["forward"], result["backward"] = summarise(forward), summarise(backward)
    result["saved_bytes"] = saved.bytes()
    result["saved_beyond_inputs"] = saved.bytes(exclude=input_tensors)
    kept_new = result["saved_beyond_inputs"]
    result["graph_floor"] = {
        "forward": _bytes(wrt_or_read(case, inputs)) + _bytes(out) + kept_new,
        "backward": result["saved_bytes"] + _bytes(grads_out) + _bytes(grads),
    }
    if compile_s is not None:
        result["compile_s"] = round(compile_s, 2)
    return result


def wrt_or_read(case: OpCase, inputs: dict) -> list[torch.Tensor]:
    """The tensors a forward reads: every tensor input but the upstream gradient kept for the backward and the
    tensors whose views are the inputs (named with a leading ``_``)."""
    return [
        t for name, t in inputs.items() if isinstance(t, torch.Tensor) and name != "grad_z" and not name.startswith("_")
    ]


def case_name(case: OpCase) -> str:
    variant = f" ({case.variant})" if case.variant else ""
    return f"{case.op}{variant} {'x'.join(map(str, case.shape))} {str(case.dtype).replace('torch.', '')}"


def count_ops(
    cases: list[OpCase], impls=IMPLS, launches: dict[str, list[Launch]] | None = None, log=print
) -> list[dict]:
    """One record per case, with the counts of each implementation; ``launches[case name]`` gets fastvae's."""
    records = []
    for case in cases:
        record = {
            "op": case.op,
            "variant": case.variant,
            "shape": list(case.shape),
            "dtype": str(case.dtype).replace("torch.", ""),
            "elements": case.elements,
            "unit_bytes": _unit_bytes(case),
            "impls": {},
        }
        for impl in impls:
            start = time.perf_counter()
            recorded = launches.setdefault(case_name(case), []) if launches is not None else None
            record["impls"][impl] = count_op(case, impl, recorded)
            log(
                f"  counted {case.op} {case.variant} {tuple(case.shape)} {record['dtype']} {impl} "
                f"in {time.perf_counter() - start:.1f} s"
            )
        records.append(record)
    return records


# ---- training steps ---------------------------------------------------------------------------------------------


def count_train_step(
    model_name: str,
    batch: int,
    impl: str,
    launches: list[Launch] | None = None,
    execute: bool = False,
    precision: str = "fp32",
) -> dict:
    """Counts of one steady-state training step (forward, backward, Adam) of a model of :data:`MODELS`.

    Adam runs with ``foreach=True``, its default on CUDA (one launch per
    ``_foreach`` call for these parameter sizes); its step counters live on
    the host there and are left out. The step counted is the second: the first
    creates Adam's state. ``precision="bf16"`` runs the step under CPU
    autocast to bfloat16, whose lists of ops cast are close to CUDA's, not the
    same. Host reads (what on a GPU would be syncs) are counted per phase.
    """
    torch.manual_seed(0)
    backend = "triton" if impl.startswith("fastvae") else "torch"
    dtype = PRECISIONS[precision]
    with _as_on_a_gpu(), LaunchRecorder(execute=execute):  # launches outside the counted phases
        model = build_model(model_name, backend)
        forward_fn = torch.compile(model) if impl.endswith("compile") else model
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
        x = torch.rand(batch, *IMAGE_SHAPE).round()

        def step(record: bool):
            """One step; with ``record``, its kernels are counted phase by phase (never under torch.compile,
            which a dispatch mode would send back to eager)."""
            optimizer.zero_grad(set_to_none=True)
            phases = {phase: [] for phase in ("forward", "backward", "optimizer")}
            syncs = {phase: [] for phase in phases}

            def count(phase, **kw):
                if not record:
                    return contextlib.nullcontext()
                return counting(phases[phase], launches, execute=execute, syncs=syncs[phase], **kw)

            with SavedTensors() as saved, count("forward"):
                with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = forward_fn(x).loss
            with count("backward"):
                loss.backward()
            host = {id(s["step"]) for s in optimizer.state.values() if "step" in s}
            with count("optimizer", host=host):
                optimizer.step()
            return phases, syncs, saved

        start = time.perf_counter()
        step(record=False)
        first_s = time.perf_counter() - start
        phases, syncs, saved = step(record=not impl.endswith("compile"))
    params = list(model.parameters())
    result = {"saved_bytes": saved.bytes(), "saved_beyond_inputs": saved.bytes(exclude=params + [x])}
    if not impl.endswith("compile"):
        for phase, events in phases.items():
            result[phase] = summarise(events)
            result[phase]["host_syncs"] = len(syncs[phase])
        result["step"] = summarise([e for events in phases.values() for e in events])
        result["step"]["host_syncs"] = sum(len(v) for v in syncs.values())
        result["step"]["host_reads"] = [name for v in syncs.values() for name in v]
    else:
        result["compile_s"] = round(first_s, 2)
    return result


def count_train_steps(
    batches: dict[str, int], impls=TRAIN_IMPLS, launches: dict[str, list[Launch]] | None = None, log=print
) -> list[dict]:
    """One record per model of :data:`MODELS` (batch ``batches[model]`` or ``batches["*"]``), fp32."""
    return count_train_cases(
        [(name, batches.get(name, batches["*"]), "fp32") for name in MODELS], impls, launches, log
    )


def count_train_cases(
    cases: list[tuple[str, int, str]],
    impls=TRAIN_IMPLS,
    launches: dict[str, list[Launch]] | None = None,
    log=print,
    regime: str = "throughput",
) -> list[dict]:
    """One record per ``(model, batch, precision)`` with the counts of each implementation."""
    records = []
    for model_name, batch, precision in cases:
        record = {
            "model": model_name,
            "batch": batch,
            "precision": precision,
            "regime": regime,
            "image_shape": list(IMAGE_SHAPE),
            "impls": {},
        }
        for impl in impls:
            start = time.perf_counter()
            name = f"{model_name} training step, batch {batch}, {precision}"
            recorded = launches.setdefault(name, []) if launches is not None and impl == "fastvae" else None
            record["impls"][impl] = count_train_step(model_name, batch, impl, recorded, precision=precision)
            log(
                f"  counted the {model_name} step at batch {batch} {precision} {impl} "
                f"in {time.perf_counter() - start:.1f} s"
            )
        records.append(record)
    return records


def events_of(fn, execute: bool = False) -> list[Event]:
    """The kernel events of ``fn()``, counted as a GPU would launch them (for tests)."""
    events: list[Event] = []
    with _as_on_a_gpu(), counting(events, execute=execute):
        fn()
    return events


def units(nbytes: int, unit: int) -> float:
    return nbytes / unit if unit else math.nan
