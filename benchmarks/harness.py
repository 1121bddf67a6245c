"""Measuring: time, copy bandwidth, peak and saved memory, kernel counts, and what machine this is.

On a GPU, times are medians of ``triton.testing.do_bench`` (CUDA events, L2
flushed before every run, after warm-up). On the CPU (smoke mode) they are
medians of wall-clock runs: enough to check the benchmarks work, not numbers
to compare GPUs with.
"""
from __future__ import annotations

import datetime
import functools
import itertools
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

COPY_BYTES = 1 << 30  # large enough to stream through any L2


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of one call of ``fn``, in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return median_ms_after_setup(lambda: None, lambda _: fn(), device, rep_ms=rep_ms)


def median_ms_after_setup(
    setup: Callable[[], object], fn: Callable[[object], object], device: torch.device, *, rep_ms: int = 100
) -> float:
    """Median time of ``fn(setup())`` in milliseconds, timing ``fn`` alone.

    For passes that need fresh state each time, such as a backward through a
    graph that may be used once: ``setup`` builds it untimed, then (on a GPU)
    the L2 cache is flushed, as ``do_bench`` does, and ``fn`` is timed with
    CUDA events.
    """
    fn(setup())  # warm-up
    on_gpu = device.type == "cuda"
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device) if on_gpu else None
    times: list[float] = []
    deadline = time.perf_counter() + 4 * rep_ms / 1000
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 100):
        state = setup()
        if on_gpu:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(state)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn(state)
            times.append((time.perf_counter() - begin) * 1000)
        del state
    return statistics.median(times)


def copy_bandwidth(device: torch.device, n_bytes: int = COPY_BYTES) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        n_bytes = min(n_bytes, 1 << 26)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def rotating(items: list) -> Callable[[], object]:
    """A callable that returns ``items`` in turn: prebuilt input sets, so that no run finds its inputs in cache."""
    return functools.partial(next, itertools.cycle(items))


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory allocated by torch during one call of ``fn`` (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def kernel_count(fn: Callable[[], object], device: torch.device) -> int | None:
    """How many GPU kernels one call of ``fn`` launches (CUDA only; ``fn`` already warmed up)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    # Memcpy/memset entries are copies, not kernels.
    return sum(1 for e in kernels if not e.name.lower().startswith(("memcpy", "memset")))


def host_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """How many times one call of ``fn`` makes the host wait for the device (CUDA only; ``fn`` warmed up).

    Counted by CUDA's sync debug mode, which warns at each synchronizing call
    (a device-to-host copy, ``.item()``, ``nonzero``, a stream synchronize).
    """
    if device.type != "cuda":
        return None
    import warnings

    synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def device_name(device: torch.device) -> str:
    """A folder-friendly name: ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def provenance(device: torch.device, command: str) -> dict:
    """Where and how the numbers were measured."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["sm_count"] = props.multi_processor_count
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["driver"] = _nvidia_driver()
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
