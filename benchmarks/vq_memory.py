"""Peak memory of the vector quantizer's reference path on the CPU: ``python -m benchmarks.vq_memory``.

Runs :func:`fastvae.functional.vector_quantize` with ``backend="torch"`` (the chunked plain-PyTorch reference)
forward and backward on ``N`` vectors against ``K`` codes of ``D`` values (z and the codebook learning by gradient),
in a fresh process, and reports how much the process's resident memory rose above what it held before the call:
the kernel's high-water mark (``VmHWM`` in ``/proc/self/status``, reset just before the call by writing 5 to
``/proc/self/clear_refs``) minus the resident size then (``VmRSS``). Whatever the call allocates and touches counts,
torch's temporaries and the allocator's slack included; a distance matrix would take ``4 N K`` bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

_CHILD = """
import json, sys, time
import torch
from fastvae.functional import vector_quantize

n, k, d, threads = (int(a) for a in sys.argv[1:5])
torch.set_num_threads(threads)

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

generator = torch.Generator().manual_seed(0)
z = torch.randn(n, d, generator=generator, requires_grad=True)
codebook = torch.randn(k, d, generator=generator, requires_grad=True)
warm = vector_quantize(z[:8], codebook[:8], reduction="sum", backend="torch")  # load the code paths first
torch.autograd.grad([warm[0].sum(), warm[2]], [z, codebook])
del warm
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark to the current resident size
before = kib("VmRSS")
start = time.perf_counter()
z_q, indices, loss = vector_quantize(z, codebook, reduction="sum", backend="torch")
grads = torch.autograd.grad([z_q, loss], [z, codebook], [torch.ones_like(z_q), torch.ones_like(loss)])
seconds = time.perf_counter() - start
print(json.dumps({"rss_before_kib": before, "hwm_kib": kib("VmHWM"), "seconds": seconds,
                  "codes_used": int(indices.unique().numel())}))
"""


def measure(n: int, k: int, d: int, threads: int = 1) -> dict:
    """Run the reference path once in a fresh Python; returns its peak rise in resident memory (bytes) and more."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(k), str(d), str(threads)],
                          capture_output=True, text=True, check=True)
    child = json.loads(done.stdout.strip().splitlines()[-1])
    peak = (child["hwm_kib"] - child["rss_before_kib"]) * 1024
    return {"n": n, "k": k, "d": d, "threads": threads, "peak_rise_bytes": peak,
            "distance_matrix_bytes": 4 * n * k, "seconds": round(child["seconds"], 2),
            "codes_used": child["codes_used"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vq_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32768, help="vectors (default: 32768)")
    parser.add_argument("--k", type=int, default=32768, help="codes (default: 32768)")
    parser.add_argument("--d", type=int, default=64, help="values per vector (default: 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = measure(args.n, args.k, args.d, args.threads)
    print(json.dumps(result))
    print(f"reference path, {args.n:,} vectors against {args.k:,} codes of {args.d}: forward + backward raised the "
          f"resident memory by at most {result['peak_rise_bytes'] / 1e6:.1f} MB; a distance matrix would take "
          f"{result['distance_matrix_bytes'] / 1e9:.2f} GB ({result['seconds']} s for the call, "
          f"{time.perf_counter() - start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
