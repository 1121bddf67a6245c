"""Vector quantization's memory, counted on the CPU at issue 19's sizes: ``python -m benchmarks.static.vq``.

What fastvae's fused op and the distance-matrix implementations allocate, hold and move for one forward and
backward of N = 65,536 vectors of D = 64 against K = 512, 16,384 and 65,536 codes, in float32 and bfloat16 (z and
the codebook both learning by gradient; z_q gets an upstream gradient, the summed loss 1):

* ``fastvae``: :func:`fastvae.functional.vector_quantize` on the Triton path, on CPU tensors, its launches recorded
  and not run (:mod:`benchmarks.static.capture`), the ATen calls around them counted as usual;
* ``cdist`` and ``einsum``, eager: :func:`benchmarks.ops.vq_distance_matrix` (``torch.cdist`` as diffusers, the
  expanded einsum as vector-quantize-pytorch) on ``meta`` tensors: every ATen call with its true shapes, nothing
  allocated, so a 17 GB matrix counts without being there. An ATen kernel that allocates inside itself
  (``_euclidean_dist``, cdist's matrix product) shows only its output: the baselines' true figures are higher;
* ``cdist`` and ``einsum`` under ``torch.compile``: the code Inductor generates for them (its CPU backend, static
  shapes at a small size whose N, K and D are distinct primes), read for the buffers each graph allocates and
  frees; each dim is mapped back to an expression of N, K and D (:data:`DIM_FORMS`) and the allocation plan is
  evaluated at the issue's sizes. Kernels and bytes moved are not counted for it (its GPU code differs).

Per pass: kernels launched and bytes moved (an ATen kernel reads its tensor arguments and writes its outputs
once, a Triton kernel what ``benchmarks/static/kernels.py`` names), the largest tensor allocated, the peak of the
bytes allocated in the pass and alive at once (beyond the inputs, the outputs included; tracked by
:class:`LiveBytes` after every ATen call), and the bytes the forward keeps for the backward.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.ops import VQ_BETA, VQ_DIM, VQ_VECTORS, vq_distance_matrix
from benchmarks.static.capture import counting, footprint_bytes, summarise

CODES = (512, 16384, 65536)
DTYPES = (torch.float32, torch.bfloat16)
BASELINES = ("cdist", "einsum")
# The small size Inductor's code is read at: distinct primes, so that each dim names one expression.
PROBE = {"N": 97, "K": 61, "D": 29}
# What a dim of a compiled buffer may be, in terms of N, K and D (cdist pads each vector with two values).
DIM_FORMS = {
    "1": lambda s: 1,
    "N": lambda s: s["N"],
    "K": lambda s: s["K"],
    "D": lambda s: s["D"],
    "D + 2": lambda s: s["D"] + 2,
    "N K": lambda s: s["N"] * s["K"],
    "N D": lambda s: s["N"] * s["D"],
    "K D": lambda s: s["K"] * s["D"],
}
OUT = Path(__file__).parent.parent / "results" / "static"


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ATen calls allocate and that are still referenced, after every call.

    A storage stays alive while any tensor seen on it (the call's outputs, views of them, and what autograd
    keeps: ``saved_tensors_hooks`` that keep the very tensor) is alive. ``peak`` is the largest total seen,
    ``largest`` the largest single storage; storages of ``exclude`` (the inputs) are not counted.
    """

    def __init__(self, exclude=()):
        super().__init__()
        self.skip = {_storage(t) for t in exclude}
        self.owners: dict[int, tuple[int, list]] = {}
        self.peak = self.largest = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._keep, lambda t: t)

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        # Kept as a detached alias: the saved tensor itself would tie an output to its own node in a cycle that only
        # the garbage collector breaks (autograd saves outputs without their grad_fn for that reason).
        kept = t.detach()
        self._note(kept)
        return kept

    def _note(self, t: torch.Tensor) -> None:
        key = _storage(t)
        if key in self.skip or not t.untyped_storage().nbytes():
            return
        nbytes, refs = self.owners.setdefault(key, (t.untyped_storage().nbytes(), []))
        refs.append(weakref.ref(t))
        self.largest = max(self.largest, nbytes)

    def live(self) -> int:
        for key in [k for k, (_, refs) in self.owners.items() if all(r() is None for r in refs)]:
            del self.owners[key]
        return sum(nbytes for nbytes, _ in self.owners.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._note(t)
        self.peak = max(self.peak, self.live())
        return out

    def __enter__(self):
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._hooks.__exit__(*exc)


def _inputs(device: str, dtype: torch.dtype, n: int, k: int, d: int) -> dict:
    z = torch.empty(n, d, device=device, dtype=dtype).normal_().requires_grad_()
    codebook = torch.empty(k, d, device=device, dtype=dtype).normal_().requires_grad_()
    return {"z": z, "codebook": codebook, "grad_z_q": torch.empty(n, d, device=device, dtype=dtype).normal_()}


def _fastvae(t: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from fastvae.functional import vector_quantize

    z_q, _, loss = vector_quantize(t["z"], t["codebook"], beta=VQ_BETA, reduction="sum", backend="triton")
    return z_q, loss


def count_pass(impl: str, k: int, dtype: torch.dtype, n: int = VQ_VECTORS, d: int = VQ_DIM) -> dict:
    """Kernels, bytes moved, largest allocation, peak live bytes and bytes kept, forward and backward, of the
    eager implementations (``"fastvae"``, ``"cdist"``, ``"einsum"``)."""
    from benchmarks.static.counts import _as_on_a_gpu

    gc.collect()  # what earlier counts left in reference cycles goes now, not in the middle of this one
    torch.manual_seed(0)
    t = _inputs("cpu" if impl == "fastvae" else "meta", dtype, n, k, d)
    run = _fastvae if impl == "fastvae" else (lambda t: vq_distance_matrix(t["z"], t["codebook"], impl))
    wrt, inputs = [t["z"], t["codebook"]], list(t.values())
    result = {}
    with _as_on_a_gpu():
        events: list = []
        # The live bytes' mode below the counter's, which opens fastvae's custom ops: it sees the calls inside them.
        with LiveBytes(inputs) as live, counting(events) if impl == "fastvae" else _aten_events(events):
            z_q, loss = run(t)
        # After the counter is gone (its records of the launches hold their arguments).
        kept = live.live() - sum(footprint_bytes(o) for o in (z_q, loss))
        result["forward"] = {**_summary(events), "largest_bytes": live.largest, "peak_bytes": live.peak,
                             "kept_bytes": kept}
        events = []
        upstream = [t["grad_z_q"], torch.ones_like(loss)]
        with LiveBytes(inputs + [z_q, loss]) as live, counting(events) if impl == "fastvae" else _aten_events(events):
            grads = torch.autograd.grad([z_q, loss], wrt, upstream)
        result["backward"] = {**_summary(events), "largest_bytes": live.largest, "peak_bytes": live.peak}
        del grads
    return result


@contextlib.contextmanager
def _aten_events(events: list):
    """The ATen counter alone, for meta tensors (no Triton launches to record), with storages told apart by
    identity: a meta storage's address is 0, so the counter's usual key would take every output of an input's
    size for a view of it."""
    from benchmarks.static import capture

    original = capture._storage_key
    capture._storage_key = lambda t: (_storage(t), t.untyped_storage().nbytes())
    try:
        with capture.KernelCounter(events):
            yield
    finally:
        capture._storage_key = original


def _summary(events) -> dict:
    s = summarise(events)
    return {"kernels": s["kernels"], "triton_kernels": s["triton_kernels"], "bytes": s["bytes"],
            "launches": s["launches"]}


# ---- torch.compile: Inductor's allocation plan ----------------------------------------------------------------------

_ALLOC = re.compile(r"^\s*(buf\d+) = empty_strided_\w+\(\(([^)]*)\), \([^)]*\), torch\.(\w+)\)")
_ALIAS = re.compile(r"^\s*(buf\d+) = (buf\d+); del (buf\d+)")
_DEL = re.compile(r"^\s*del (buf\d+)\b")
_RETURN = re.compile(r"^\s*return \((.*)\)")


def _dim_form(value: int) -> str:
    for name, form in DIM_FORMS.items():
        if form(PROBE) == value:
            return name
    raise ValueError(f"a buffer dim of {value} is none of {', '.join(DIM_FORMS)} at {PROBE}: extend DIM_FORMS")


def allocation_plan(code: str) -> list[tuple]:
    """The ``call`` function of Inductor's generated code as ``("alloc", buf, dims, dtype)``, ``("free", buf)``,
    ``("alias", new, old)`` and ``("return", [bufs])`` steps, dims as names of :data:`DIM_FORMS`."""
    steps = []
    body = code[code.index("def call(self, args)") :]
    for line in body.splitlines():
        if m := _ALLOC.match(line):
            dims = [int(v) for v in m.group(2).split(",") if v.strip()]
            steps.append(("alloc", m.group(1), [_dim_form(v) for v in dims], m.group(3)))
        elif m := _ALIAS.match(line):
            steps.append(("alias", m.group(1), m.group(2)))
        elif m := _DEL.match(line):
            steps.append(("free", m.group(1)))
        elif m := _RETURN.match(line):
            steps.append(("return", re.findall(r"buf\d+", m.group(1))))
            break
    return steps


def evaluate_plan(steps: list[tuple], sizes: dict, user_outputs: int) -> dict:
    """Peak bytes alive, the largest buffer, and the bytes of the returned buffers beyond the first
    ``user_outputs`` (a forward graph's saved tensors) of an :func:`allocation_plan` at ``sizes``."""
    live: dict[str, int] = {}
    peak = largest = kept = 0
    for step in steps:
        if step[0] == "alloc":
            _, buf, dims, dtype = step
            nbytes = math.prod(DIM_FORMS[d](sizes) for d in dims) * getattr(torch, dtype).itemsize
            live[buf] = nbytes
            largest = max(largest, nbytes)
            peak = max(peak, sum(live.values()))
        elif step[0] == "alias":
            live[step[1]] = live.pop(step[2], 0)
        elif step[0] == "free":
            live.pop(step[1], None)
        else:
            kept = sum(live.get(buf, 0) for buf in step[1][user_outputs:])
    return {"peak_bytes": peak, "largest_bytes": largest, "kept_bytes": kept}


def compiled_plans(distances: str, dtype: torch.dtype) -> tuple[list, list, str]:
    """The forward's and the backward's allocation plans of ``torch.compile(vq_distance_matrix)`` at :data:`PROBE`,
    and the forward's generated code."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    t = _inputs("cpu", dtype, PROBE["N"], PROBE["K"], PROBE["D"])
    compiled = torch.compile(lambda z, e: vq_distance_matrix(z, e, distances), dynamic=False)

    def step():
        z_q, loss = compiled(t["z"], t["codebook"])
        torch.autograd.grad([z_q, loss], [t["z"], t["codebook"]], [t["grad_z_q"], torch.ones_like(loss)])

    _, codes = run_and_get_code(step)
    forward, backward = codes  # compiled in this order
    return allocation_plan(forward), allocation_plan(backward), forward


def count_compiled(distances: str, dtype: torch.dtype, codes=CODES) -> dict[int, dict]:
    forward, backward, _ = compiled_plans(distances, dtype)
    out = {}
    for k in codes:
        sizes = {"N": VQ_VECTORS, "K": k, "D": VQ_DIM}
        out[k] = {"forward": evaluate_plan(forward, sizes, user_outputs=2),
                  "backward": evaluate_plan(backward, sizes, user_outputs=2)}
    return out


# ---- the sm_90 audit of the kernels --------------------------------------------------------------------------------

_TENSOR_CORE = re.compile(r"\b((?:HGMMA|HMMA|IMMA)\.[A-Z0-9x_.]+)")


def tensor_core_instructions(key: str) -> dict[str, int]:
    """The tensor-core instructions (``HGMMA`` is Hopper's warpgroup MMA, ``HMMA`` the older warp MMA) in the SASS of
    the audited variant ``key``, by opcode with its shape and types, from the audit's cache."""
    from collections import Counter

    from benchmarks.static.compile_sm90 import cache_dir

    return dict(Counter(_TENSOR_CORE.findall((cache_dir() / f"{key}.sass").read_text())))


def audit_rows() -> list[dict]:
    """The vector quantizer's kernels as the audit compiles them for sm_90 (its scenarios in
    :data:`benchmarks.static.audit.EXTRA_SCENARIOS`, both dtypes): resources, spills, and the MMA instructions."""
    from benchmarks.static.audit import EXTRA_SCENARIOS, audit_variants
    from benchmarks.static.capture import LaunchRecorder
    from benchmarks.static.counts import _as_on_a_gpu

    launches: dict = {}
    with _as_on_a_gpu():
        for scenario in (s for s in EXTRA_SCENARIOS if s.name.startswith("vector_quantize")):
            for dtype in DTYPES:
                name = f"{scenario.name} {str(dtype).removeprefix('torch.')}"
                with LaunchRecorder(launches=launches.setdefault(name, []), execute=False):
                    scenario.run(dtype)
    rows = []
    for r in audit_variants(launches):
        flags = {k: v for k, v in r["constexprs"].items() if k.isupper()}
        spilled = r["ptxas"] is None or r["ptxas"]["spill_stores"] or r["ptxas"]["spill_loads"]
        rows.append({
            "kernel": r["kernel"], "dtype": r["dtype"], "constexprs": flags, "num_warps": r["num_warps"],
            "registers": r["registers"], "spills": bool(spilled or r["local_bytes"] or r["spill_instructions"]),
            "shared_bytes": r["shared_bytes"], "occupancy": r["occupancy"]["occupancy"],
            "tensor_core": tensor_core_instructions(r["key"]), "used_by": r["used_by"], "key": r["key"],
        })
    return rows


def audit_markdown(rows: list[dict]) -> str:
    lines = [
        "## The kernels compiled for sm_90",
        "",
        "Each variant that the scenarios of `benchmarks/static/audit.py` launch (4,096 vectors of 64 against 512 "
        "codes, codebook by gradient; 1,024 vectors of 200 against 300 codes; a VQ-VAE's 7x7 map slice of 16 "
        "channels at batch 128 with an EMA codebook), as the launcher specialises it, compiled by Triton for sm_90 "
        "and read with `cuobjdump`: registers per thread, spills (ptxas's report and the executed path), shared "
        "memory, occupancy, and the tensor-core instructions in its SASS.",
        "",
        "| kernel | dtype | constexprs | warps | registers | spills | shared | occupancy | tensor-core instructions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        flags = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        mma = ", ".join(f"{n} x `{op}`" for op, n in r["tensor_core"].items()) or "none"
        lines.append(
            f"| `{r['kernel']}` | {r['dtype']} | {flags} | {r['num_warps']} | {r['registers']} | "
            f"{'yes' if r['spills'] else 'no'} | {r['shared_bytes']} | {r['occupancy']:.3f} | {mma} |"
        )
    return "\n".join(lines) + "\n"


# ---- the table -----------------------------------------------------------------------------------------------------


def run_counts(codes=CODES, dtypes=DTYPES, baselines=BASELINES, log=print) -> list[dict]:
    """One record per (K, dtype): the counts of every implementation."""
    records = []
    for dtype in dtypes:
        compiled = {b: count_compiled(b, dtype, codes) for b in baselines}
        for k in codes:
            record = {"n": VQ_VECTORS, "k": k, "d": VQ_DIM, "dtype": str(dtype).removeprefix("torch."), "impls": {}}
            for impl in ("fastvae", *baselines):
                record["impls"][impl] = count_pass(impl, k, dtype)
            for b in baselines:
                record["impls"][f"{b} compile"] = compiled[b][k]
            records.append(record)
            log(f"  counted vector_quantize K={k} {record['dtype']}")
    return records


def _gb(nbytes) -> str:
    return "" if nbytes is None else f"{nbytes / 1e9:.3f}" if nbytes < 1e9 else f"{nbytes / 1e9:.2f}"


def markdown(records: list[dict], command: str) -> str:
    lines = [
        "# Vector quantization: memory held and moved (counted on the CPU)",
        "",
        f"`{command}`; N = {VQ_VECTORS:,} vectors of D = {VQ_DIM}, forward + backward, both z and the codebook "
        "learning by gradient. GB = 10^9 bytes. *peak* is the most bytes allocated in a pass and alive at once "
        "beyond the inputs (outputs included); *kept* what the forward keeps for the backward beyond the inputs; "
        "*largest* the largest single tensor; *moved* what the kernels read and write (each tensor once per kernel; "
        "not counted for torch.compile, whose GPU code differs from the CPU code read here). See "
        "`benchmarks/static/vq.py` for how each is counted.",
        "",
        "| K | dtype | implementation | fwd kernels | fwd moved | fwd peak | fwd largest | kept | bwd kernels | "
        "bwd moved | bwd peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        for impl, c in r["impls"].items():
            f, b = c["forward"], c["backward"]
            lines.append(
                f"| {r['k']:,} | {r['dtype']} | {impl} | {f.get('kernels', '')} | {_gb(f.get('bytes'))} | "
                f"{_gb(f['peak_bytes'])} | {_gb(f['largest_bytes'])} | {_gb(f['kept_bytes'])} | "
                f"{b.get('kernels', '')} | {_gb(b.get('bytes'))} | {_gb(b['peak_bytes'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import os

    os.environ["TRITON_INTERPRET"] = "1"  # the fused op's launches are recorded on CPU tensors
    command = "python -m benchmarks.static.vq"
    import triton

    records = run_counts()
    audit = audit_rows()
    OUT.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "torch": torch.__version__, "triton": triton.__version__, "records": records,
               "audit": audit}
    (OUT / "vector_quantize.json").write_text(json.dumps(payload, indent=1))
    (OUT / "vector_quantize.md").write_text(markdown(records, command) + "\n" + audit_markdown(audit))
    print(f"wrote {OUT}/vector_quantize.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
