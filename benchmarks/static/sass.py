"""Reading a cubin: resource usage (``cuobjdump -res-usage``) and the SASS (``cuobjdump -sass``).

The instruction count that matters is that of the path a program executes,
not the file's: the file also holds slow paths that a tile never takes, such
as libdevice's sin/cos range reduction for large arguments (Payne-Hanek,
reading a table of 2/pi with ``LDG.E.CONSTANT``; the Box-Muller angle lies in
[0, 2*pi) and never takes it) and IEEE division's subroutine for denormal or
huge operands (``CALL.REL``). :func:`executed_path` walks the code as one
program with one trip through the main loop would run it: forward branches
fall through, loops run once, and a branch that skips a slow path (a
``BSSY``/``BSYNC`` region holding such code) is taken. What it leaves out is
reported as ``cold``.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from benchmarks.static.hardware import PIPE_OF

_INSTRUCTION = re.compile(
    r"/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<pred>@!?U?P[T0-9]+\s+)?(?P<op>[A-Z][A-Z0-9_.]*)(?P<rest>[^;]*);"
)
_TARGET = re.compile(r"0x([0-9a-f]+)")
_RESOURCES = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")
MEMORY_WIDTH_BITS = {".128": 128, ".64": 64, ".U16": 16, ".S16": 16, ".U8": 8, ".S8": 8}
GLOBAL_LOADS = ("LDG", "LD")
GLOBAL_STORES = ("STG", "ST")
SPILLS = ("LDL", "STL")


@dataclass(frozen=True)
class Instruction:
    addr: int
    predicated: bool
    opcode: str  # with modifiers: "LDG.E.128"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def target(self) -> int | None:
        match = _TARGET.search(self.operands)
        return int(match.group(1), 16) if match else None


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of a one-function SASS listing, in address order."""
    out = []
    for m in _INSTRUCTION.finditer(text):
        out.append(
            Instruction(int(m.group("addr"), 16), m.group("pred") is not None, m.group("op"), m.group("rest").strip())
        )
    return out


def parse_resource_usage(text: str) -> dict[str, int]:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` of the (one) function in ``cuobjdump -res-usage`` output."""
    function = text[text.index("Function") :] if "Function" in text else text
    return {key.lower(): int(value) for key, value in _RESOURCES.findall(function)}


def is_slow_path_code(ins: Instruction) -> bool:
    """Code that marks a slow path: libdevice's table loads for trig range reduction, or a call to a subroutine."""
    return (ins.base in GLOBAL_LOADS and ".CONSTANT" in ins.opcode) or ins.base == "CALL"


def slow_path_joins(code: list[Instruction]) -> set[int]:
    """Addresses of the ``BSYNC`` closing each ``BSSY`` region that holds slow-path code.

    A forward branch to one of them, from inside its region, skips the slow path.
    """
    by_addr = {ins.addr: i for i, ins in enumerate(code)}
    joins = set()
    for i, ins in enumerate(code):
        if ins.base != "BSSY" or ins.target is None:
            continue
        end = by_addr.get(ins.target, len(code))
        region = code[i + 1 : end]
        if region and region[-1].base == "BSYNC" and any(is_slow_path_code(r) for r in region):
            joins.add(region[-1].addr)
    return joins


@dataclass
class ExecutedPath:
    executed: list[Instruction]
    loop_body: int  # instructions executed inside the loops, one trip
    loops: int  # loops the path went through
    innermost: list[Instruction] | None = None  # those executed inside the innermost loops (holding no other)


def executed_path(code: list[Instruction], max_steps: int = 200_000) -> ExecutedPath:
    """The instructions one program executes, each loop once, slow paths skipped (see the module docstring).

    Conditional branches fall through, with three exceptions that keep the
    walk on one trip of each loop and off the slow paths: a branch that skips a
    slow path is taken; an exit test followed by straight-line code up to a
    loop's unconditional back edge (a bottom-tested loop) is taken; and once
    a loop's unconditional back edge has been taken, the next test that leaves
    the loop (a top-tested loop) is taken. A conditional back edge (do-while)
    falls through.
    """
    by_addr = {ins.addr: i for i, ins in enumerate(code)}
    joins = slow_path_joins(code)
    loops = [
        (ins.target, ins.addr) for ins in code if ins.base == "BRA" and ins.target is not None and ins.target < ins.addr
    ]
    executed: list[Instruction] = []
    second_trip: set[tuple[int, int]] = set()
    pc = 0
    while pc < len(code):
        if len(executed) >= max_steps:
            raise RuntimeError("the SASS walk did not end: a loop shape this walker does not know")
        ins = code[pc]
        executed.append(ins)
        bottom_test = ins.base in ("EXIT", "BRA") and ins.predicated and _before_a_back_edge(code, pc)
        if ins.base == "EXIT":
            if not ins.predicated or bottom_test or _leaves(ins, None, second_trip):
                break
        elif ins.base == "BRA" and ins.target is not None:
            target = ins.target
            if not ins.predicated:
                if target < ins.addr:
                    if (target, ins.addr) in second_trip:
                        raise RuntimeError(f"loop at {ins.addr:#x} did not end after one trip")
                    second_trip.add((target, ins.addr))
                pc = by_addr[target]
                continue
            leaves = target > ins.addr and (bottom_test or _leaves(ins, target, second_trip))
            if leaves or target in joins:
                pc = by_addr[target]
                continue
        pc += 1
    hot_loops = [(lo, hi) for lo, hi in loops if any(lo <= ins.addr <= hi for ins in executed)]
    body = sum(1 for ins in executed if any(lo <= ins.addr <= hi for lo, hi in hot_loops))
    innermost = [
        (lo, hi) for lo, hi in hot_loops if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in hot_loops)
    ]
    inner = [ins for ins in executed if any(lo <= ins.addr <= hi for lo, hi in innermost)]
    return ExecutedPath(executed, body, len(hot_loops), inner)


CONTROL = ("BRA", "EXIT", "CALL", "RET", "BSSY", "BSYNC", "BRX", "JMP", "WARPSYNC")


def _before_a_back_edge(code: list[Instruction], pc: int) -> bool:
    """Whether ``code[pc]`` is a loop's bottom test: in the loop's second half, with only straight-line code
    between it and the loop's unconditional back edge (after LLVM's loop rotation the test sits there; a top
    test sits at the loop's head)."""
    test = code[pc]
    for ins in code[pc + 1 :]:
        if ins.base in CONTROL:
            back_edge = ins.base == "BRA" and not ins.predicated and ins.target is not None and ins.target < ins.addr
            return back_edge and ins.target < test.addr and ins.addr - test.addr < test.addr - ins.target
    return False


def _leaves(ins: Instruction, target: int | None, second_trip: set[tuple[int, int]]) -> bool:
    """Whether ``ins`` (a conditional exit or branch to ``target``) leaves a loop already run once."""
    return any(lo <= ins.addr <= hi and (target is None or target > hi) for lo, hi in second_trip)


def memory_widths(instructions: list[Instruction], kinds: tuple[str, ...]) -> dict[int, int]:
    """How many of ``instructions`` of the given base opcodes move each width in bits: ``{128: 8, 32: 1}``."""
    widths: Counter = Counter()
    for ins in instructions:
        if ins.base in kinds and not is_slow_path_code(ins):
            bits = next((b for suffix, b in MEMORY_WIDTH_BITS.items() if suffix in ins.opcode), 32)
            widths[bits] += 1
    return dict(sorted(widths.items(), reverse=True))


def pipe_counts(instructions: list[Instruction]) -> dict[str, int]:
    counts: Counter = Counter()
    for ins in instructions:
        pipe = PIPE_OF.get(ins.base)
        if pipe:
            counts[pipe] += 1
    return dict(counts)


def analyse(sass_text: str, resource_text: str) -> dict:
    """Everything the audit reads off one kernel's cubin (counts per thread, not yet per element)."""
    code = parse_sass(sass_text)
    # The tail of a listing is padding: a branch to itself after the last EXIT, then NOPs.
    static = [ins for ins in code if ins.base != "NOP" and not (ins.base == "BRA" and ins.target == ins.addr)]
    path = executed_path(code)
    hot = path.executed
    return {
        "resources": parse_resource_usage(resource_text),
        "static_instructions": len(static),
        "executed_instructions": len(hot),
        "cold_instructions": len(static) - len({ins.addr for ins in hot}),
        "loop_body_instructions": path.loop_body,
        "innermost_loop_instructions": len(path.innermost),
        "innermost_pipes": pipe_counts(path.innermost),
        "loops": path.loops,
        "spill_instructions": sum(1 for ins in hot if ins.base in SPILLS),
        "local_instructions_off_path": sum(1 for ins in static if ins.base in SPILLS)
        - len({ins.addr for ins in hot if ins.base in SPILLS}),
        "global_loads": memory_widths(hot, GLOBAL_LOADS),
        "global_stores": memory_widths(hot, GLOBAL_STORES),
        "pipes": pipe_counts(hot),
        "mix": dict(Counter(ins.base for ins in hot).most_common(8)),
    }


def cuobjdump(cubin: bytes, workdir: Path) -> tuple[str, str]:
    """``(sass, res-usage)`` text of a cubin, with the cuobjdump that Triton's wheel ships."""
    tool = nvidia_tool("cuobjdump")
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    return sass, res


def nvidia_tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not in Triton's wheel here ({path}); the static audit needs it")
    return str(path)
