"""The benchmark runner: ``python -m benchmarks [--grid default] [--out DIR]``; ``--static`` for the no-GPU audit.

On a CUDA GPU it measures the copy bandwidth, then every op case (eager
reference, ``torch.compile`` of it, fastvae), the in-kernel noise generators
and the training steps of the MLP and conv VAEs, and writes ``results.json``, ``results.md`` and PNG
plots into ``benchmarks/results/<gpu-name>/``. Without a GPU it runs a small
smoke grid of the reference paths only, to show the suite works.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import copy_bandwidth, device_name, provenance
from benchmarks.ops import measure_case, op_cases
from benchmarks.report import derive, write_results
from benchmarks.train_step import IMPLS as TRAIN_IMPLS
from benchmarks.train_step import measure_train_case, train_cases

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRECISIONS = {"float32": "fp32", "bfloat16": "bf16"}
NO_GPU_NOTE = ("No CUDA GPU here: this is a smoke run of the reference paths (eager PyTorch) at tiny sizes, "
               "to check the benchmarks run. The fused Triton kernels need a GPU; these times mean nothing for them.")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=("smoke", "default", "full"), default=None,
                        help="sizes to run (default: 'default' on a GPU, 'smoke' without one)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    parser.add_argument("--ops", default=None,
                        help="comma-separated subset of reparameterize_kl,mse,bce,gaussian,l1 (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile implementations")
    parser.add_argument("--skip", default="", help="comma-separated suites to skip: ops,noise,train")
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
    if "fastvae.kernels.launch" in sys.modules and not sys.modules["fastvae.kernels.launch"].is_interpreted():
        raise SystemExit("--static must run in a fresh process: fastvae's kernels were already compiled for a GPU")
    from benchmarks.static.audit import run_static

    out_dir = args.out or Path(__file__).parent / "results" / "static"
    run_static(out_dir, "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:]))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.static:
        return main_static(args, argv)
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    grid = args.grid or ("default" if on_gpu else "smoke")
    dtypes = [DTYPES[name] for name in args.dtypes.split(",")]
    ops = set(args.ops.split(",")) if args.ops else None
    skip = set(filter(None, args.skip.split(",")))
    if on_gpu:
        impls = ("eager", "fastvae") if args.no_compile else ("eager", "compile", "fastvae")
        notes = []
        # Every case compiles its own static-shape graph; do not fall back to eager after a few.
        torch._dynamo.config.recompile_limit = 1024
        torch._dynamo.config.accumulated_recompile_limit = 4096
    else:
        impls = ("eager",)
        notes = [NO_GPU_NOTE]
        print(NO_GPU_NOTE, flush=True)
    out_dir = args.out or Path(__file__).parent / "results" / device_name(device)
    command = "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:])

    start = time.perf_counter()
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth: {bandwidth:.0f} GB/s", flush=True)
    records = []
    if "ops" not in skip:
        cases = op_cases(grid, dtypes, ops)
        for i, case in enumerate(cases, 1):
            print(f"[{i}/{len(cases)}] {case.op} {case.variant} {tuple(case.shape)} {case.dtype}", flush=True)
            records += measure_case(case, device, impls, count_kernels=on_gpu)
    if on_gpu and "noise" not in skip:
        from benchmarks.noise import measure_noise

        records += measure_noise(device)
    if "train" not in skip:
        precisions = [PRECISIONS[name] for name in args.dtypes.split(",")]
        train_impls = tuple(i for i in TRAIN_IMPLS if not (args.no_compile and i.endswith("compile")))
        cases = train_cases(grid, precisions)
        for i, case in enumerate(cases, 1):
            print(f"[train {i}/{len(cases)}] {case.model} VAE, batch {case.batch}, {case.precision}", flush=True)
            records += measure_train_case(case, device, train_impls if on_gpu else ("eager",))
    derive(records, bandwidth)
    write_results(out_dir, provenance(device, command), bandwidth, records, notes)
    print(f"wrote {out_dir}/results.md, results.json and plots in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
