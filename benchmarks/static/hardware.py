"""An H100 (SXM, sm_90) as the static audit models it: occupancy limits, issue rate, pipes and bandwidth.

These are estimates from datasheet figures and static instruction counts, not
measurements: the GPU run (``bash benchmarks/gpu_check.sh``) settles them.
"""

from __future__ import annotations

import math

SMS = 132
SUBPARTITIONS = 4  # warp schedulers per SM, each issuing one warp-instruction per cycle
WARP = 32
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256  # registers, allocated per warp
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024  # the driver's per-block reservation on sm_80 and later
CLOCK_HZ = 1.98e9  # boost clock of the H100 SXM; sustained clocks can be lower, which favours "issue-bound"
# A device-to-device copy on this workplace's H100 moved about 3.0 TB/s counting bytes read and written
# (.library/device/KINDS.md, 2026-11-13); the datasheet says 3.35 TB/s.
BANDWIDTH_BYTES_PER_S = 3.0e12

# Results per clock per SM of the pipes that can limit these kernels (CUDA C++ Programming Guide,
# throughput of arithmetic instructions, compute capability 9.0). Everything else only takes an issue slot.
PIPE_THROUGHPUT = {"fp32": 128, "alu": 64, "mufu": 16, "conversion": 16}
_PIPES = {
    "fp32": ("FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2"),
    "alu": (
        "IMAD",
        "IADD3",
        "IADD",
        "ISETP",
        "LOP3",
        "LOP",
        "SHF",
        "SHL",
        "SHR",
        "LEA",
        "IMNMX",
        "SEL",
        "IABS",
        "FSETP",
        "FSEL",
        "FMNMX",
        "FSET",
        "MOV",
        "PRMT",
        "P2R",
        "R2P",
        "PLOP3",
        "VIMNMX",
    ),
    "mufu": ("MUFU",),
    "conversion": ("F2F", "F2I", "I2F", "I2FP", "F2FP", "FRND", "F2IP"),
}
PIPE_OF = {opcode: pipe for pipe, opcodes in _PIPES.items() for opcode in opcodes}


def thread_instructions_per_second() -> float:
    return SMS * SUBPARTITIONS * WARP * CLOCK_HZ


def occupancy(registers: int, shared_bytes: int, num_warps: int) -> dict:
    """Resident warps per SM for a kernel of ``num_warps`` warps per block, and what limits them."""
    per_warp = math.ceil(registers * WARP / REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    limits = {
        "registers": (REGISTERS_PER_SM // max(per_warp, 1)) // num_warps,
        "shared memory": SHARED_PER_SM // (shared_bytes + SHARED_RESERVED_PER_BLOCK),
        "warps": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    blocks = min(limits.values())
    limiter = min(limits, key=limits.get)
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * num_warps,
        "occupancy": blocks * num_warps / MAX_WARPS_PER_SM,
        "limited_by": limiter,
    }


def bound(instructions_per_element: float, pipe_per_element: dict[str, float], bytes_per_element: float) -> dict:
    """Whether an element costs more issue (or pipe) time than memory time on an H100: an estimate.

    ``instructions_per_element`` counts thread-instructions on the executed
    path; ``pipe_per_element`` the same split by pipe (see :data:`PIPE_OF`).
    """
    times = {"issue": instructions_per_element / thread_instructions_per_second()}
    for pipe, count in pipe_per_element.items():
        times[pipe] = count / (SMS * PIPE_THROUGHPUT[pipe] * CLOCK_HZ)
    limiter = max(times, key=times.get)
    memory = bytes_per_element / BANDWIDTH_BYTES_PER_S if bytes_per_element else 0.0
    ratio = times[limiter] / memory if memory else math.inf
    return {
        "compute_limiter": limiter,
        "compute_ns_per_kelement": times[limiter] * 1e12,
        "memory_ns_per_kelement": memory * 1e12,
        "compute_over_memory": ratio,
        "label": "issue-bound" if ratio > 1 else "memory-bound",
    }


def describe() -> str:
    """The figures used, for the results' header."""
    per_byte = thread_instructions_per_second() / BANDWIDTH_BYTES_PER_S
    return (
        f"H100 SXM model: {SMS} SMs x {SUBPARTITIONS} schedulers x {WARP} lanes at {CLOCK_HZ / 1e9:.2f} GHz "
        f"= {thread_instructions_per_second() / 1e12:.1f} T thread-instructions/s against "
        f"{BANDWIDTH_BYTES_PER_S / 1e12:.1f} TB/s: {per_byte:.1f} thread-instructions per byte moved; pipes per "
        f"SM per clock: "
        + ", ".join(f"{p} {n}" for p, n in PIPE_THROUGHPUT.items())
        + f"; {REGISTERS_PER_SM} registers, {SHARED_PER_SM // 1024} KiB shared memory, {MAX_WARPS_PER_SM} warps "
        f"and {MAX_BLOCKS_PER_SM} blocks per SM"
    )
