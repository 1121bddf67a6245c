"""Philox seed and counter offset for noise drawn inside a kernel, taken from torch's generators.

A CUDA generator is itself a Philox generator: its state is a seed and an
offset counting the 32-bit values each thread has consumed, in steps of four
(one Philox round gives four). A kernel that needs ``n_rounds`` Philox rounds
takes the seed and ``offset // 4`` as its first counter and advances the
offset by ``4 * n_rounds``, as PyTorch's own CUDA kernels do. Our counters then
lie in the counter range that the generator hands out, so they never overlap
those of an earlier or later call, ours or torch's: ``torch.manual_seed``
makes runs reproducible and consecutive calls draw fresh noise.

A CPU generator (Mersenne Twister) has no Philox offset; for the CPU
interpreter each call draws a fresh 63-bit key from it instead, with counters
starting at zero. That is reproducible under ``torch.manual_seed`` too.

CUDA graphs. A state read on the host at launch would be frozen into a captured
graph, which would then replay the same noise. Under capture
(:func:`needs_device_state`) the state is drawn on the device instead
(:func:`device_philox_state`): one ``torch.randint`` call writes a random key
and a random first counter, both below ``2**62``, into an int64 ``(2,)``
tensor, which the kernels read from memory. torch's own RNG kernels are
capture-aware: a captured graph records the Philox offsets they take, and each
replay starts them where the generator's offset then is and advances it (see
PyTorch's note "CUDA Graph-safe RNG states", ``at::cuda::philox::unpack``; the
generator's device-side offset is not exposed to Python), so every replay draws
a fresh key, reproducibly under ``torch.manual_seed``. A random key is its own
Philox stream: two such calls, or one and an eager call (whose key is the
generator's seed), share counters only if their keys collide (odds of
``2**-62`` per pair). Outside capture the host path stays: it launches
nothing, where the device path costs one tiny extra kernel per call.
"""
from __future__ import annotations

import contextlib

import torch

# Key and first counter of a device-drawn state lie below this: a call's counters (< 2**62 rounds) never overflow.
DEVICE_STATE_BOUND = 2**62
_forced_device_state = False

_INT64_RANGE = 2**64


def default_generator(device: torch.device) -> torch.Generator:
    """torch's default generator for ``device``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    if device.type == "cpu":
        return torch.default_generator
    raise ValueError(f"no Philox generator for {device.type} tensors")


def cpu_philox_key(generator: torch.Generator) -> int:
    """A fresh 63-bit Philox key drawn from a CPU generator.

    The one place where fastvae reads a tensor's value on the host: a CPU
    tensor, drawn for the CPU interpreter, with no device to wait for.
    """
    return int(torch.randint(0, 2**63 - 1, (), generator=generator))


def philox_seed_offset(generator: torch.Generator | None, device: torch.device, n_rounds: int) -> tuple[int, int]:
    """Reserve ``n_rounds`` Philox rounds: return ``(seed, first_counter)`` and advance the generator.

    The seed comes back as a signed 64-bit integer (the bits of the unsigned
    seed), so it fits an ``int`` argument of a custom op; Triton's Philox
    reinterprets it as unsigned.
    """
    if _capturing(device):
        raise RuntimeError(
            "fastvae reads the generator's state on the host here, which a CUDA graph would freeze: under manual "
            "torch.cuda.graph capture the op draws its state on the device by itself; under torch.compile's CUDA "
            "graphs (mode='reduce-overhead') pass eps"
        )
    generator = default_generator(device) if generator is None else generator
    if generator.device.type == "cpu":
        return cpu_philox_key(generator), 0
    offset = generator.get_offset()
    generator.set_offset(offset + 4 * n_rounds)
    seed = generator.initial_seed()
    if seed >= 2**63:
        seed -= _INT64_RANGE
    return seed, offset // 4


def _capturing(device: torch.device) -> bool:
    """Whether work for ``device`` is being captured into a CUDA graph now (a host-side query: no sync)."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def needs_device_state(device: torch.device) -> bool:
    """Whether noise for ``device`` must take its Philox state from the device: under CUDA-graph capture, or
    inside :func:`philox_state_on_device`."""
    return _forced_device_state or _capturing(device)


@contextlib.contextmanager
def philox_state_on_device():
    """Inside this block every call draws its Philox state on the device (:func:`device_philox_state`), as under
    capture: for the eager warm-up steps before a capture (so they compile the same kernels and draw noise the
    way the replays will), and for testing the device path on the CPU."""
    global _forced_device_state
    previous, _forced_device_state = _forced_device_state, True
    try:
        yield
    finally:
        _forced_device_state = previous


def device_philox_state(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A fresh Philox ``[key, first_counter]``, int64 ``(2,)`` on ``device``, drawn by ``torch.randint`` from
    ``generator`` (default: the device's): capture-aware, so a CUDA graph's replays each draw a new one."""
    return torch.randint(0, DEVICE_STATE_BOUND, (2,), generator=generator, device=device, dtype=torch.int64)
