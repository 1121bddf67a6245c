"""The benchmark runner: ``python -m benchmarks [--budget-s S] [--grid default] [--out DIR]``; ``--static`` without a GPU.

On a CUDA GPU it measures the copy bandwidth, then every op case (eager
reference, ``torch.compile`` of it, fastvae), the training steps of fastvae's
models (MLP, conv, hierarchical, MLP with the DMOL likelihood; the
launch-bound small batches with CUDA graphs) and the in-kernel noise
generators, in order of importance and within
``--budget-s`` seconds (see :mod:`benchmarks.plan`), and writes
``results.json``, ``results.md`` and PNG plots into
``benchmarks/results/<gpu-name>/``. ``--dry-run`` prints that plan and runs
nothing. Without a GPU it runs a small smoke grid of the reference paths only,
to show the suite works. ``--static`` writes the no-GPU audit and counts
(:mod:`benchmarks.static`).
"""
from __future__ import annotations

import argparse
import functools
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import copy_bandwidth, device_name, provenance
from benchmarks.ops import measure_case, op_cases
from benchmarks.plan import (
    CompileTimes,
    Item,
    describe,
    op_estimate,
    op_tier,
    order,
    run_within,
    simulate,
    train_estimate,
    train_tier,
)
from benchmarks.report import derive, write_json, write_results
from benchmarks.train_step import measure_train_case, train_cases

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRECISIONS = {"float32": "fp32", "bfloat16": "bf16"}
NO_GPU_NOTE = ("No CUDA GPU here: this is a smoke run of the reference paths (eager PyTorch) at tiny sizes, "
               "to check the benchmarks run. The fused Triton kernels need a GPU; these times mean nothing for them.")
WRITE_RESERVE_S = 20.0  # of the budget, kept for the copy-bandwidth measurement and writing results and plots
NOISE_ESTIMATE_S = 10.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=("smoke", "default", "full"), default=None,
                        help="sizes to run (default: 'default' on a GPU or with --dry-run, 'smoke' without one)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    parser.add_argument("--ops", default=None,
                        help="comma-separated subset of reparameterize_kl,mse,bce,gaussian,l1,vector_quantize,"
                             "discretized_logistic_mixture_nll (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile implementations")
    parser.add_argument("--skip", default="", help="comma-separated suites to skip: ops,noise,train")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the whole run: cases run in order of importance and a case starts only "
                             "if its estimate fits; the others are recorded as skipped (default: no limit)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (cases in order, estimated seconds, what fits --budget-s) for a GPU "
                             "run, write it to --out/plan.json, and run nothing")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results/<device-name>/, or static/ with --static)")
    parser.add_argument("--static", action="store_true",
                        help="no GPU needed: compile every kernel variant for sm_90 and audit it, and count kernels, "
                             "bytes kept and bytes moved per op and training step (benchmarks/results/static/)")
    return parser.parse_args(argv)


def main_static(args: argparse.Namespace, argv) -> int:
    """``--static``: the audit and the counts (:mod:`benchmarks.static.audit`)."""
    import os

    # The counts run fastvae's Triton path on CPU tensors: the kernels must be defined for the interpreter.
    os.environ["TRITON_INTERPRET"] = "1"
    import torch._functorch.config
    import torch._inductor.config

    # torch.compile times are measured (they plan the GPU run's budget): no cached graphs or kernels.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    if "fastvae.kernels.launch" in sys.modules and not sys.modules["fastvae.kernels.launch"].is_interpreted():
        raise SystemExit("--static must run in a fresh process: fastvae's kernels were already compiled for a GPU")
    from benchmarks.static.audit import run_static

    out_dir = args.out or Path(__file__).parent / "results" / "static"
    with tempfile.TemporaryDirectory(prefix="fastvae-static-inductor-") as inductor_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
        run_static(out_dir, "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:]))
    return 0


def build_plan(args: argparse.Namespace, device: torch.device, on_gpu: bool) -> list[Item]:
    """Every case of the run as a plan item, in order of importance (see :mod:`benchmarks.plan`)."""
    grid = args.grid or ("default" if on_gpu else "smoke")
    dtypes = [DTYPES[name] for name in args.dtypes.split(",")]
    ops = set(args.ops.split(",")) if args.ops else None
    skip = set(filter(None, args.skip.split(",")))
    compile_times = CompileTimes.load()
    items = []
    if "ops" not in skip:
        impls = ("eager",) if not on_gpu else ("eager", "fastvae") if args.no_compile else ("eager", "compile",
                                                                                              "fastvae")
        cases = op_cases(grid, dtypes, ops)
        first_shape: dict = {}
        for case in cases:
            first_shape.setdefault((case.op, case.variant), tuple(case.shape[1:]))
        rank = {key: i for i, key in enumerate(first_shape)}
        # Within a tier: op by op, each dtype beside the other.
        cases.sort(key=lambda c: (rank[(c.op, c.variant)], c.elements, dtypes.index(c.dtype)))
        for case in cases:
            name = f"{case.op}{' (' + case.variant + ')' if case.variant else ''} " \
                   f"{'x'.join(map(str, case.shape))} {str(case.dtype).replace('torch.', '')}"
            items.append(Item(op_tier(case, first_shape), name, op_estimate(case, impls, compile_times),
                              functools.partial(measure_case, case, device, impls, count_kernels=on_gpu),
                              compiles="compile" in impls))
    if on_gpu and "noise" not in skip:
        def noise():
            from benchmarks.noise import measure_noise

            return measure_noise(device)

        items.append(Item("noise", "tl.randn vs tl.randn4x vs torch.randn", NOISE_ESTIMATE_S, noise))
    if "train" not in skip:
        precisions = [PRECISIONS[name] for name in args.dtypes.split(",")]
        for case in train_cases(grid, precisions):
            train_impls = tuple(i for i in case.impls if not (args.no_compile and "compile" in i))
            train_impls = train_impls if on_gpu else ("eager",)
            items.append(Item(train_tier(case), case.name, train_estimate(case, train_impls, compile_times),
                              functools.partial(measure_train_case, case, device, train_impls),
                              compiles=any("compile" in i for i in train_impls)))
    return order(items)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = args.out or Path(__file__).parent / "results" / ("static" if args.static else device_name(
        torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    if not args.dry_run or args.out:
        from fastvae.errors import ConfigError
        from fastvae.training.files import prepare_output_folder

        try:  # before any case runs: a folder that cannot be written fails now, not after the run
            prepare_output_folder(str(out_dir))
        except ConfigError as err:
            print(f"python -m benchmarks: error: {err}", file=sys.stderr)
            return 2
    if args.static:
        return main_static(args, argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    command = "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.dry_run:
        # The plan of a GPU run, whatever this machine has.
        items = build_plan(args, torch.device("cuda"), on_gpu=True)
        simulate(items, args.budget_s)
        print(describe(items, args.budget_s), flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            write_json(args.out / "plan.json", {"command": command, "budget_s": args.budget_s,
                                                "plan": [item.record() for item in items]})
        return 0
    if on_gpu:
        notes = []
        # Every case compiles its own static-shape graph; do not fall back to eager after a few.
        torch._dynamo.config.recompile_limit = 1024
        torch._dynamo.config.accumulated_recompile_limit = 4096
    else:
        notes = [NO_GPU_NOTE]
        print(NO_GPU_NOTE, flush=True)
    out_dir = args.out or Path(__file__).parent / "results" / device_name(device)
    items = build_plan(args, device, on_gpu)

    start = time.perf_counter()
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth: {bandwidth:.0f} GB/s", flush=True)
    budget = None if args.budget_s is None else args.budget_s - WRITE_RESERVE_S - (time.perf_counter() - start)
    info = provenance(device, command)

    def save_progress(records):
        # After each case: a killed run still leaves every finished case in results.json.
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "results.json", {"provenance": info, "copy_bandwidth_gbs": bandwidth, "notes": notes,
                                              "plan": [i.record() for i in items], "records": records,
                                              "complete": False})

    records = run_within(items, budget, on_progress=save_progress)
    derive(records, bandwidth)
    write_results(out_dir, info, bandwidth, records, notes, plan=[item.record() for item in items])
    skipped = sum(item.status == "skipped" for item in items)
    failed = sum(item.status == "failed" for item in items)
    print(f"wrote {out_dir}/results.md, results.json and plots in {time.perf_counter() - start:.0f} s "
          f"({skipped} cases skipped for the budget, {failed} failed)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
