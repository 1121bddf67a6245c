"""``fastvae train --cuda-graphs``: the training step captured once as a CUDA graph, then replayed.

A small model's step launches 50 to 100 kernels, each costing more host time
than device time; a replayed graph launches them all at once, without Python.
:class:`GraphedStep` wraps a step function (forward, backward, gradient
clipping, optimizer step, and the step's logged values, computed on the
device), in the pattern of PyTorch's "whole-network capture":

* the first ``warmup`` calls run eagerly on a side stream (kernels compiled,
  the optimizer's state created, the allocator warmed), with every
  ``reparameterize_kl`` drawing its Philox state on the device, as the replays
  will (:func:`fastvae.ops.rng.philox_state_on_device`);
* the next call copies its inputs into static buffers, captures the step
  reading them, and replays it; every later call copies its inputs into those
  buffers and replays. Gradients and the optimizer's state live in the graph's
  memory; the parameters are updated in place.

What the step needs from the trainer: inputs as device tensors (a step input
such as the KL weight too: a CPU scalar would be frozen into the graph as a
constant), an optimizer that is capturable (its step count and learning rate
on the device; the learning rate is set by ``fill_`` before each replay), and
no host read inside the step. Each call returns a copy of the values the
replay wrote (a device-to-device copy, no sync), which the metrics log reads
at its next flush.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from fastvae.ops.rng import philox_state_on_device

WARMUP_STEPS = 3


def capture_cuda_graph(step: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture ``step()`` into a CUDA graph: ``(replay, the tensor the capture returned)``, which each replay
    rewrites. Nothing runs until the first replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        values = step()
    return graph.replay, values


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """Run the block on a side stream of ``device`` (CUDA's warm-up before capture), then rejoin the main one."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)


class GraphedStep:
    """``step(**inputs) -> values`` run eagerly ``warmup`` times, then captured once and replayed with new inputs.

    Args:
        step: one training step on keyword tensor inputs, returning a tensor
            of the values to log (see :meth:`fastvae.training.metrics.MetricsLog.step_values`).
        device: where the step runs; the inputs are copied there.
        warmup: eager calls before the capture.
        capture: how a step is captured (:func:`capture_cuda_graph`); a test
            on the CPU passes one that re-runs the step, to check the rest.
    """

    def __init__(
        self,
        step: Callable[..., torch.Tensor],
        device: torch.device,
        *,
        warmup: int = WARMUP_STEPS,
        capture: Callable = capture_cuda_graph,
    ):
        self.step, self.device, self.warmup, self.capture = step, device, warmup, capture
        self.static: dict[str, torch.Tensor] | None = None
        self.replay: Callable[[], None] | None = None
        self.values: torch.Tensor | None = None

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.replay is None and self.warmup > 0:
            self.warmup -= 1
            with _side_stream(self.device), philox_state_on_device():
                return self.step(**inputs)
        if self.replay is None:
            self.static = {name: value.to(self.device, copy=True, non_blocking=True) for name, value in inputs.items()}
            self.replay, self.values = self.capture(lambda: self.step(**self.static))
        else:
            if inputs.keys() != self.static.keys():
                raise ValueError(f"a captured step takes {sorted(self.static)}, got {sorted(inputs)}")
            for name, value in inputs.items():
                self.static[name].copy_(value, non_blocking=True)
        self.replay()
        return self.values.clone()
