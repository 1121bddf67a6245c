"""Helpers shared by the tests: shapes per device, tolerances per dtype, compiling kernels for a GPU, host syncs."""
import contextlib
import functools
import json
import os
import subprocess
import sys

import torch

# float32 ~ 1e-5 relative; half precisions round their outputs to ~3 significant digits.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **kw):
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default: ``actual``'s)."""
    tol = dict(TOLERANCES[dtype or actual.dtype])
    tol.update(kw)
    torch.testing.assert_close(actual, expected, equal_nan=True, check_dtype=True, **tol)


def pick(device: torch.device, cpu, cuda):
    """A size for ``device``: small under the CPU interpreter, large enough to matter on a GPU."""
    return cpu if device.type == "cpu" else cuda


# Runs outside the interpreter (which cannot compile): Triton's front end, LLVM and the ptxas its wheel ships.
_COMPILE_FOR_CUDA = """
import json, sys
from importlib import import_module
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

target = GPUTarget("cuda", 90, 32)
for module, kernel, signature, constexprs, num_warps in json.loads(sys.argv[1]):
    source = ASTSource(getattr(import_module(module), kernel), signature, constexprs)
    triton.compile(source, target=target, options={"num_warps": num_warps})
"""


def compile_for_cuda(jobs: list[tuple[str, str, dict, dict, int]]) -> None:
    """Compile kernels to sm_90 cubins without a GPU, to catch what only the compiler rejects.

    Each job is ``(module, kernel name, signature, constexprs, num_warps)``, the
    signature mapping each non-constexpr argument to a Triton type (``"*bf16"``,
    ``"i64"``, ``"fp32"``). The interpreter runs code the compiler refuses
    (returns of different types, for one), so CPU-only CI needs this too.
    """
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_CUDA, json.dumps(jobs)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]


# Tensor methods that read values on the host: on a GPU each waits for the device (a sync).
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")
# fastvae's one host read that no device ever pays for: a key drawn from a CPU generator (fastvae.ops.rng).
HOST_ONLY = {("fastvae.ops.rng", "cpu_philox_key")}


class HostSyncError(AssertionError):
    """fastvae's code read a tensor's value on the host."""


def _first_caller_outside_torch(frame):
    """The innermost frame that is not torch's own code: who asked for the host read."""
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "torch":
        frame = frame.f_back
    return frame


@contextlib.contextmanager
def no_host_sync(packages=("fastvae",)):
    """Make every host read of a tensor (``.item()``, ``.tolist()``, ``bool()``, ``int()``, ``float()``,
    ``nonzero()``, ``.cpu()``, ``.numpy()``, ``.to("cpu")``) called from the code of ``packages`` raise
    :class:`HostSyncError`.

    The methods are patched on ``torch.Tensor`` itself (a ``TorchFunctionMode``
    does not see calls made inside custom ops or the autograd engine). Triton's
    interpreter, which copies tensors to the host to run a kernel, and torch's
    internals are not fastvae's code and go on as usual. Under the interpreter
    every tensor is a CPU tensor, so this catches in a CPU test the calls that
    would wait for the device on a GPU.
    """

    def guarded(name, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            if name != "to" or _to_host(args, kwargs):
                caller = _first_caller_outside_torch(sys._getframe(1))
                module = caller.f_globals.get("__name__", "") if caller is not None else ""
                if module.split(".")[0] in packages and (module, caller.f_code.co_name) not in HOST_ONLY:
                    raise HostSyncError(f"Tensor.{name} called from {module}.{caller.f_code.co_name}")
            return method(*args, **kwargs)

        return wrapper

    originals = {name: getattr(torch.Tensor, name) for name in (*HOST_READS, "to")}
    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, guarded(name, method))
        yield
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def _to_host(args, kwargs) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names the CPU as its device."""
    for value in (*args[1:], kwargs.get("device")):
        if isinstance(value, (str, torch.device)) and torch.device(value).type == "cpu":
            return True
    return False


def gradients_up_to_third(loss, inputs, grad_loss, directions):
    """First, second and third derivatives of ``sum(loss * grad_loss)`` in ``inputs``, through autograd.

    The first is the gradient; each next one is the gradient of the previous
    one's inner product with fixed ``directions`` (one float32 tensor per
    input): Hessian- and third-derivative-vector products, zeros where nothing
    depends on the input.
    """
    grads, found = [], torch.autograd.grad(loss, inputs, grad_loss, create_graph=True, allow_unused=True,
                                           materialize_grads=True)
    for _ in range(2):
        grads.append(found)
        total = sum((g.float() * d).sum() for g, d in zip(found, directions))
        if not total.requires_grad:  # the last derivative was constant
            found = tuple(torch.zeros_like(t) for t in inputs)
            continue
        found = torch.autograd.grad(total, inputs, create_graph=True, allow_unused=True, materialize_grads=True)
    grads.append(found)
    return grads


def record_kernel_calls(monkeypatch, module, forward_name: str) -> dict:
    """Record the launches of an op whose forward writes its gradient: ``module.forward_name``'s keyword
    arguments (``"forward"``) and outputs (``"outputs"``), and every scaling of a saved gradient in its backward
    (``"scale"``: ``("in place" or "new", shape, weights)``, see :mod:`fastvae.ops.grad_in_forward`)."""
    from fastvae.kernels import scale_rows as scaling

    calls = {"forward": [], "outputs": [], "scale": []}
    forward, scale, scale_ = getattr(module, forward_name), scaling.scale_rows, scaling.scale_rows_

    def spy_forward(*args, **kwargs):
        calls["forward"].append(kwargs)
        calls["outputs"].append(forward(*args, **kwargs))
        return calls["outputs"][-1]

    def spy(how, function):
        def launch(src, weight):
            calls["scale"].append((how, tuple(src.shape), weight.clone()))
            return function(src, weight)

        return launch

    monkeypatch.setattr(module, forward_name, spy_forward)
    monkeypatch.setattr(scaling, "scale_rows", spy("new", scale))
    monkeypatch.setattr(scaling, "scale_rows_", spy("in place", scale_))
    return calls


def assert_float32_sum_of_float64(got: torch.Tensor, want: torch.Tensor, terms: int, scale: float) -> None:
    """Float32 against float64: a sum of ``terms`` float32 values of magnitude up to ``scale``, each off by a few
    units of float32's precision (2**-24 relative) through the small networks above it, is off by at most
    ``terms * scale * 2**-24`` times a few (the hierarchical test measured 1/60 of that bound); the bugs these
    tests catch move it by nats."""
    assert_close(got.double(), want, rtol=0, atol=4 * terms * scale * 2**-24)


def summed_terms(total_of, tensor: torch.Tensor, shape) -> float:
    """The largest sum of |terms| that the gradient of ``tensor``, broadcast to ``shape``, adds up.

    A broadcast input's gradient is a sum over the elements each of its values spans, whose terms may cancel:
    float32 errs by units of the terms, not of the sum, so its tolerance scales with this. ``total_of(full)`` is
    the scalar the gradient is of, computed by the reference with ``full``, a per-element copy of ``tensor``, in
    its place; this is that gradient in absolute value, summed back to ``tensor``'s shape.
    """
    full = tensor.detach().expand(shape).clone().requires_grad_()
    (per_element,) = torch.autograd.grad(total_of(full), full)
    return per_element.abs().sum_to_size(tensor.shape).max().item()


# Called with the worst error / bound of each assert_within: the seed sweep (tests/conftest.py) listens here.
MARGIN_OBSERVERS: list = []


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, name: str) -> None:
    """``|got - want| <= bound`` element by element (``bound`` from an error analysis, float64)."""
    error = (got.double() - want.double()).abs()
    for observe in MARGIN_OBSERVERS:
        observe(float((error / bound).max()))
    worst = torch.argmax(error - bound)
    assert (error <= bound).all(), (
        f"{name}: off by {error.flatten()[worst]:.3g} where the analysis allows {bound.flatten()[worst]:.3g}"
    )
