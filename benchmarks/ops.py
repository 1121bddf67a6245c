"""Op benchmarks: each fused op against the same reference code run eagerly and under torch.compile.

A case is one op at one shape and dtype. Each of its implementations
("eager": the reference in plain PyTorch, "compile": ``torch.compile`` of that
reference, "fastvae": the fused op) is timed for three passes, all with
autograd on, as in training:

* ``forward``: the op's outputs (and whatever it keeps for the backward);
* ``backward``: the gradients from a graph built beforehand;
* ``forward+backward``: both, one after the other.

Floor bytes are the fewest bytes each pass must move (every input read once,
every output written once; see the byte tables in ``kernels/*.py``); divided
by the measured copy bandwidth they give the floor time.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from benchmarks.harness import kernel_count, median_ms, median_ms_after_setup, rotating, synchronize
from fastvae.functional import discretized_logistic_mixture_nll, reconstruction_loss, reparameterize_kl, vector_quantize
from fastvae.ops.discretized_logistic_mixture import discretized_logistic_mixture_nll_reference, params_per_component
from fastvae.ops.reconstruction_loss import reconstruction_loss_reference
from fastvae.ops.reparameterize_kl import reparameterize_kl_reference

PASSES = ("forward", "backward", "forward+backward")
IMPLS = ("eager", "compile", "fastvae")
ROTATION_BYTES = 256 << 20  # inputs rotated until this much is in play


@dataclass
class OpCase:
    """One op at one shape and dtype, with its implementations and byte counts."""

    op: str
    variant: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make_inputs: Callable[[torch.device], dict]
    impls: dict[str, Callable[[dict], tuple]]
    floor_bytes: dict[str, int]
    grad_wrt: tuple[str, ...]
    notes: dict = field(default_factory=dict)

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nominal_elements(self) -> int:
        """The size the grid asked for: a loss case's whole samples may fall a little short of it."""
        return self.notes.get("nominal_elements", self.elements)


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * torch.tensor([], dtype=dtype).element_size()


# ---- reparameterize + KL --------------------------------------------------------------------------


def reparameterize_case(
    rows: int,
    d: int,
    dtype: torch.dtype,
    eps_given: bool,
    logvar_limit: float | None = None,
    logvar_clamp: tuple[float, float] | None = None,
) -> OpCase:
    """``reparameterize_kl`` on ``(rows, d)``: z gets a random upstream gradient, the summed KL a gradient of 1.

    ``logvar_limit``: the soft clamp fused in, as :class:`fastvae.nn.GaussianLatent` (and so every VAE of
    :mod:`fastvae.models`) calls the op by default; ``logvar_clamp``: the hard clamp, as diffusers' posterior
    (:mod:`fastvae.integrations.diffusers`) calls it. The reference computes either as separate ops.
    """
    clamps = dict(logvar_limit=logvar_limit, logvar_clamp=logvar_clamp)
    shape = (rows, d)

    def make_inputs(device):
        mu = torch.randn(shape, device=device).to(dtype).requires_grad_()
        logvar = (0.5 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
        eps = torch.randn(shape, device=device, dtype=dtype) if eps_given else None
        return {"mu": mu, "logvar": logvar, "eps": eps, "grad_z": torch.randn(shape, device=device, dtype=dtype)}

    def eager(t):
        eps = t["eps"] if eps_given else torch.randn_like(t["mu"])
        return reparameterize_kl_reference(t["mu"], t["logvar"], eps, "sum", **clamps)

    def fastvae(t):
        return reparameterize_kl(t["mu"], t["logvar"], t["eps"], reduction="sum", backend="triton", **clamps)

    n = _nbytes(shape, dtype)
    per_row = rows * 4
    reads_eps = n if eps_given else 0
    forward = 2 * n + reads_eps + n + per_row  # mu, logvar (, eps) -> z, kl
    backward = 3 * n + reads_eps + 2 * n  # grad_z, mu, logvar (, eps) -> grad_mu, grad_logvar
    variant = "eps given" if eps_given else "eps drawn"
    if logvar_limit is not None:
        variant = f"logvar_limit={logvar_limit:g}, {variant}"
    if logvar_clamp is not None:
        variant = f"logvar_clamp=({logvar_clamp[0]:g}, {logvar_clamp[1]:g}), {variant}"
    return OpCase(
        op="reparameterize_kl",
        variant=variant,
        shape=shape,
        dtype=dtype,
        make_inputs=make_inputs,
        impls={"eager": eager, "fastvae": fastvae},
        floor_bytes={"forward": forward, "backward": backward, "forward+backward": forward + backward},
        grad_wrt=("mu", "logvar"),
    )


# ---- reparameterize + KL against a Gaussian prior, on latent feature maps ---------------------------------------

LATENT_CHANNELS = 16  # VDVAE's zdim
STATE_WIDTH = 32  # the prior net's features for the state beside its 2 * 16 prior channels (the hvae's default)
LOGVAR_LIMIT = 10.0  # the soft clamp of fastvae's VAEs (and the hvae's) by default


def latent_map_case(batch: int, size: int, dtype: torch.dtype, prior: str) -> OpCase:
    """One VDVAE-style stochastic layer: ``reparameterize_kl`` on ``(B, 16, H, W)`` latent maps, one KL per image.

    ``mu`` and ``logvar`` are the channel halves of the posterior net's ``(B, 32, H, W)`` output, read in place
    (strided views, never copied), with ``event_dims=3`` and ``logvar_limit=10``; noise drawn. ``prior``:

    * ``"conditional"``: ``prior_mu`` and ``prior_logvar`` are channel slices of the prior net's
      ``(B, 2 * 16 + width, H, W)`` output (VDVAE, NVAE, fastvae's hvae), of ``mu``'s shape;
    * ``"shared"``: a learned prior ``(16, H, W)`` shared by the batch (its gradient summed over the rows).

    z gets a random upstream gradient, the summed KL a gradient of 1; gradients flow into every view.
    """
    c = LATENT_CHANNELS
    shape = (batch, c, size, size)

    def make_inputs(device):
        # Names starting with "_": the conv outputs whose views the op reads (they hold the storage, not inputs).
        posterior = torch.randn(batch, 2 * c, size, size, device=device).to(dtype).requires_grad_()
        t = {"_posterior": posterior, "grad_z": torch.randn(shape, device=device, dtype=dtype)}
        t["mu"], t["logvar"] = posterior[:, :c], posterior[:, c:]
        if prior == "conditional":
            prior_out = torch.randn(batch, 2 * c + STATE_WIDTH, size, size, device=device).to(dtype).requires_grad_()
            t["_prior_out"], t["prior_mu"], t["prior_logvar"] = prior_out, prior_out[:, :c], prior_out[:, c : 2 * c]
        else:
            t["prior_mu"] = torch.randn(shape[1:], device=device).to(dtype).requires_grad_()
            t["prior_logvar"] = (0.5 * torch.randn(shape[1:], device=device)).to(dtype).requires_grad_()
        return t

    def eager(t):
        return reparameterize_kl_reference(
            t["mu"], t["logvar"], torch.randn_like(t["mu"]), "sum", prior_mu=t["prior_mu"],
            prior_logvar=t["prior_logvar"], event_dims=3, logvar_limit=LOGVAR_LIMIT,
        )

    def fastvae(t):
        return reparameterize_kl(
            t["mu"], t["logvar"], prior_mu=t["prior_mu"], prior_logvar=t["prior_logvar"], event_dims=3,
            logvar_limit=LOGVAR_LIMIT, reduction="sum", backend="triton",
        )

    n = _nbytes(shape, dtype)
    prior_n = n if prior == "conditional" else _nbytes(shape[1:], dtype)
    forward = 2 * n + 2 * prior_n + n + batch * 4  # mu, logvar, the prior -> z, kl
    backward = 3 * n + 2 * prior_n + 2 * n + 2 * prior_n  # grad_z, mu, logvar, the prior -> their gradients
    return OpCase(
        op="reparameterize_kl",
        variant=f"feature maps, {prior} prior",
        shape=shape,
        dtype=dtype,
        make_inputs=make_inputs,
        impls={"eager": eager, "fastvae": fastvae},
        floor_bytes={"forward": forward, "backward": backward, "forward+backward": forward + backward},
        grad_wrt=("mu", "logvar", "prior_mu", "prior_logvar"),
        notes={"event_dims": 3, "logvar_limit": LOGVAR_LIMIT, "prior": prior},
    )


# ---- the discretized mixture of logistics -----------------------------------------------------------------------

NUM_MIXTURES = 10


def dmol_case(batch: int, image_shape: tuple[int, ...], dtype: torch.dtype, num_mixtures: int = NUM_MIXTURES) -> OpCase:
    """``discretized_logistic_mixture_nll`` summed over the batch: ``params`` ``(B, P, H, W)`` (``P = 10 M`` for RGB)
    in ``dtype``, 8-bit images ``x`` ``(B, C, H, W)`` in float32. The size of a case is ``params``' elements."""
    channels, *pixels = image_shape
    p = num_mixtures * params_per_component(channels)
    shape = (batch, p, *pixels)

    def make_inputs(device):
        params = torch.randn(shape, device=device).to(dtype).requires_grad_()
        x = torch.randint(0, 256, (batch, *image_shape), device=device).float() / 255
        return {"params": params, "x": x}

    def eager(t):
        return (discretized_logistic_mixture_nll_reference(t["params"], t["x"], num_mixtures, 8, "sum"),)

    def fastvae(t):
        return (
            discretized_logistic_mixture_nll(
                t["params"], t["x"], num_mixtures=num_mixtures, reduction="sum", backend="triton"
            ),
        )

    n = _nbytes(shape, dtype)
    forward = n + _nbytes((batch, *image_shape), torch.float32) + n + batch * 4  # params, x -> gradient, nll
    return OpCase(
        op="discretized_logistic_mixture_nll",
        variant=f"M={num_mixtures}",
        shape=shape,
        dtype=dtype,
        make_inputs=make_inputs,
        impls={"eager": eager, "fastvae": fastvae},
        floor_bytes={"forward": forward, "backward": 0, "forward+backward": forward},
        grad_wrt=("params",),
        notes={"image_shape": tuple(image_shape), "num_mixtures": num_mixtures},
    )


# ---- vector quantization ------------------------------------------------------------------------------------------

VQ_BETA = 0.25


def vq_distance_matrix(z: torch.Tensor, codebook: torch.Tensor, distances: str = "cdist") -> tuple:
    """The VQ layer as most VQ-VAE code writes it: the full ``(N, K)`` distance matrix, then ``argmin``.

    ``distances``: ``"cdist"`` (``torch.cdist``, as diffusers' ``VectorQuantizer``) or ``"einsum"`` (the
    expanded ``||z||^2 - 2 z.e + ||e||^2`` with an einsum, as vector-quantize-pytorch). Then the chosen codes
    (``F.embedding``), the codebook and commitment losses with ``detach`` and the straight-through
    ``z + (e - z).detach()``. Returns ``(z_q, loss summed over the vectors)``.
    """
    if distances == "cdist":
        distance = torch.cdist(z, codebook)
    else:
        distance = (z.square().sum(1, keepdim=True) - 2 * torch.einsum("nd,kd->nk", z, codebook)
                    + codebook.square().sum(1))
    indices = distance.argmin(dim=1)
    e = torch.nn.functional.embedding(indices, codebook)
    loss = (z.detach() - e).square().sum() + VQ_BETA * (z - e.detach()).square().sum()
    return z + (e - z).detach(), loss


def vq_case(n: int, k: int, d: int, dtype: torch.dtype, distances: str = "cdist") -> OpCase:
    """``vector_quantize`` of ``n`` vectors of ``d`` values against ``k`` codes, both learned by gradient (the
    codebook's gradient scattered too): z_q gets a random upstream gradient, the summed loss a gradient of 1. The
    eager implementation is :func:`vq_distance_matrix` (not fastvae's chunked reference): what VQ-VAEs run today.

    Floor bytes: the forward reads z and the codebook once and writes z_q and the indices; the backward reads
    z_q's gradient, z and z_q and writes both gradients (see ``kernels/vector_quantize.py``).
    """
    shape = (n, d)

    def make_inputs(device):
        z = torch.randn(shape, device=device).to(dtype).requires_grad_()
        codebook = torch.randn(k, d, device=device).to(dtype).requires_grad_()
        return {"z": z, "codebook": codebook, "grad_z": torch.randn(shape, device=device, dtype=dtype)}

    def eager(t):
        return vq_distance_matrix(t["z"], t["codebook"], distances)

    def fastvae(t):
        z_q, _, loss = vector_quantize(t["z"], t["codebook"], beta=VQ_BETA, reduction="sum", backend="triton")
        return z_q, loss

    vectors, codes = _nbytes(shape, dtype), _nbytes((k, d), dtype)
    forward = vectors + codes + vectors + n * 8 + n * 4
    backward = 3 * vectors + vectors + codes
    return OpCase(
        op="vector_quantize",
        variant=f"K={k}, vs {distances}",
        shape=shape,
        dtype=dtype,
        make_inputs=make_inputs,
        impls={"eager": eager, "fastvae": fastvae},
        floor_bytes={"forward": forward, "backward": backward, "forward+backward": forward + backward},
        grad_wrt=("z", "codebook"),
        # Counted apart (benchmarks/static/vq.py): the eager matrix would not fit a CPU's memory at these sizes.
        notes={"num_codes": k, "counted_apart": True},
    )


# ---- reconstruction losses ------------------------------------------------------------------------


def loss_case(kind: str, batch: int, sample_shape: tuple[int, ...], dtype: torch.dtype) -> OpCase:
    """``reconstruction_loss`` summed over the batch (``loss.backward()`` gives a gradient of 1).

    The Gaussian likelihood learns one log-variance per feature.
    """
    shape = (batch, *sample_shape)

    def make_inputs(device):
        x_hat = torch.randn(shape, device=device).to(dtype).requires_grad_()
        x = torch.rand(shape, device=device).to(dtype)
        logvar = None
        if kind == "gaussian":
            logvar = (0.1 * torch.randn(sample_shape, device=device)).requires_grad_()
        return {"x_hat": x_hat, "x": x, "logvar": logvar}

    def eager(t):
        return (reconstruction_loss_reference(t["x_hat"], t["x"], kind, "sum", t["logvar"]),)

    def fastvae(t):
        return (reconstruction_loss(t["x_hat"], t["x"], kind, reduction="sum", logvar=t["logvar"], backend="triton"),)

    n = _nbytes(shape, dtype)
    logvar_bytes = 2 * _nbytes(sample_shape, torch.float32) if kind == "gaussian" else 0
    # With the gradient written in the forward, the backward only has to hand it on.
    forward = 2 * n + n + logvar_bytes + batch * 4
    return OpCase(
        op=kind,
        variant="logvar per feature" if kind == "gaussian" else "",
        shape=shape,
        dtype=dtype,
        make_inputs=make_inputs,
        impls={"eager": eager, "fastvae": fastvae},
        floor_bytes={"forward": forward, "backward": 0, "forward+backward": forward},
        grad_wrt=("x_hat", "logvar") if kind == "gaussian" else ("x_hat",),
    )


# ---- running a case -------------------------------------------------------------------------------


def _grad_outputs(outputs: tuple, inputs: dict) -> list:
    """Upstream gradients: the case's own random ``grad_z`` for a sample, 1 for a scalar loss."""
    grads = []
    for out in outputs:
        if out.dim() == 0:
            grads.append(torch.ones_like(out))
        else:
            grads.append(inputs["grad_z"])
    return grads


def implementation(case: OpCase, impl_name: str) -> Callable[[dict], tuple]:
    """The callable for ``impl_name``: ``compile`` is ``torch.compile`` of the eager reference (static shapes)."""
    if impl_name == "compile":
        return torch.compile(case.impls["eager"], dynamic=False)
    return case.impls[impl_name]


@dataclass
class Pass:
    """A timed pass: ``fn(setup())``, where ``setup`` (untimed) prepares what ``fn`` consumes."""

    setup: Callable[[], object]
    fn: Callable[[object], object]

    def __call__(self):
        return self.fn(self.setup())


def passes(case: OpCase, impl: Callable[[dict], tuple], device: torch.device) -> dict[str, Pass]:
    """The three timed passes of one implementation, over rotating input sets.

    The backward consumes a graph built by its untimed setup: compiled
    backwards free their buffers, so a graph cannot be reused with retain_graph.
    """
    n_sets = max(1, min(4, ROTATION_BYTES // max(case.floor_bytes["forward"], 1)))
    next_inputs = rotating([case.make_inputs(device) for _ in range(n_sets)])

    def wrt(t):
        return [t[name] for name in case.grad_wrt if t.get(name) is not None]

    def build_graph():
        t = next_inputs()
        out = impl(t)
        return out, wrt(t), _grad_outputs(out, t)

    def backward(graph):
        return torch.autograd.grad(*graph)

    def forward_backward(t):
        out = impl(t)
        return torch.autograd.grad(out, wrt(t), _grad_outputs(out, t))

    return {
        "forward": Pass(next_inputs, impl),
        "backward": Pass(build_graph, backward),
        "forward+backward": Pass(next_inputs, forward_backward),
    }


def saved_bytes(impl: Callable[[dict], tuple], inputs: dict, device: torch.device) -> int | None:
    """Bytes an implementation's forward keeps alive for its backward, beyond its inputs and outputs."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    out = impl(inputs)
    synchronize(device)
    kept = torch.cuda.memory_allocated(device) - before
    return kept - sum(o.untyped_storage().nbytes() for o in out)


def measure_case(case: OpCase, device: torch.device, impls=IMPLS, count_kernels: bool = True) -> list[dict]:
    """Time every implementation and pass of ``case``; one record per (implementation, pass)."""
    torch.manual_seed(0)
    records = []
    for impl_name in impls:
        impl = implementation(case, impl_name)
        first = _time_first_call(impl, case.make_inputs(device), device)
        timed = passes(case, impl, device)
        for pass_name in PASSES:
            p = timed[pass_name]
            # Inputs cycle cheaply inside a timed call; a backward's graph must be built outside it.
            ms = median_ms_after_setup(p.setup, p.fn, device) if pass_name == "backward" else median_ms(p, device)
            records.append({
                "suite": "op",
                "op": case.op,
                "variant": case.variant,
                "shape": list(case.shape),
                "elements": case.elements,
                "nominal_elements": case.nominal_elements,
                "dtype": str(case.dtype).replace("torch.", ""),
                "impl": impl_name,
                "pass": pass_name,
                "ms": ms,
                "floor_bytes": case.floor_bytes[pass_name],
                "first_call_ms": first if pass_name == "forward" else None,
                "kernels": _kernels_of(p, device) if count_kernels else None,
                "saved_bytes": saved_bytes(impl, case.make_inputs(device), device) if pass_name == "forward" else None,
            })
        del timed
    return records


def _kernels_of(p: Pass, device: torch.device) -> int | None:
    state = p.setup()
    return kernel_count(lambda: p.fn(state), device)


def _time_first_call(impl, inputs, device) -> float:
    """Wall time of the first forward+backward: for ``compile`` this is the compile time, reported apart."""
    synchronize(device)
    start = time.perf_counter()
    out = impl(inputs)
    grad_wrt = [v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    torch.autograd.grad(out, grad_wrt, _grad_outputs(out, inputs), allow_unused=True)
    synchronize(device)
    return (time.perf_counter() - start) * 1000


# ---- the grids ------------------------------------------------------------------------------------

LATENT_D = 256
LAUNCH_BOUND_D = 32
SAMPLE_SHAPES = {"784": (784,), "3x64x64": (3, 64, 64), "3x256x256": (3, 256, 256)}
LOSS_KINDS = ("mse", "bce", "gaussian", "l1")
# Latent map sizes H = W of the VDVAE-like layers (issue 10: 1 to 64), the headline one first.
LATENT_MAP_SIZES = (32, 64, 8, 1)
PRIORS = ("conditional", "shared")
DMOL_IMAGES = {"3x32x32": (3, 32, 32), "3x256x256": (3, 256, 256)}
# Issue 19: 65,536 vectors (a batch of 64 at 32x32) of 64 values against codebooks of these sizes.
VQ_VECTORS, VQ_DIM = 65536, 64
VQ_CODES = (512, 4096, 16384, 65536)


def op_cases(grid: str, dtypes: list[torch.dtype], ops: set[str] | None = None) -> list[OpCase]:
    """The cases of a grid: ``"smoke"`` (tiny, CPU), ``"default"`` (a few minutes on an H100) or ``"full"``."""
    vq_vectors, vq_codes = VQ_VECTORS, VQ_CODES
    if grid == "smoke":
        latent_exps, launch_batches, loss_totals = (10, 14), (256,), (1 << 14,)
        shapes = {"784": (784,), "3x32x32": (3, 32, 32)}
        map_sizes, map_totals, dmol_images, clamp_exps = (4,), (1 << 12,), {"3x8x8": (3, 8, 8)}, (14,)
        vq_vectors, vq_codes = 256, (64,)
    elif grid == "default":
        latent_exps, launch_batches, loss_totals = (14, 18, 22, 24, 26, 28), (256, 1024, 4096, 16384), (1 << 24,)
        shapes = SAMPLE_SHAPES
        map_sizes, map_totals, dmol_images, clamp_exps = LATENT_MAP_SIZES, (1 << 24,), DMOL_IMAGES, (24,)
    else:
        latent_exps = tuple(range(14, 29, 2))
        launch_batches, loss_totals = (256, 1024, 4096, 16384), (1 << 20, 1 << 24, 1 << 26)
        shapes = SAMPLE_SHAPES
        map_sizes, map_totals, dmol_images, clamp_exps = LATENT_MAP_SIZES, (1 << 20, 1 << 24), DMOL_IMAGES, (20, 24)
    cases = []
    for dtype in dtypes:
        for exp in latent_exps:
            for eps_given in (True, False):
                cases.append(reparameterize_case((1 << exp) // LATENT_D, LATENT_D, dtype, eps_given))
        for exp in clamp_exps:  # the soft clamp every VAE of fastvae.models fuses in
            cases.append(reparameterize_case((1 << exp) // LATENT_D, LATENT_D, dtype, False, LOGVAR_LIMIT))
        for prior in PRIORS:
            for size in map_sizes:
                for total in map_totals:
                    cases.append(latent_map_case(max(1, total // (LATENT_CHANNELS * size * size)), size, dtype, prior))
        for image_shape in dmol_images.values():
            per_sample = NUM_MIXTURES * params_per_component(image_shape[0]) * math.prod(image_shape[1:])
            for total in loss_totals:
                case = dmol_case(max(1, total // per_sample), image_shape, dtype)
                case.notes["nominal_elements"] = max(total, case.elements)
                cases.append(case)
        for k in vq_codes:
            cases.append(vq_case(vq_vectors, k, VQ_DIM, dtype))
        for batch in launch_batches:
            case = reparameterize_case(batch, LAUNCH_BOUND_D, dtype, eps_given=False)
            case.variant = f"eps drawn, launch-bound D={LAUNCH_BOUND_D}"
            cases.append(case)
        for kind in LOSS_KINDS:
            for name, sample_shape in shapes.items():
                for total in loss_totals:
                    batch = max(1, total // math.prod(sample_shape))
                    case = loss_case(kind, batch, sample_shape, dtype)
                    case.notes["nominal_elements"] = max(total, case.elements)
                    cases.append(case)
    return [c for c in cases if ops is None or c.op in ops]
