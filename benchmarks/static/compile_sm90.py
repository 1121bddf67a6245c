"""Compile recorded Triton launches for sm_90 as the launcher would, and read each cubin.

Runs in its own process (``python -m benchmarks.static.compile_sm90``, jobs as
JSON on stdin, results as JSON on stdout), because Triton's interpreter,
which the counts and tests run under, cannot compile.

Faithful specialisation: each job's arguments are rebuilt as stand-ins (a
tensor's dtype and whether its address is a multiple of 16; integers and
floats as they were) and passed through the binder that Triton's launcher
itself uses (``create_function_from_signature`` and ``JITFunction._pack_args``,
the same in Triton 3.6 and 3.9), with the backend of an sm_90 target. So
pointers and integers that are multiples of 16 get ``tt.divisibility = 16``,
an integer equal to 1 (a unit column stride) becomes the constexpr 1, and
integers beyond 32 bits become i64, exactly as on a GPU.

Results are cached on disk (``FASTVAE_STATIC_CACHE``, default
``~/.cache/fastvae/static-audit``), keyed by the Triton version, the kernel's
source hash (``JITFunction.cache_key``, which covers the functions it calls),
the specialisation and the analysis code (``sass.py``), so repeated runs and test sessions compile only what
changed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from importlib import import_module
from pathlib import Path

TARGET_ARCH = 90


def cache_dir() -> Path:
    path = Path(os.environ.get("FASTVAE_STATIC_CACHE", Path.home() / ".cache" / "fastvae" / "static-audit"))
    path.mkdir(parents=True, exist_ok=True)
    return path


class _StandInTensor:
    """What the launcher's binder reads of a tensor: its dtype and its address."""

    def __init__(self, dtype, ptr_mod16: int):
        self.dtype = dtype
        self._ptr = 1024 + ptr_mod16

    def data_ptr(self) -> int:
        return self._ptr


def _stand_in(desc: dict):
    import torch

    if "tensor" in desc:
        return _StandInTensor(getattr(torch, desc["tensor"]), desc["ptr_mod16"])
    return next(iter(desc.values()))


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", TARGET_ARCH, 32)


@functools.cache
def _binder(module: str, name: str):
    """The kernel, an sm_90 backend, and the binder Triton's launcher would build for that backend."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = getattr(import_module(module), name)
    backend = make_backend(_target())
    return kernel, backend, create_function_from_signature(kernel.signature, kernel.params, backend)


def specialise(job: dict) -> dict:
    """The launcher's ``(signature, constexprs, attrs, options)`` for a job, and a JSON summary of them."""
    from triton import knobs

    kernel, backend, binder = _binder(job["module"], job["kernel"])
    kwargs = dict(job["kwargs"])
    # What JITFunction.run adds to every launch before binding.
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    bound, specialization, options = binder(*[_stand_in(a) for a in job["args"]], **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    names = [p.name for p in kernel.params]
    divisible = [names[path[0]] for path, values in attrs.items() if ["tt.divisibility", 16] in values]
    return {
        "kernel": kernel,
        "signature": signature,
        "constexprs": constexprs,
        "attrs": attrs,
        "options": options,
        "summary": {
            "types": {k: v for k, v in signature.items() if v != "constexpr"},
            "constexprs": {names[path[0]]: _jsonable(v) for path, v in constexprs.items()},
            "divisible_by_16": divisible,
            "num_warps": options.num_warps,
            "num_stages": options.num_stages,
            "enable_fp_fusion": options.enable_fp_fusion,
        },
    }


def _jsonable(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def variant_key(job: dict) -> tuple[str, dict]:
    """A key naming what gets compiled for ``job`` (same key, same cubin), and the specialisation summary."""
    import triton

    from benchmarks.static import sass

    spec = specialise(job)
    kernel = spec["kernel"]
    # A new analysis reads the cubins anew.
    analysis = hashlib.sha256(Path(sass.__file__).read_bytes() + Path(__file__).read_bytes()).hexdigest()
    text = json.dumps(
        [
            triton.__version__,
            kernel.cache_key,
            job["module"],
            job["kernel"],
            spec["summary"],
            sorted(map(str, spec["attrs"].items())),
            analysis,
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24], spec["summary"]


def compile_and_read(job: dict) -> dict:
    """Compile ``job`` for sm_90 and analyse its cubin; cached."""
    key, summary = variant_key(job)
    cached = cache_dir() / f"{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    import triton
    from triton.compiler import ASTSource

    from benchmarks.static.sass import analyse, cuobjdump

    spec = specialise(job)
    source = ASTSource(spec["kernel"], spec["signature"], spec["constexprs"], spec["attrs"])
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints ptxas's -v report (TRITON_DUMP_PTXAS_LOG=1)
        compiled = triton.compile(source, target=_target(), options=spec["options"].__dict__)
    with tempfile.TemporaryDirectory() as tmp:
        sass, resources = cuobjdump(compiled.asm["cubin"], Path(tmp))
    result = {
        "key": key,
        "triton": triton.__version__,
        "specialisation": summary,
        "shared_dynamic": compiled.metadata.shared,
        "ptxas": ptxas_report(log.getvalue()),
        **analyse(sass, resources),
    }
    cached.write_text(json.dumps(result))
    cached.with_suffix(".sass").write_text(sass)  # for reading by hand: the audit names each variant's key
    return result


def ptxas_report(log: str) -> dict | None:
    """Stack frame and spill bytes from ptxas's ``-v`` report (None when Triton did not run ptxas: a cache hit)."""
    match = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not match:
        return None
    return dict(zip(("stack_frame", "spill_stores", "spill_loads"), map(int, match.groups())))


def _keyed(job: dict) -> tuple[str, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return variant_key(job)


def _compile(job: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_and_read(job)


def run_jobs(jobs: list[dict], workers: int | None = None) -> dict:
    """``{"variant_of": [key per job], "variants": {key: result}}``: each distinct specialisation compiled once."""
    keys = [_keyed(job)[0] for job in jobs]
    first = {}
    for key, job in zip(keys, jobs):
        first.setdefault(key, job)
    todo = [job for key, job in first.items() if not (cache_dir() / f"{key}.json").exists()]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_compile, todo))
    else:
        for job in todo:
            _compile(job)
    return {"variant_of": keys, "variants": {key: _compile(job) for key, job in first.items()}}


def compile_in_subprocess(jobs: list[dict], workers: int | None = None) -> dict:
    """:func:`run_jobs` in a fresh Python without ``TRITON_INTERPRET`` (the interpreter cannot compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "benchmarks.static.compile_sm90"] + ([str(workers)] if workers else [])
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="fastvae-static-triton-") as triton_cache:
        # An empty Triton cache, so that ptxas runs and reports spills; our own cache keeps the results.
        env.update(TRITON_CACHE_DIR=triton_cache, TRITON_DUMP_PTXAS_LOG="1")
        done = subprocess.run(command, input=json.dumps(jobs), capture_output=True, text=True, env=env, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"compiling for sm_{TARGET_ARCH} failed:\n{done.stderr[-6000:]}")
    return json.loads(done.stdout)


def main() -> int:
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else None
    jobs = json.loads(sys.stdin.read())
    json.dump(run_jobs(jobs, workers), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
