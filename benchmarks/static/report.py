"""``results.md`` of the static audit and the counts."""

from __future__ import annotations

from collections import defaultdict


def _widths(widths: dict) -> str:
    return " ".join(f"{n}x{bits}" for bits, n in sorted(((int(b), n) for b, n in widths.items()), reverse=True)) or "—"


def _flags(constexprs: dict, row: dict | None = None) -> str:
    shown = {k: v for k, v in constexprs.items() if not k.startswith("BLOCK") and not k.startswith("stride")}
    flags = [f"{k}={v}" for k, v in shown.items()]
    if row is not None:
        flags += [a if "!=" in a else f"{a} not ÷16" for a in row.get("unspecialised", [])]
    return ", ".join(flags) or "—"


def _spilled(row: dict) -> str:
    report = row.get("ptxas")
    return "?" if report is None else str(report["spill_stores"] + report["spill_loads"])


def _block(constexprs: dict) -> str:
    blocks = [f"{k.removeprefix('BLOCK_')}={v}" for k, v in constexprs.items() if k.startswith("BLOCK")]
    return " ".join(blocks)


def _kernel(name: str) -> str:
    return name.strip("_").removesuffix("_kernel")


def audit_table(rows: list[dict]) -> list[str]:
    lines = [
        "| kernel | dtype | flags | block | warps | regs | spilled B (ptxas) / stack B / LDL+STL executed | smem B "
        "| warps/SM (limit) "
        "| LDG (count x bits) | STG | instr. executed (cold left out) | slots/thread (per elem.) | instr./elem. | B/elem. "
        "| compute/memory | estimate |",
        "|" + "---|" * 17,
    ]
    for r in rows:
        occ = r["occupancy"]
        bound = r["bound"]
        lines.append(
            f"| {_kernel(r['kernel'])} | {r['dtype']} | {_flags(r['constexprs'], r)} | {_block(r['constexprs'])} "
            f"| {r['num_warps']} | {r['registers']} | {_spilled(r)} / {r['stack_bytes']} / {r['spill_instructions']} "
            f"| {r['shared_bytes']} | {occ['warps_per_sm']} ({occ['limited_by']}) | {_widths(r['global_loads'])} "
            f"| {_widths(r['global_stores'])} | {r['executed_instructions']} ({r['cold_instructions']}) "
            f"| {r['elements_per_thread']:g} ({r['slots_per_element']:.2f}) | {r['instructions_per_element']:.1f} "
            f"| {r['bytes_per_element']:.1f} "
            f"| {bound['compute_over_memory']:.2f} ({bound['compute_limiter']}) | {bound['label']} |"
        )
    return lines


def _u(value, unit) -> str:
    return "—" if value is None else f"{value / unit:.2f}"


def ops_table(ops: list[dict]) -> list[str]:
    lines = [
        "| op | shape | dtype | kernels fwd+bwd: eager / fastvae | units moved fwd+bwd: eager / fastvae "
        "| graph floor fwd+bwd: eager / compile / fastvae | kept beyond inputs: eager / compile / fastvae |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ops:
        unit = r["unit_bytes"]
        e, c, f = (r["impls"].get(k, {}) for k in ("eager", "compile", "fastvae"))

        def kernels(x):
            return f"{x['forward']['kernels']}+{x['backward']['kernels']}" if "forward" in x else "—"

        def moved(x):
            return f"{_u(x['forward']['bytes'], unit)}+{_u(x['backward']['bytes'], unit)}" if "forward" in x else "—"

        def floor(x):
            g = x.get("graph_floor")
            return f"{_u(g['forward'], unit)}+{_u(g['backward'], unit)}" if g else "—"

        def kept(x):
            return _u(x.get("saved_beyond_inputs"), unit)

        variant = f" ({r['variant']})" if r["variant"] else ""
        lines.append(
            f"| {r['op']}{variant} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {kernels(e)} / {kernels(f)} "
            f"| {moved(e)} / {moved(f)} | {floor(e)} / {floor(c)} / {floor(f)} | {kept(e)} / {kept(c)} / {kept(f)} |"
        )
    return lines


def train_table(train: list[dict], launches: bool = True) -> list[str]:
    lines = [
        "| model | batch | precision | impl | kernels fwd / bwd / Adam / step | host syncs per step "
        "| MB moved (step) | MB kept for the backward (beyond weights and batch) |"
        + (" launches of the forward |" if launches else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if launches else ""),
    ]
    for r in train:
        for impl, x in r["impls"].items():
            if "step" in x:
                k = (
                    f"{x['forward']['kernels']} / {x['backward']['kernels']} / {x['optimizer']['kernels']} / "
                    f"{x['step']['kernels']}"
                )
                syncs = str(x["step"].get("host_syncs", "—"))
                moved = f"{x['step']['bytes'] / 1e6:.2f}"
                forward = ", ".join(x["forward"]["launches"])
            else:
                k, syncs, moved, forward = "— (not counted: see above)", "—", "—", "—"
            lines.append(
                f"| {r['model']} | {r['batch']} | {r.get('precision', 'fp32')} | {impl} | {k} | {syncs} | {moved} "
                f"| {x['saved_bytes'] / 1e6:.3f} ({x['saved_beyond_inputs'] / 1e6:.3f}) |"
                + (f" {forward} |" if launches else "")
            )
    return lines


def noise_lines(rows: list[dict]) -> list[str]:
    by_kernel = defaultdict(list)
    for r in rows:
        by_kernel[_kernel(r["kernel"])].append(r)
    out = []
    for name, label in (("randn", "`tl.randn`"), ("randn4x", "`tl.randn4x`"), ("fastvae_noise", "fastvae's")):
        for r in by_kernel.get(name, []):
            out.append(
                f"- {label}: {r['instructions_per_element']:.1f} instructions per normal "
                f"({r['executed_instructions']} per thread for {r['elements_per_thread']:g} normals), "
                f"{r['registers']} registers, {r['bound']['label']} "
                f"(compute/memory {r['bound']['compute_over_memory']:.2f})."
            )
    # Like against like: a variant drawing its noise and one reading it, the same in everything else.
    forward = [r for r in by_kernel.get("reparameterize_kl_forward", []) if r["dtype"] == "fp32"]

    def without_eps(r):
        return sorted((k, str(v)) for k, v in r["constexprs"].items() if "eps" not in k.lower())

    pairs = [
        (d, g)
        for g in forward
        if g["constexprs"].get("HAS_EPS") is True
        for d in forward
        if d["constexprs"].get("HAS_EPS") is False and without_eps(d) == without_eps(g)
    ]
    if pairs:
        d, g = max(pairs, key=lambda pair: pair[1]["elements_of_launch"])
        out.append(
            f"- reparameterize_kl forward, fp32, the same variant but for the noise ({g['used_by'][0]}): "
            f"{d['instructions_per_element']:.1f} instructions per element drawing it against "
            f"{g['instructions_per_element']:.1f} reading it: the noise costs "
            f"{d['instructions_per_element'] - g['instructions_per_element']:.1f} per element and saves a read of 4 "
            f"bytes per element."
        )
    return out


def markdown(payload: dict) -> str:
    p = payload["provenance"]
    lines = ["# Static audit and counts (no GPU)", ""]
    lines += [f"- **{k}**: {v}" for k, v in p.items()]
    lines += [f"- **took**: {payload['seconds']:.0f} s", ""]
    lines += [f"> {n}" for n in payload["notes"]] + [""]
    lines += [
        "## Kernel variants compiled for sm_90",
        "",
        "Every variant the ops launched in the counted cases, training steps and extra scenarios, specialised "
        "as Triton's launcher specialises it (pointers and integers divisible by 16, a unit stride as the "
        "constexpr 1). *instr. executed*: SASS instructions one thread executes for a program that makes one "
        "trip through its loop, slow paths left out (the number in brackets: instructions of the cubin off "
        "that path, mostly libdevice's sin/cos range reduction for large arguments and IEEE division's "
        "subroutine). *slots/thread*: the tile's slots a thread holds, padding included; *per elem.*: the "
        "slots the launch's tiles cover per element, the padding whose instructions run too (1.60 for 10 "
        "mixture components in 16 slots). *instr./elem.*: executed instructions per slot a thread holds, "
        "times slots per element: per real element of the launch. *B/elem.*: the "
        "launch's modelled traffic per element. *compute/memory*: issue (or pipe) time over memory time "
        "per element on the H100 model above; *estimate* says which should bound the kernel.",
        "",
    ]
    lines += audit_table(payload["audit"]) + [""]
    lines += ["Where each variant is used:", ""]
    for r in payload["audit"]:
        lines.append(
            f"- {_kernel(r['kernel'])} {r['dtype']} {_flags(r['constexprs'])} {_block(r['constexprs'])}: "
            + "; ".join(r["used_by"])
        )
    lines += ["", "## In-kernel noise: `tl.randn`, `tl.randn4x` and fastvae's generator", ""]
    lines += noise_lines(payload["audit"]) + [""]
    lines += [
        "## Counts per op",
        "",
        "At the runner's headline size (2^24 elements, or the largest case below it), forward with autograd "
        "on, then the backward from the runner's upstream gradients (1 for a summed loss; a random `grad_z`). "
        "Units: bytes over elements x element size. *Kernels* and *units moved*: per ATen call or Triton "
        "launch (torch.compile's are not counted, see the notes in `benchmarks/static/counts.py`). "
        "*Graph floor*: what each pass would move as one kernel (inputs read, outputs and kept tensors "
        "written once). *Kept*: storages kept for the backward beyond the op's inputs.",
        "",
    ]
    lines += ops_table(payload["ops"]) + [""]
    lines += [
        "## Counts per training step",
        "",
        "One steady-state fp32 step (forward, backward, Adam with `foreach=True`, its CUDA default) of each "
        "model the runner times: the MLP and conv VAEs, the hierarchical VAE (`--model hvae`) and the MLP VAE "
        "with `likelihood=\"dmol\"`. torch.compile: only what it keeps is counted.",
        "",
    ]
    lines += train_table(payload["train"]) + [""]
    if payload.get("launch_bound"):
        lines += [
            "## The launch-bound regime (issue 12)",
            "",
            "The runner's small-batch steps, counted: kernels launched and host syncs per step (a host sync: an "
            "ATen call that reads a value on the host, `item`/`bool`/`nonzero`/..., or a `.cpu()`, `.numpy()`, "
            "`.tolist()`, `.to('cpu')` from code outside torch; Adam's step counters, which live on the host on a "
            "GPU too, left out). bf16 is CPU autocast, whose op lists are close to CUDA's, not the same. A step "
            "replayed as a CUDA graph launches one graph: its kernels are those of the fastvae rows. Times (and "
            "torch.compile's kernels) need the GPU run.",
            "",
        ]
        lines += train_table(payload["launch_bound"], launches=False) + [""]
    lines += ["## The byte model against the counts", ""]
    checks = payload["checks"]
    bad = [c for c in checks if not c["agree"]]
    lines.append(
        f"{len(checks) - len(bad)} of {len(checks)} checks agree with `benchmarks/static/model.py` "
        "(the docstrings' byte tables as code)."
    )
    if bad:
        lines += ["", "| check | model | counted |", "|---|---|---|"]
        lines += [f"| {c['check']} | {c['model']} | {_num(c['counted'])} |" for c in bad]
    lines.append("")
    return "\n".join(lines)


def _num(x) -> str:
    return "—" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))
