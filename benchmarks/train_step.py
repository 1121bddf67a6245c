"""End-to-end benchmark: one optimizer step of fastvae's models on 28x28 images.

The implementations of the same model and step (forward, backward, Adam):

* ``eager``: the reference path (``backend="torch"``), plain PyTorch;
* ``compile``: the reference path under ``torch.compile``;
* ``fastvae``: the fused Triton ops (``backend="triton"``), eager otherwise;
* ``fastvae+compile``: the fused ops inside a compiled model;

and, for the launch-bound regime (issue 12: small batches, where launching
kernels and waiting for the device decide the speed):

* ``compile reduce-overhead``: the reference under ``torch.compile(mode="reduce-overhead")``
  (Inductor's CUDA graphs);
* ``fastvae+cuda-graphs``: the fused ops, the whole step (forward, backward,
  fused capturable Adam) captured once as a CUDA graph and replayed, by the
  machinery of ``fastvae train --cuda-graphs``
  (:class:`fastvae.training.cuda_graph.GraphedStep`). Where capture fails, or
  there is no GPU, the case records the reason and goes on.

Each reports the median step time, samples/s and the peak memory of a step,
and on a GPU the kernels launched per step (profiler) and the host syncs per
step (``torch.cuda.set_sync_debug_mode("warn")``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from benchmarks.harness import host_syncs, kernel_count, median_ms, peak_memory_bytes, rotating, synchronize
from benchmarks.iwae import iwae_model
from fastvae.models import HierarchicalVAE, conv_vae, mlp_vae

IMPLS = ("eager", "compile", "fastvae", "fastvae+compile")
LAUNCH_BOUND_IMPLS = ("eager", "compile", "compile reduce-overhead", "fastvae", "fastvae+cuda-graphs")
IMAGE_SHAPE = (1, 28, 28)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
# The models benchmarked (and counted by ``python -m benchmarks --static``): name -> builder(backend).
MODELS = {
    "mlp": lambda backend: mlp_vae(IMAGE_SHAPE, backend=backend),
    "conv": lambda backend: conv_vae(IMAGE_SHAPE[0], IMAGE_SHAPE[1], backend=backend),
    "hvae": lambda backend: HierarchicalVAE(IMAGE_SHAPE, backend=backend),
    "mlp-dmol": lambda backend: mlp_vae(IMAGE_SHAPE, likelihood="dmol", backend=backend),
    # The MLP VAE on the importance-weighted bound (--objective iwae): the reference path is the bound written the
    # usual way (benchmarks/iwae.py), the fused one VAE(iwae_k=K).
    "mlp-iwae5": lambda backend: iwae_model(5, backend),
    "mlp-iwae50": lambda backend: iwae_model(50, backend),
}


class Unavailable(RuntimeError):
    """An implementation this machine or checkout cannot run (recorded with its reason, not as a failure)."""


@dataclass(frozen=True)
class TrainCase:
    model: str  # a key of MODELS
    batch: int
    precision: str  # "fp32" or "bf16"
    regime: str = "throughput"  # or "launch-bound": small batches, with the CUDA-graph implementations

    @property
    def impls(self) -> tuple[str, ...]:
        return LAUNCH_BOUND_IMPLS if self.regime == "launch-bound" else IMPLS

    @property
    def name(self) -> str:
        label = " (launch-bound)" if self.regime == "launch-bound" else ""
        return f"{self.model} step{label}, batch {self.batch}, {self.precision}"


def build_model(model: str, backend: str) -> torch.nn.Module:
    return MODELS[model](backend)


def make_step(case: TrainCase, impl: str, device: torch.device):
    """A callable running one training step on the next of two prebuilt batches of binary images."""
    torch.manual_seed(0)
    backend = "triton" if impl.startswith("fastvae") else "torch"
    model = build_model(case.model, backend).to(device)
    next_batch = rotating([torch.rand(case.batch, *IMAGE_SHAPE, device=device).round() for _ in range(2)])
    dtype = PRECISIONS[case.precision]
    if impl == "fastvae+cuda-graphs":
        return _graphed_step(model, next_batch, dtype, device)
    if impl == "compile reduce-overhead":
        if device.type != "cuda":
            raise Unavailable("mode='reduce-overhead' captures CUDA graphs: it needs a GPU")
        forward = torch.compile(model, mode="reduce-overhead")
    else:
        forward = torch.compile(model) if impl.endswith("compile") else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = forward(next_batch()).loss
        loss.backward()
        optimizer.step()

    return step


def _graphed_step(model: torch.nn.Module, next_batch, dtype, device: torch.device):
    """The whole step (forward, backward, fused capturable Adam) captured as one CUDA graph by
    :class:`fastvae.training.cuda_graph.GraphedStep`, as ``fastvae train --cuda-graphs`` captures it: eager
    warm-up calls, then each call copies the next batch into the graph's input and replays. Raises
    :class:`Unavailable` without a GPU, in a checkout without the option, or where capture fails."""
    if device.type != "cuda":
        raise Unavailable("CUDA graphs need a GPU")
    try:
        from fastvae.training.cuda_graph import GraphedStep
    except ImportError as error:
        raise Unavailable(f"this checkout has no fastvae.training.cuda_graph ({error})") from error
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True, fused=True)

    def body(x):
        optimizer.zero_grad(set_to_none=False)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False):
            loss = model(x).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    graphed = GraphedStep(body, device)

    def step():
        graphed({"x": next_batch()})

    try:
        for _ in range(graphed.warmup + 1):  # the warm-up calls, then the capture and its first replay
            step()
    except Exception as error:  # noqa: BLE001 - the reason is the result
        raise Unavailable(f"capture failed: {type(error).__name__}: {error}"[:300]) from error
    return step


def measure_train_case(case: TrainCase, device: torch.device, impls=None) -> list[dict]:
    """Time one step per implementation; compile time (the first steps) is reported apart. An implementation
    this machine cannot run gets a record with ``skipped`` (the reason) and no time."""
    records = []
    for impl in impls or case.impls:
        base = {
            "suite": "train", "op": case.model, "variant": case.regime, "pass": "step",
            "shape": [case.batch, *IMAGE_SHAPE], "elements": case.batch * 784, "dtype": case.precision,
            "impl": impl, "floor_bytes": None,
        }
        try:
            step = make_step(case, impl, device)
        except Unavailable as reason:
            records.append({**base, "skipped": str(reason)})
            continue
        synchronize(device)
        start = time.perf_counter()
        step()
        step()  # torch.compile builds the graphs of the first and the steady-state step
        synchronize(device)
        first_ms = (time.perf_counter() - start) * 1000
        ms = median_ms(step, device)
        records.append({
            **base, "ms": ms, "samples_per_s": case.batch / (ms * 1e-3), "first_call_ms": first_ms,
            "peak_bytes": peak_memory_bytes(step, device), "kernels": kernel_count(step, device),
            "host_syncs": host_syncs(step, device),
        })
        del step
    return records


# Batch sizes per grid: "*" for every model, or a model's own.
# The IWAE's steps decode K images per image: batches of K x 128 and up.
_IWAE_BATCHES = {"mlp-iwae5": (128, 1024, 4096), "mlp-iwae50": (128, 1024)}
GRID_BATCHES = {
    "smoke": {"*": (64,), "mlp": (256,), "hvae": (16,), "mlp-dmol": (16,), "mlp-iwae5": (16,), "mlp-iwae50": (16,)},
    "default": {"*": (256, 4096, 16384), "mlp": (256, 1024, 4096, 16384, 65536), "hvae": (256, 2048),
                "mlp-dmol": (256, 4096), **_IWAE_BATCHES},
    "full": {"*": (256, 1024, 4096, 16384, 65536), "hvae": (256, 1024, 4096), "mlp-dmol": (256, 1024, 4096, 16384),
             **_IWAE_BATCHES},
}
# The launch-bound regime (issue 12 §4): every grid but the smoke one.
LAUNCH_BOUND_BATCHES = {"mlp": (128, 512, 2048), "conv": (128,)}


def train_cases(grid: str, precisions: list[str]) -> list[TrainCase]:
    batches = GRID_BATCHES[grid]
    cases = [TrainCase(model, batch, p) for p in precisions for model in MODELS
             for batch in batches.get(model, batches["*"])]
    if grid != "smoke":
        cases += [TrainCase(model, batch, p, "launch-bound") for p in precisions
                  for model, sizes in LAUNCH_BOUND_BATCHES.items() for batch in sizes]
    return cases
