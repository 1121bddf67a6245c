"""The backward of a fused op whose forward already wrote the gradient of its inputs.

Some fused ops (the reconstruction losses, the discretized mixture of
logistics) compute ``G = s * d(per-sample loss)/d(input)`` in the same pass as
the loss, with the reduction's scale ``s`` folded in, and return ``G`` from
their custom op as extra outputs that the user never sees. Their backward then only has to multiply ``G`` by the upstream
gradient ``w`` (``(B,)`` per sample, or a scalar), which this module does
without reading ``w`` on the host, in one of four ways (:func:`backward_mode`):

==================  ================================================  ===============================================
mode                when                                              ``w * G``
==================  ================================================  ===============================================
``OWN``             eager ``backward()``/``grad()``, graph not kept,  in place in ``G``, skipping rows whose weight
                    no ``create_graph``                               is exactly 1 (free for ``w = 1``)
``COPY``            eager, ``retain_graph=True``                      a new tensor: ``G`` stays for the next backward
``TRACED``          torch.compile, AOTAutograd, make_fx               a new tensor, by ``fastvae::scale_per_sample``
``DIFFERENTIABLE``  ``create_graph=True``, or a double backward       plain torch ops, which autograd records
==================  ================================================  ===============================================

``OWN`` is safe because no one can run this backward again: the graph is
freed as it goes, and ``G`` is referenced by nothing but this node, so the
buffer is handed over once and two gradients never share memory. A traced
graph must serve any later upstream gradient and any ``retain_graph``, so it
always scales out of place (Inductor may reuse the buffer itself).

Higher order: the op returns ``G`` as *differentiable* outputs, so the first
derivative ``w * G`` computed in torch ops under ``create_graph=True`` is
itself differentiable through the op. A double backward then reaches the op's
backward with gradients ``v`` for its ``G`` outputs, where the op adds the
Hessian-vector products ``H v``, written as differentiable torch ops of ``G``
and the saved inputs, so that third and higher orders follow by the same
recursion. :func:`add_grads` sums the two parts. Ops with this design:
:mod:`fastvae.ops.reconstruction_loss`. :mod:`fastvae.ops.discretized_logistic_mixture`
uses the first three modes alike, but its Hessian is not per element: its saved
gradient is not differentiable, and under ``create_graph=True`` it differentiates
its reference at the saved inputs instead.
"""
from __future__ import annotations

import enum

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


class Mode(enum.Enum):
    """How a backward applies the upstream gradient to a saved gradient (see the module docstring)."""

    OWN = "own"
    COPY = "copy"
    TRACED = "traced"
    DIFFERENTIABLE = "differentiable"


def is_tracing(tensor: torch.Tensor) -> bool:
    """Whether this code runs in a trace (torch.compile, AOTAutograd, make_fx) rather than on real values.

    A tracer shows as Dynamo compiling, a dispatch mode (functionalization,
    fake tensors, proxies), or ``tensor`` being one of their tensor subclasses.
    """
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or type(tensor) is not torch.Tensor


def _graph_is_kept() -> bool:
    """Whether the running backward keeps its graph (``retain_graph``); AOTAutograd reads this flag too."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else keep_graph()


def backward_mode(tensor: torch.Tensor, *, higher_order: bool = False) -> Mode:
    """The mode of the backward now running; ``tensor`` is any tensor it received.

    ``higher_order`` says the backward received gradients for the op's saved
    gradient outputs (a double backward), whose answer must be computed in
    torch ops even without ``create_graph``. Reads no tensor's values.
    """
    if higher_order:
        return Mode.DIFFERENTIABLE
    if is_tracing(tensor):
        return Mode.TRACED
    if torch.is_grad_enabled():  # the engine enables grad mode in a backward exactly under create_graph=True
        return Mode.DIFFERENTIABLE
    return Mode.COPY if _graph_is_kept() else Mode.OWN


def _kernels():
    # Imported on first use: fastvae imports without Triton.
    from fastvae.kernels import scale_rows

    return scale_rows


def _as_rows(grad: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad`` (contiguous ``(B, ...)``) as a ``(rows, n)`` matrix, ``weight`` as ``(rows,)``: a row per weight."""
    rows = weight.shape[0] if weight.dim() == 1 else 1
    return grad.view(rows, -1), weight.reshape(rows)


@torch.library.custom_op("fastvae::scale_per_sample", mutates_args=())
def _scale_per_sample(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A new ``grad * weight``: ``grad`` contiguous ``(B, ...)`` with ``weight`` ``(B,)`` float32, or a scalar."""
    if grad.numel() == 0:
        return torch.empty_like(grad)
    return _kernels().scale_rows(*_as_rows(grad, weight)).view(grad.shape)


@_scale_per_sample.register_fake
def _(grad, weight):
    return torch.empty_like(grad)


def per_sample(weight: torch.Tensor, ndim: int) -> torch.Tensor:
    """``weight`` (a scalar or ``(B,)``) shaped to broadcast against a ``(B, ...)`` tensor of ``ndim`` dims."""
    return weight if weight.dim() == 0 else weight.reshape(weight.shape + (1,) * (ndim - 1))


def apply_upstream(saved: torch.Tensor, weight: torch.Tensor, mode: Mode) -> torch.Tensor:
    """``saved * weight`` row by row, as ``mode`` says; ``saved`` is a contiguous ``(B, ...)`` saved gradient.

    ``weight`` is the upstream gradient, float32, ``(B,)`` or a scalar. The
    product is taken in float32 and rounded once to ``saved``'s dtype in every
    mode, so all four give the same values. ``OWN`` overwrites ``saved`` and
    returns it; call it at most once per buffer, after anything else that
    reads it.
    """
    if mode is Mode.DIFFERENTIABLE:
        return (saved.float() * per_sample(weight, saved.dim())).to(saved.dtype)
    if mode is Mode.OWN:
        if saved.numel():
            _kernels().scale_rows_(*_as_rows(saved, weight))
            # The kernel wrote through a pointer: tell autograd's version checks that the buffer changed.
            torch.autograd.graph.increment_version(saved)
        return saved
    return _scale_per_sample(saved, weight)


def add_grads(*terms: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The sum of the terms that are not ``None``, in ``dtype`` (``None`` if all are)."""
    present = [t for t in terms if t is not None]
    if not present:
        return None
    total = present[0]
    for term in present[1:]:
        total = total + term
    return total.to(dtype)
