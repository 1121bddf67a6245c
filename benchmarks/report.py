"""Turning measurements into results: derived ratios, the issue's targets, JSON, markdown and plots."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

BIG = 1 << 24  # targets apply at this many elements and above

# (what, op, pass, compared with, at least) for the fused ops' forward+backward.
OP_SPEEDUP_TARGETS = [
    ("reparameterize_kl", "eager", 4.0),
    ("reparameterize_kl", "compile", 1.15),
    ("mse", "compile", 1.4),
    ("mse", "eager", 2.0),
    ("bce", "compile", 1.4),
    ("bce", "eager", 4.0),
    ("gaussian", "compile", 1.5),
    ("discretized_logistic_mixture_nll", "compile", 3.0),  # issue 11
]
FLOOR_TARGET = 0.90
TRAIN_TARGET = {"model": "mlp", "batch": 16384, "precision": "bf16", "vs_eager": 1.2, "vs_compile": 1.0}
# Issue 12: the MLP VAE at batch 128, fastvae's fastest step against eager and reduce-overhead, no host sync.
LAUNCH_BOUND_TARGET = {"model": "mlp", "batch": 128, "vs_eager": 3.0, "vs": "compile reduce-overhead"}


def _case_key(r: dict) -> tuple:
    return (r["suite"], r["op"], r["variant"], tuple(r["shape"]), r["dtype"], r["pass"])


def derive(records: list[dict], bandwidth_gbs: float) -> list[dict]:
    """Add effective GB/s, % of floor and speed-ups against eager and compile to each record."""
    by_case = defaultdict(dict)
    timed = [r for r in records if r.get("ms")]  # an implementation skipped on this machine has no time
    for r in timed:
        by_case[_case_key(r)][r["impl"]] = r
    for r in timed:
        if r.get("floor_bytes"):
            r["gbs"] = r["floor_bytes"] / (r["ms"] * 1e-3) / 1e9
            r["floor_fraction"] = r["gbs"] / bandwidth_gbs
        peers = by_case[_case_key(r)]
        for other in ("eager", "compile"):
            if other in peers and r["impl"] != other:
                r[f"speedup_vs_{other}"] = peers[other]["ms"] / r["ms"]
    return records


def check_targets(records: list[dict]) -> list[dict]:
    """The issue's targets, each with the worst measured case at >= 2**24 elements (or the train step)."""
    fused = [r for r in records if r["suite"] == "op" and r["impl"] == "fastvae"
             and r["pass"] == "forward+backward" and r.get("nominal_elements", r["elements"]) >= BIG]
    results = []
    for op in sorted({r["op"] for r in fused}):
        rows = [r for r in fused if r["op"] == op and "floor_fraction" in r]
        if rows:
            worst = min(rows, key=lambda r: r["floor_fraction"])
            results.append(_target(f"{op} forward+backward >= {FLOOR_TARGET:.0%} of the floor",
                                   worst["floor_fraction"], FLOOR_TARGET, worst, percent=True))
    for op, other, goal in OP_SPEEDUP_TARGETS:
        rows = [r for r in fused if r["op"] == op and f"speedup_vs_{other}" in r]
        if rows:
            worst = min(rows, key=lambda r: r[f"speedup_vs_{other}"])
            results.append(_target(f"{op} forward+backward >= {goal}x faster than {other}",
                                   worst[f"speedup_vs_{other}"], goal, worst))
    drawn = [r for r in records if r["suite"] == "op" and r["op"] == "reparameterize_kl" and r["impl"] == "fastvae"
             and r["pass"] == "forward" and r["variant"].startswith("eps drawn") and r.get("saved_bytes") is not None]
    if drawn:
        worst = max(drawn, key=lambda r: r["saved_bytes"])
        results.append({"target": "reparameterize_kl keeps no noise tensor for the backward",
                        "measured": f"{worst['saved_bytes']} bytes kept at {_case_name(worst)}",
                        "met": worst["saved_bytes"] < worst["elements"]})  # stored noise is >= 2 bytes per element
    results.extend(_train_targets(records))
    results.extend(_launch_bound_targets(records))
    return results


def _launch_bound_targets(records: list[dict]) -> list[dict]:
    t = LAUNCH_BOUND_TARGET
    out = []
    for precision in ("fp32", "bf16"):
        rows = {r["impl"]: r for r in records if r["suite"] == "train" and r["op"] == t["model"] and r.get("ms")
                and r["shape"][0] == t["batch"] and r["dtype"] == precision and r.get("variant") == "launch-bound"}
        fused = [r for impl, r in rows.items() if impl.startswith("fastvae")]
        if not fused or "eager" not in rows:
            continue
        best = min(fused, key=lambda r: r["ms"])
        name = f"{t['model']} VAE step, batch {t['batch']}, {precision} ({best['impl']})"
        out.append(_target(f"{name}: >= {t['vs_eager']}x the samples/s of eager", rows["eager"]["ms"] / best["ms"],
                           t["vs_eager"], best))
        if t["vs"] in rows:
            out.append(_target(f"{name}: as fast as torch.compile(mode='reduce-overhead')",
                               rows[t["vs"]]["ms"] / best["ms"], 1.0, best))
        if best.get("host_syncs") is not None:
            out.append({"target": f"{name}: no host sync in a step", "measured": f"{best['host_syncs']} per step",
                        "met": best["host_syncs"] == 0})
    return out


def _train_targets(records: list[dict]) -> list[dict]:
    t = TRAIN_TARGET
    rows = {r["impl"]: r for r in records if r["suite"] == "train" and r["op"] == t["model"] and r.get("ms")
            and r["shape"][0] == t["batch"] and r["dtype"] == t["precision"] and r.get("variant") != "launch-bound"}
    if "fastvae" not in rows:
        return []
    fused, out = rows["fastvae"], []
    name = f"{t['model']} VAE step, batch {t['batch']}, {t['precision']}"
    if "eager" in rows:
        out.append(_target(f"{name}: >= {t['vs_eager']}x faster than eager", rows["eager"]["ms"] / fused["ms"],
                           t["vs_eager"], fused))
        if fused.get("peak_bytes") is not None:
            out.append({"target": f"{name}: lower peak memory than eager",
                        "measured": f"{fused['peak_bytes'] / 2**20:.0f} MiB vs {rows['eager']['peak_bytes'] / 2**20:.0f} MiB",
                        "met": fused["peak_bytes"] < rows["eager"]["peak_bytes"]})
    if "compile" in rows:
        out.append(_target(f"{name}: no slower than torch.compile", rows["compile"]["ms"] / fused["ms"],
                           t["vs_compile"], fused))
    return out


def _target(name: str, measured: float, goal: float, record: dict, percent: bool = False) -> dict:
    shown = f"{measured:.1%}" if percent else f"{measured:.2f}x"
    met = measured >= goal
    gap = "" if met else (f" (short by {goal - measured:.1%})" if percent else f" (short by {goal / measured:.2f}x)")
    return {"target": name, "measured": f"{shown} at {_case_name(record)}{gap}", "met": met}


def _case_name(r: dict) -> str:
    variant = f" {r['variant']}" if r["variant"] else ""
    return f"{r['op']}{variant} {'x'.join(map(str, r['shape']))} {r['dtype']}"


# ---- writing --------------------------------------------------------------------------------------


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` whole or not at all (a run killed mid-write leaves the last good file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def write_results(out_dir: Path, provenance: dict, bandwidth_gbs: float, records: list[dict], notes: list[str],
                  plan: list[dict] | None = None) -> None:
    """Write ``results.json``, ``results.md`` and the PNG plots into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = check_targets(records)
    payload = {"provenance": provenance, "copy_bandwidth_gbs": bandwidth_gbs, "notes": notes,
               "targets": targets, "plan": plan or [], "records": records, "complete": True}
    write_json(out_dir / "results.json", payload)
    (out_dir / "results.md").write_text(markdown(provenance, bandwidth_gbs, records, targets, notes, plan))
    plot(out_dir, records, bandwidth_gbs)


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _scaled(value, factor):
    return None if value is None else value * factor


def markdown(provenance: dict, bandwidth_gbs: float, records: list[dict], targets: list[dict], notes,
             plan: list[dict] | None = None) -> str:
    lines = ["# fastvae benchmark results", ""]
    lines += [f"- **{k}**: {v}" for k, v in provenance.items()]
    lines += [f"- **measured copy bandwidth**: {bandwidth_gbs:.0f} GB/s (read + write)", ""]
    lines += [f"> {n}" for n in notes] + ([""] if notes else [])
    if plan:
        done = [p for p in plan if p["status"] == "done"]
        missed = [p for p in plan if p["status"] != "done"]
        lines += ["## Plan", "", f"{len(done)} of {len(plan)} cases ran (in order of importance, within the time "
                  "budget)." + (" Not run:" if missed else ""), ""]
        if missed:
            lines += ["| tier | case | status | why |", "|---|---|---|---|"]
            lines += [f"| {p['tier']} | {p['case']} | {p['status']} | {p['detail']} |" for p in missed]
            lines.append("")
    if targets:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in targets]
        lines.append("")
    op_rows = [r for r in records if r["suite"] == "op"]
    if op_rows:
        lines += ["## Ops", "",
                  "Times are medians in ms; GB/s and % of floor count the fewest bytes the pass must move; "
                  "× eager / × compile are speed-ups of fastvae; kernels are launches per call (eager/compile/fastvae); "
                  "kept MiB is what the forward keeps for the backward beyond inputs and outputs.", "",
                  "| op | shape | dtype | pass | eager | compile | fastvae | % floor e/c/f | fastvae GB/s "
                  "| × eager | × compile | kernels e/c/f | kept MiB e/c/f |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        grouped = defaultdict(dict)
        for r in op_rows:
            grouped[_case_key(r)][r["impl"]] = r
        for key, impls in grouped.items():
            _, op, variant, shape, dtype, pass_name = key
            e, c, f = (impls.get(name, {}) for name in ("eager", "compile", "fastvae"))
            floors = "/".join(_fmt(_scaled(x.get("floor_fraction"), 100), ".0f") for x in (e, c, f))
            kernels = "/".join(_fmt(x.get("kernels"), "d") for x in (e, c, f))
            kept = "/".join(_fmt(_scaled(x.get("saved_bytes"), 2**-20), ".0f") for x in (e, c, f))
            lines.append(
                f"| {op}{' (' + variant + ')' if variant else ''} | {'x'.join(map(str, shape))} | {dtype} | {pass_name} "
                f"| {_fmt(e.get('ms'), '.4f')} | {_fmt(c.get('ms'), '.4f')} | {_fmt(f.get('ms'), '.4f')} | {floors} "
                f"| {_fmt(f.get('gbs'), '.0f')} | {_fmt(f.get('speedup_vs_eager'), '.2f')} "
                f"| {_fmt(f.get('speedup_vs_compile'), '.2f')} | {kernels} | {kept} |")
        first = [r for r in op_rows if r.get("first_call_ms") is not None and r["impl"] != "eager"]
        if first:
            lines += ["", "First call (compile time for `compile`, Triton JIT for `fastvae`; excluded from the times "
                      "above), in ms:", "", "| op | shape | dtype | impl | first call |", "|---|---|---|---|---|"]
            lines += [f"| {r['op']} {r['variant']} | {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['impl']} "
                      f"| {r['first_call_ms']:.0f} |" for r in first]
        lines.append("")
    noise = [r for r in records if r["suite"] == "noise"]
    if noise:
        lines += ["## Drawing noise in a kernel", "", "| normals | way | ms | GB/s written | % of floor |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['elements']} | {r['impl']} | {r['ms']:.4f} | {r['gbs']:.0f} | {100 * r['floor_fraction']:.0f} |"
                  for r in noise]
        lines.append("")
    train = [r for r in records if r["suite"] == "train" and r.get("ms")]
    if train:
        lines += ["## Training step", "",
                  "One optimizer step (forward, backward, Adam); *kernels* and *syncs* per step, counted on the GPU "
                  "(profiler; CUDA's sync debug mode).", "",
                  "| model | regime | batch | precision | impl | ms | samples/s | peak MiB | kernels | syncs "
                  "| × eager | × compile |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['op']} | {r.get('variant', '')} | {r['shape'][0]} | {r['dtype']} | {r['impl']} "
                  f"| {r['ms']:.3f} | {r['samples_per_s']:.0f} | {_fmt(_scaled(r.get('peak_bytes'), 2**-20), '.0f')} "
                  f"| {_fmt(r.get('kernels'), 'd')} | {_fmt(r.get('host_syncs'), 'd')} "
                  f"| {_fmt(r.get('speedup_vs_eager'), '.2f')} | {_fmt(r.get('speedup_vs_compile'), '.2f')} |"
                  for r in train]
        lines.append("")
    unavailable = [r for r in records if r.get("skipped")]
    if unavailable:
        lines += ["Implementations this machine or checkout could not run:", ""]
        lines += [f"- {r['op']} {r.get('variant', '')} batch {r['shape'][0]} {r['dtype']}, {r['impl']}: {r['skipped']}"
                  for r in unavailable]
        lines.append("")
    return "\n".join(lines)


def plot(out_dir: Path, records: list[dict], bandwidth_gbs: float) -> None:
    """One PNG per op: forward+backward time against elements, per implementation and dtype, with the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["suite"] == "op" and r["pass"] == "forward+backward"]
    for op in sorted({r["op"] for r in rows}):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series = defaultdict(list)
        floor = defaultdict(list)
        for r in rows:
            if r["op"] != op:
                continue
            series[(r["impl"], r["variant"], r["dtype"])].append((r["elements"], r["ms"]))
            floor[(r["variant"], r["dtype"])].append((r["elements"], r["floor_bytes"] / bandwidth_gbs / 1e6))
        for (impl, variant, dtype), points in sorted(series.items()):
            xs, ys = zip(*sorted(set(points)))
            ax.plot(xs, ys, marker="o", label=f"{impl} {variant} {dtype}".replace("  ", " "))
        for (variant, dtype), points in sorted(floor.items()):
            xs, ys = zip(*sorted(set(points)))
            ax.plot(xs, ys, linestyle=":", color="grey")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("elements")
        ax.set_ylabel("forward+backward, ms (dotted: bandwidth floor)")
        ax.set_title(op)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / f"{op}.png", dpi=110)
        plt.close(fig)
