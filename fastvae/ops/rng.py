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
"""
from __future__ import annotations

import torch

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
    generator = default_generator(device) if generator is None else generator
    if generator.device.type == "cpu":
        return cpu_philox_key(generator), 0
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fastvae draws its noise from the generator's state when a kernel is launched, which a CUDA graph "
            "would freeze; pass eps explicitly inside CUDA graph capture"
        )
    offset = generator.get_offset()
    generator.set_offset(offset + 4 * n_rounds)
    seed = generator.initial_seed()
    if seed >= 2**63:
        seed -= _INT64_RANGE
    return seed, offset // 4
