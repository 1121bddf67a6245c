"""Counting what code launches, moves and keeps, on the CPU.

* :class:`LaunchRecorder` records every Triton launch (grid, arguments,
  constexprs), runs it or not (``execute=False`` skips the kernel: its outputs
  stay uninitialised, which is fine for counting and lets counts run at the
  benchmark's sizes, far beyond what the interpreter runs in seconds).
* :class:`KernelCounter` is a ``TorchDispatchMode`` that records every ATen
  call that launches a kernel on a GPU: views, metadata ops and allocations
  without a fill are left out. fastvae's custom ops are opened up, so the ATen
  calls inside them (a sum of partial results, say) are counted too.
* :class:`SavedTensors` records the storages autograd keeps for the backward
  (``torch.autograd.graph.saved_tensors_hooks``).

Modelled memory traffic: an ATen kernel reads each tensor argument and writes
each output once; a Triton kernel reads and writes the pointer arguments its
entry in :data:`benchmarks.static.kernels.KERNELS` names. A tensor's bytes are
its footprint: the elements of its view, counting a broadcast (stride-0) dim
once.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

# ATen ops that launch nothing on a GPU: allocation without a fill, metadata, host-side reads.
NO_KERNEL_OPS = {
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "detach",
    "detach_",
    "lift_fresh",
    "set_",
    "resize_",
    "as_strided_",
    "_unsafe_view",
    "alias",
    "_local_scalar_dense",
    "item",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "is_same_size",
    "record_stream",
    "squeeze_",
    "unsqueeze_",
    "t_",
    "transpose_",
    "_has_compatible_shallow_copy_type",
    "is_nonzero",
    "equal",
    "size",
    "stride",
    "dim",
    "numel",
}
# ATen ops that read a tensor's value on the host: on a GPU each makes the host wait for the device (a sync).
# (``item()``, ``bool()``, ``int()`` and ``float()`` of a tensor reach the dispatcher as ``_local_scalar_dense``.)
HOST_READ_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "masked_select", "unique"}
# Tensor methods that copy to the host without reaching the dispatcher on CPU tensors (counted in Python).
HOST_COPY_METHODS = ("cpu", "numpy", "tolist")
# Ops that write their first argument without reading it.
WRITE_ONLY_OPS = {
    "fill_",
    "zero_",
    "normal_",
    "uniform_",
    "random_",
    "bernoulli_",
    "exponential_",
    "copy_",
    "_foreach_zero_",
    "_foreach_copy_",
}
# Ops that take only the shape (and dtype) of their tensor arguments.
SHAPE_ONLY_OPS = {
    "zeros_like",
    "ones_like",
    "full_like",
    "randn_like",
    "rand_like",
    "randint_like",
    "new_zeros",
    "new_ones",
    "new_full",
    "scalar_tensor",
    "zeros",
    "ones",
    "full",
    "randn",
    "rand",
}


def footprint_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements a view addresses, a broadcast (stride-0) dim counted once."""
    if t.numel() == 0:
        return 0
    elements = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return elements * t.element_size()


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    return (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())


@dataclass
class Event:
    """One kernel launch: an ATen call or a Triton kernel."""

    kind: str  # "aten" or "triton"
    name: str
    read_bytes: int
    write_bytes: int
    detail: dict = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    """Footprint of ``tensors``, each (storage, offset, shape, strides) counted once."""
    seen, total = set(), 0
    for t in tensors:
        key = (_storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen.add(key)
            total += footprint_bytes(t)
    return total


def _aliases_an_input(outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> bool:
    storages = {_storage_key(t) for t in inputs}
    return bool(outputs) and all(_storage_key(t) in storages for t in outputs)


class KernelCounter(TorchDispatchMode):
    """Records an :class:`Event` for every ATen call that would launch a GPU kernel.

    ``host`` holds tensors that would live on the CPU on a GPU machine (an
    optimizer's step counters): calls on those alone are left out.
    """

    def __init__(self, events: list[Event], host: set[int] | None = None, syncs: list[str] | None = None):
        super().__init__()
        self.events = events
        self.host = host or set()
        self.syncs = syncs if syncs is not None else []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastvae":
            return self._open_custom_op(func, args, kwargs)
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        inputs, outputs = _tensors((args, kwargs)), _tensors(out)
        if name in HOST_READ_OPS and not all(id(t) in self.host for t in inputs):
            self.syncs.append(name)
        if name in NO_KERNEL_OPS:
            return out
        if not any(t.numel() for t in inputs + outputs):
            return out
        if inputs + outputs and all(id(t) in self.host for t in inputs + outputs):
            return out
        written = [a for a, arg in zip(args, func._schema.arguments) if arg.alias_info and arg.alias_info.is_write]
        written = _tensors(written)
        if not written and _aliases_an_input(outputs, inputs):
            # A view, or an op that may return its input (.to, reshape, contiguous) and did: nothing launched.
            # One that may alias but made a new tensor (a .to that converts) launched a copy, and counts.
            return out
        read = inputs
        if name in SHAPE_ONLY_OPS:
            read = []
        elif name in WRITE_ONLY_OPS:
            read = [t for t in inputs if not any(t is w for w in written[:1])]
        self.events.append(
            Event(
                "aten",
                str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else name,
                _unique_bytes(read),
                _unique_bytes(written + outputs),
            )
        )
        return out

    def _open_custom_op(self, func, args, kwargs):
        """Run one of fastvae's custom ops with this mode still on, so the calls inside it count."""
        from torch._library.custom_ops import OPDEFS

        opdef = OPDEFS.get(func._schema.name)
        impl = getattr(opdef, "_init_fn", None) if opdef is not None else None
        if impl is None:
            return func(*args, **kwargs)  # opaque: only its Triton launches are seen
        with self:
            return impl(*args, **kwargs)


@dataclass
class Launch:
    """A Triton launch: the kernel, its grid, its arguments by name, and its launch options."""

    module: str
    kernel: str
    grid: tuple
    args: dict  # name -> value (tensors as tensors)
    constexprs: dict
    options: dict  # num_warps, num_stages, ...
    read_bytes: int = 0
    write_bytes: int = 0
    elements: int = 0  # elements the launch covers (its kernel's spec)

    def job(self) -> dict:
        """A description the sm_90 compiler (another process) can rebuild the launcher's specialisation from."""
        return {
            "module": self.module,
            "kernel": self.kernel,
            "args": [_describe(v) for v in self.args.values()],
            "kwargs": {**self.constexprs, **self.options},
        }


def _describe(value) -> dict:
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", ""), "ptr_mod16": value.data_ptr() % 16}
    if value is None:
        return {"none": None}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": value}
    raise TypeError(f"cannot describe a kernel argument of type {type(value).__name__}")


class LaunchRecorder:
    """Within ``with LaunchRecorder(events, launches):`` every Triton launch is recorded; ``execute`` runs it too."""

    def __init__(self, events: list[Event] | None = None, launches: list[Launch] | None = None, execute: bool = True):
        self.events = events if events is not None else []
        self.launches = launches if launches is not None else []
        self.execute = execute
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        for cls in (InterpretedFunction, JITFunction):
            self._stack.enter_context(_patched(cls, "run", self._wrap(cls.run)))
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def _wrap(self, original):
        recorder = self

        def run(kernel, *args, grid, warmup, **kwargs):
            if not warmup:
                recorder.record(kernel, grid, args, kwargs)
            if not recorder.execute:
                return None
            with _disable_current_modes():  # the interpreter's own copies are not the program's kernels
                return original(kernel, *args, grid=grid, warmup=warmup, **kwargs)

        return run

    def record(self, kernel, grid, args, kwargs) -> Launch:
        from benchmarks.static.kernels import kernel_spec

        fn = kernel.fn
        params = list(inspect.signature(fn).parameters)
        bound = dict(zip(params, args))
        constexprs = {k: v for k, v in kwargs.items() if k in params}
        bound.update({k: v for k, v in constexprs.items() if k not in bound})
        values = {k: v for k, v in bound.items() if k not in constexprs}
        options = {k: v for k, v in kwargs.items() if k not in params}
        spec = kernel_spec(fn.__module__, fn.__name__)
        with _disable_current_modes():  # a condition that reads the arguments (scale_rows' weights) is not a kernel
            reads, writes = spec.accessed(constexprs, values)
        launch = Launch(
            fn.__module__,
            fn.__name__,
            tuple(grid),
            values,
            constexprs,
            options,
            _unique_bytes([values[a] for a in reads]),
            _unique_bytes([values[a] for a in writes]),
            spec.count_elements(values),
        )
        self.launches.append(launch)
        self.events.append(
            Event(
                "triton",
                launch.kernel,
                launch.read_bytes,
                launch.write_bytes,
                {"grid": list(launch.grid), "constexprs": dict(constexprs), "num_warps": options.get("num_warps")},
            )
        )
        return launch


@contextlib.contextmanager
def _patched(owner, name, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


class SavedTensors:
    """The unique storages autograd keeps for the backward while this is entered."""

    def __init__(self):
        self.storages: dict[tuple[int, int], dict] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key[1] and key not in self.storages:
            self.storages[key] = {"bytes": key[1], "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def bytes(self, exclude: list[torch.Tensor] = ()) -> int:
        """Bytes of the saved storages, leaving out those of ``exclude`` (inputs alive anyway)."""
        skip = {_storage_key(t) for t in exclude}
        return sum(s["bytes"] for key, s in self.storages.items() if key not in skip)


def summarise(events: list[Event]) -> dict:
    """Kernel launches and modelled bytes of a list of events."""
    return {
        "kernels": len(events),
        "aten_kernels": sum(e.kind == "aten" for e in events),
        "triton_kernels": sum(e.kind == "triton" for e in events),
        "read_bytes": sum(e.read_bytes for e in events),
        "write_bytes": sum(e.write_bytes for e in events),
        "bytes": sum(e.bytes for e in events),
        "launches": [e.name for e in events],
    }


@contextlib.contextmanager
def counting(
    events: list[Event],
    launches: list[Launch] | None = None,
    *,
    execute: bool = False,
    host: set[int] | None = None,
    syncs: list[str] | None = None,
):
    """Record ATen kernels and Triton launches into ``events`` (and ``launches``), and host reads into ``syncs``.

    A host read (what would be a sync on a GPU) is an ATen call of :data:`HOST_READ_OPS`, or a call of
    :data:`HOST_COPY_METHODS` or ``.to("cpu")`` on a tensor from code outside torch (on CPU tensors those
    return without reaching the dispatcher); tensors in ``host`` (an optimizer's step counters, which live on
    the host on a GPU too) are left out.
    """
    syncs = syncs if syncs is not None else []
    with _host_copies(syncs, host or set()), LaunchRecorder(events, launches, execute=execute), KernelCounter(
        events, host, syncs
    ):
        yield


@contextlib.contextmanager
def _host_copies(syncs: list[str], host: set[int]):
    """Count calls of :data:`HOST_COPY_METHODS` and ``.to("cpu")`` made by code outside torch into ``syncs``."""
    import sys

    def wrap(name, method):
        def counted(tensor, *args, **kwargs):
            to_host = name != "to" or any(
                isinstance(v, (str, torch.device)) and torch.device(v).type == "cpu"
                for v in (*args, kwargs.get("device"))
            )
            caller = sys._getframe(1).f_globals.get("__name__", "")
            # torch's internals, and Triton's interpreter running a kernel on the CPU, are not the step's code.
            if to_host and id(tensor) not in host and caller.split(".")[0] not in ("torch", "triton"):
                syncs.append(name)
            return method(tensor, *args, **kwargs)

        return counted

    with contextlib.ExitStack() as stack:
        for name in (*HOST_COPY_METHODS, "to"):
            stack.enter_context(_patched(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name))))
        yield


@contextlib.contextmanager
def planning_for_h100():
    """Make fastvae's launch planner size grids for an H100 (132 SMs), as it would on the GPU the counts model."""
    from benchmarks.static import hardware
    from fastvae.kernels import launch

    original = launch.target_programs
    launch.target_programs = lambda device: launch.PROGRAMS_PER_SM * hardware.SMS
    try:
        yield
    finally:
        launch.target_programs = original


@contextlib.contextmanager
def cuda_like_philox():
    """Reserve Philox counters as on a CUDA generator (no ATen call) instead of drawing a CPU key (two calls).

    On a GPU the seed and offset come from the generator's state without a
    kernel; on the CPU fastvae draws a fresh key with ``torch.randint``, which
    would otherwise count as a kernel that a GPU does not launch.
    """
    import sys

    counter = [0]

    def philox_seed_offset(generator, device, n_rounds):
        first = counter[0]
        counter[0] += n_rounds
        return 0x5EED_0F_FA57_FAE, first

    modules = [
        m for name, m in list(sys.modules.items()) if name.startswith("fastvae.") and hasattr(m, "philox_seed_offset")
    ]
    with contextlib.ExitStack() as stack:
        for module in modules:
            stack.enter_context(_patched(module, "philox_seed_offset", philox_seed_offset))
        yield
