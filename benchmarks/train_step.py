"""End-to-end benchmark: one optimizer step of the MLP and conv VAEs on 28x28 images.

Four implementations of the same model and step (forward, backward, Adam):

* ``eager``: the reference path (``backend="torch"``), plain PyTorch;
* ``compile``: the reference path under ``torch.compile``;
* ``fastvae``: the fused Triton ops (``backend="triton"``), eager otherwise;
* ``fastvae+compile``: the fused ops inside a compiled model.

Each reports the median step time, samples/s and the peak memory of a step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from benchmarks.harness import median_ms, peak_memory_bytes, rotating, synchronize
from fastvae.models import conv_vae, mlp_vae

IMPLS = ("eager", "compile", "fastvae", "fastvae+compile")
IMAGE_SHAPE = (1, 28, 28)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
# The models benchmarked (and counted by ``python -m benchmarks --static``): name -> builder(backend).
MODELS = {
    "mlp": lambda backend: mlp_vae(IMAGE_SHAPE, backend=backend),
    "conv": lambda backend: conv_vae(IMAGE_SHAPE[0], IMAGE_SHAPE[1], backend=backend),
}


@dataclass(frozen=True)
class TrainCase:
    model: str  # "mlp" or "conv"
    batch: int
    precision: str  # "fp32" or "bf16"


def build_model(model: str, backend: str) -> torch.nn.Module:
    return MODELS[model](backend)


def make_step(case: TrainCase, impl: str, device: torch.device):
    """A callable running one training step on the next of two prebuilt batches of binary images."""
    torch.manual_seed(0)
    backend = "triton" if impl.startswith("fastvae") else "torch"
    model = build_model(case.model, backend).to(device)
    forward = torch.compile(model) if impl.endswith("compile") else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    next_batch = rotating([torch.rand(case.batch, *IMAGE_SHAPE, device=device).round() for _ in range(2)])
    dtype = PRECISIONS[case.precision]

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = forward(next_batch()).loss
        loss.backward()
        optimizer.step()

    return step


def measure_train_case(case: TrainCase, device: torch.device, impls=IMPLS) -> list[dict]:
    """Time one step per implementation; compile time (the first steps) is reported apart."""
    records = []
    for impl in impls:
        step = make_step(case, impl, device)
        synchronize(device)
        start = time.perf_counter()
        step()
        step()  # torch.compile builds the graphs of the first and the steady-state step
        synchronize(device)
        first_ms = (time.perf_counter() - start) * 1000
        ms = median_ms(step, device)
        records.append({
            "suite": "train", "op": case.model, "variant": "", "pass": "step",
            "shape": [case.batch, *IMAGE_SHAPE], "elements": case.batch * 784, "dtype": case.precision,
            "impl": impl, "ms": ms, "samples_per_s": case.batch / (ms * 1e-3), "first_call_ms": first_ms,
            "peak_bytes": peak_memory_bytes(step, device), "floor_bytes": None,
        })
        del step
    return records


# Batch sizes per grid: "*" for every model, or a model's own.
GRID_BATCHES = {
    "smoke": {"*": (64,), "mlp": (256,)},
    "default": {"*": (256, 4096, 16384), "mlp": (256, 1024, 4096, 16384, 65536)},
    "full": {"*": (256, 1024, 4096, 16384, 65536)},
}


def train_cases(grid: str, precisions: list[str]) -> list[TrainCase]:
    batches = GRID_BATCHES[grid]
    return [TrainCase(model, batch, p) for p in precisions for model in MODELS
            for batch in batches.get(model, batches["*"])]
