"""One process's place in a training job: its rank, the number of processes, its device.

``torchrun --nproc-per-node N -m fastvae train ...`` starts N processes with
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in their environment;
:func:`start_distributed` joins them into one process group (NCCL between
GPUs, Gloo between CPU processes). Without torchrun the job has one process
and no process group, and every collective below is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastvae.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Distributed:
    """This process's place in a (possibly one-process) job."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value):
        """``value`` as rank 0 has it (any picklable object)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def decide_on_main(self, decide):
        """Run ``decide()`` on rank 0 only and share its result, or its ConfigError, with every rank."""
        result, message = None, None
        if self.is_main:
            try:
                result = decide()
            except ConfigError as err:
                message = str(err)
        result, message = self.broadcast((result, message))
        if message is not None:
            raise ConfigError(message)
        return result

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise mean of ``tensor`` over ranks."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """The device for ``choice`` (``"auto"``: this process's GPU when there is one, else the CPU)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but torch sees no CUDA device; use --device cpu")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def start_distributed(device_choice: str) -> Distributed:
    """Join the torchrun job described by the environment (``WORLD_SIZE``, ``RANK``, ...), if any.

    NCCL connects GPUs, Gloo CPU processes. Without torchrun this is a one-process job.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if world_size == 1:
        return Distributed(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def stop_distributed(ctx: Distributed) -> None:
    """Leave the process group that :func:`start_distributed` joined."""
    if ctx.world_size > 1:
        dist.destroy_process_group()
