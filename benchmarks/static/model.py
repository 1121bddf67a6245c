"""The byte model: what each op launches, moves and keeps, from its shapes alone.

This is the byte tables of the kernels' docstrings (``kernels/*.py``) and the
README, written as code so that the counts (:mod:`benchmarks.static.counts`)
can check them and the tests can assert them. Units are the op's elements n
times their element size; terms per sample or per feature (the KL per row,
a shared ``logvar``) are left out, as the docstrings leave them out.

Fused costs hold for float32, bfloat16 and float16. Eager costs are those of
the float32 reference (``*_reference`` in ``fastvae/ops/``), counted per ATen
call as the docstrings count them: each call reads its tensor arguments and
writes its outputs once, views are free.

To model a new op: a function returning ``{"eager": Cost, "fastvae": Cost}``
and one entry in :data:`OP_MODELS`.
"""

from __future__ import annotations

from dataclasses import dataclass

COLUMN_BLOCK_ROWS = 16  # kernels/reconstruction_loss.py: rows a tile adds up for a shared logvar's gradient
PHILOX_STATE_BYTES = 16  # the (seed, first counter) int64 pair reparameterize_kl keeps instead of the noise
# An ATen call beside a fused kernel counts as "small" when it reads at most this fraction of a unit:
# partial sums over column splits or row tiles, a shared logvar's gradient, the reduction over samples.
SMALL_FRACTION = 1 / 8
# The models' loss is the batch mean of the likelihood (``reduction="mean"``): the fused op folds 1 / B into its
# forward, the reference takes a mean whose backward is one more kernel.
MEAN_BACKWARD = 1
# Eager costs quoted to two decimals (the DMOL reference's): their checks allow this much more.
QUOTED = 0.01


@dataclass(frozen=True)
class Cost:
    """One op's forward and backward: kernels, bytes moved and bytes kept, in units of n x element size.

    ``forward_kernels`` counts the kernels that touch n-sized data (the fused
    kernel, or every ATen call of the reference); fused ops may add small
    reductions (see :data:`SMALL_FRACTION`) beside them, and the reference's
    reduction over samples is counted apart (``reduction``).
    """

    forward_kernels: int
    backward_kernels: int
    forward_units: float
    backward_units: float
    kept_units: float  # kept for the backward, beyond the op's inputs
    kept_bytes: int = 0  # kept beyond the inputs, of a fixed size
    kept_inputs: tuple[str, ...] = ()  # which inputs the backward keeps

    @property
    def units(self) -> float:
        return self.forward_units + self.backward_units


def reparameterize_kl(eps_given: bool, logvar_limit: bool = False) -> dict[str, Cost]:
    """``reparameterize_kl(mu, logvar, eps)``, with gradients flowing from both ``z`` and the KL.

    Fused (``kernels/reparameterize_kl.py``): the forward reads mu, logvar
    (and eps) and writes z; the backward reads grad_z, mu, logvar (and eps) and
    writes both gradients; the noise is regenerated, never kept; the soft clamp
    (``logvar_limit``) is computed in registers. Eager: z takes mul, exp, mul,
    add; the KL add, mul, sub, exp, sub, sum, mul; drawn noise one randn. Its
    backward is 13 calls; it keeps exp(logvar / 2), exp(logvar), mu, and the
    noise. The clamp ``L tanh(logvar / L)`` adds div, tanh, mul (6 units) and
    keeps tanh's output; its backward tanh_backward, div and a mul (7 units).
    """
    eps = 1 if eps_given else 0
    clamp = 1 if logvar_limit else 0
    fused = Cost(1, 1, 3 + eps, 5 + eps, 0, PHILOX_STATE_BYTES, ("mu", "logvar") + (("eps",) if eps_given else ()))
    eager = Cost(
        11 + (1 - eps) + 3 * clamp,
        13 + 3 * clamp,
        24 - eps + 6 * clamp,
        30 + 7 * clamp,
        2 + (1 - eps) + clamp,
        0,
        ("mu",) + (("eps",) if eps_given else ()),
    )
    return {"eager": eager, "fastvae": fused}


def reparameterize_kl_prior(prior: str, itemsize: int = 4) -> dict[str, Cost]:
    """``reparameterize_kl`` of a VDVAE-style layer: a Gaussian prior, ``logvar_limit``, noise drawn.

    ``prior``: ``"conditional"`` (``prior_mu``, ``prior_logvar`` of ``mu``'s shape) or ``"shared"`` (by every
    row: ``(C, H, W)`` against ``(B, C, H, W)`` maps). Fused (``kernels/reparameterize_kl.py``): a conditional
    prior adds a read per tensor to the forward and a read and a gradient's write to the backward (5 + 9); a
    shared one is read at its own size (left out), and its gradient's float32 partial sums over row tiles of at
    least ``COLUMN_BLOCK_ROWS`` rows are written and read back: at most 1/8 unit per tensor in float32, 1/4 in
    half precision (exactly that where a tile is 16 rows: events of 256 elements and more). Eager: the float32
    reference, counted per ATen call at a large batch (the per-row and per-feature terms left out): the clamp
    of both log-variances, the KL of two Gaussians, and for a shared prior the sums of its gradients over the
    batch.
    """
    tensors = ("mu", "logvar", "prior_mu", "prior_logvar")
    if prior == "conditional":
        fused = Cost(1, 1, 5, 9, 0, PHILOX_STATE_BYTES, tensors)
        eager = Cost(23, 25, 49, 59, 8, 0, ())
    elif prior == "shared":
        partial_sums = 2 * 2 * 4 / (COLUMN_BLOCK_ROWS * itemsize)  # two tensors' sums, written and read
        fused = Cost(1, 1, 3, 5 + partial_sums, 0, PHILOX_STATE_BYTES, tensors)
        eager = Cost(23, 28, 36, 46, 6, 0, ())
    else:
        raise KeyError(f"no byte model for a {prior!r} prior")
    return {"eager": eager, "fastvae": fused}


def discretized_logistic_mixture(channels: int, num_mixtures: int, itemsize: int = 4) -> dict[str, Cost]:
    """``discretized_logistic_mixture_nll(params, x)`` with float32 images ``x``, units of ``params``' size.

    Fused (``kernels/discretized_logistic_mixture.py``): the forward reads params and x and writes the gradient
    (2, plus x's ``C / P`` of params' elements in float32); the backward scales the saved gradient in place,
    which for an upstream gradient of 1 is a launch and no traffic. It keeps the gradient (1 unit) and references
    to params and x. Eager: the reference counted per ATen call for RGB images at M = 10 (its ``53`` and ``66``
    calls, of which 50 and 64 launch kernels besides the reduction over samples); float32 params. It keeps 2.73
    units of its own and params. Greyscale (M = 10, 30 channels): 43 + 51 kernels, 23.95 + 35.15 units, 47 / 15
    kept.
    """
    p = num_mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)
    x_units = channels * 4 / (p * itemsize)
    fused = Cost(1, 1, 2 + x_units, 0, 1, 0, ("params", "x"))
    if (channels, num_mixtures) not in _EAGER_DMOL:
        raise KeyError(f"no eager byte model for the DMOL of {channels} channels at M = {num_mixtures}")
    eager = Cost(*_EAGER_DMOL[(channels, num_mixtures)], 0, ("params",))
    return {"eager": eager, "fastvae": fused}


# (channels, M) -> (forward kernels, backward kernels, forward units, backward units, kept units) of the float32
# DMOL reference with reduction="none", counted per ATen call (the counts scale with B H W).
_EAGER_DMOL = {(3, 10): (50, 64, 22.25, 36.55, 2.73), (1, 10): (43, 51, 23.95, 35.15, 47 / 15)}


# kind -> (forward kernels, backward kernels, forward units, backward units, kept units, kept inputs) of the
# float32 reference with reduction="none"; the gaussian's logvar per feature, per element, or a scalar.
_EAGER_LOSS = {
    "mse": (3, 3, 6, 6, 1, ()),
    "l1": (3, 2, 6, 4, 1, ()),
    "bce": (16, 16, 30.75, 29, 2.5, ("x_hat", "x")),
    "gaussian per feature": (9, 12, 14, 17, 2, ()),
    "gaussian per element": (9, 10, 20, 24, 3, ()),
    "gaussian scalar": (9, 12, 14, 17, 2, ()),
}


def reconstruction_loss(
    kind: str, logvar: str | None = None, upstream_one: bool = True, itemsize: int = 4
) -> dict[str, Cost]:
    """``reconstruction_loss(x_hat, x, kind)`` with the gradient of ``x_hat`` (and ``logvar``).

    ``logvar``: ``"per feature"``, ``"per element"`` or ``"scalar"`` for the
    gaussian. ``upstream_one``: the upstream gradient is exactly 1 (a ``"sum"``
    or ``"mean"`` loss under ``loss.backward()``), so the fused backward's one
    launch (the in-place scaling) skips every row and moves nothing; otherwise
    it scales the saved gradient (read + write).

    Fused (``kernels/reconstruction_loss.py``): forward reads x_hat, x and
    writes the gradient (3); a per-element logvar adds its read and its
    gradient's write (5), and a scaled backward reads and writes each kept
    gradient. A logvar per feature under a ``"sum"`` or ``"mean"`` loss has its
    gradient summed over tiles of ``COLUMN_BLOCK_ROWS`` rows: n / 16 float32
    partial sums, written by the kernel and read back by the sum over tiles.
    """
    per_element = 1 if logvar == "per element" else 0
    scaled = 0 if upstream_one else 1
    columns = 2 * 4 / (COLUMN_BLOCK_ROWS * itemsize) if logvar == "per feature" and upstream_one else 0
    # The backward scales each saved gradient with a launch of its own: x_hat's, and a learned logvar's.
    backward_kernels = 2 if kind == "gaussian" else 1
    fused = Cost(1, backward_kernels, 3 + 2 * per_element + columns, scaled * 2 * (1 + per_element), 1 + per_element)
    key = f"{kind} {logvar}" if kind == "gaussian" else kind
    fk, bk, fu, bu, kept, inputs = _EAGER_LOSS[key]
    return {"eager": Cost(fk, bk, fu, bu, kept, 0, inputs), "fastvae": fused}


def model_of(op: str, variant: str, itemsize: int = 4) -> dict[str, Cost]:
    """The model of a benchmark case (its op and variant, as :func:`benchmarks.ops.op_cases` names them)."""
    for (name, prefix), build in OP_MODELS.items():
        if name == op and variant.startswith(prefix):
            return build(itemsize)
    raise KeyError(f"no byte model for {op} ({variant}): add it to benchmarks/static/model.py")


# (op, variant prefix) -> the model of that benchmark case (a function of the element size).
OP_MODELS = {
    ("reparameterize_kl", "logvar_limit"): lambda itemsize: reparameterize_kl(eps_given=False, logvar_limit=True),
    ("reparameterize_kl", "feature maps, conditional"): lambda itemsize: reparameterize_kl_prior("conditional", itemsize),
    ("reparameterize_kl", "feature maps, shared"): lambda itemsize: reparameterize_kl_prior("shared", itemsize),
    ("discretized_logistic_mixture_nll", "M=10"): lambda itemsize: discretized_logistic_mixture(3, 10, itemsize),
    ("reparameterize_kl", "eps given"): lambda itemsize: reparameterize_kl(eps_given=True),
    ("reparameterize_kl", "eps drawn"): lambda itemsize: reparameterize_kl(eps_given=False),
    ("mse", ""): lambda itemsize: reconstruction_loss("mse", itemsize=itemsize),
    ("l1", ""): lambda itemsize: reconstruction_loss("l1", itemsize=itemsize),
    ("bce", ""): lambda itemsize: reconstruction_loss("bce", itemsize=itemsize),
    ("gaussian", "logvar per feature"): lambda itemsize: reconstruction_loss(
        "gaussian", "per feature", itemsize=itemsize
    ),
}


# ---- one VAE training step ---------------------------------------------------------------------------------------


def dmol_split_sums(batch: int, pixels: int, channels: int) -> int:
    """Small kernels beside the fused DMOL forward: 1 when the launch planner (sized for an H100) splits the
    pixels of a sample over several programs, whose partial sums are then added (else 0)."""
    from benchmarks.static.capture import planning_for_h100
    from fastvae.kernels.discretized_logistic_mixture import plan

    with planning_for_h100():
        tiling = plan(batch, pixels, channels, "cuda")
    return int(tiling.n_splits > 1)


def vae_step_savings(
    batch: int,
    latent_dim: int,
    image_shape: tuple[int, ...],
    likelihood: str = "bce",
    *,
    logvar_limit: bool = True,
    num_mixtures: int = 10,
) -> dict:
    """Kernels and float32 bytes kept that one VAE training step saves with the fused ops, against the reference.

    The VAE calls ``reparameterize_kl`` on the halves of its linear head (noise
    drawn; with the soft clamp when ``logvar_limit``, as fastvae's VAEs do by
    default) and the likelihood with ``reduction="mean"`` (the per-image values
    come beside it, detached), so the loss's upstream gradient is 1 and the
    saved gradient is handed over unscaled. Everything else in the step is the
    same code on both paths and cancels. Inputs kept count by storage: the linear head's output (``mu`` and
    ``logvar`` are its halves) is kept by both paths, the image batch by the
    encoder's first layer anyway, the decoder's output by the eager BCE and by
    both DMOL paths. The fused DMOL forward adds a small sum of partial
    results where the launch planner splits a sample (:func:`dmol_split_sums`).
    """
    channels, *pixel_dims = image_shape
    pixels = 1
    for size in pixel_dims:
        pixels *= size
    n_z = batch * latent_dim
    extra_kernels = 0
    if likelihood == "dmol":
        loss = discretized_logistic_mixture(channels, num_mixtures)
        n_x = batch * pixels * num_mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)
        inputs = {"params": n_x}
        extra_kernels = dmol_split_sums(batch, pixels, channels)
    else:
        logvar = "scalar" if likelihood == "gaussian" else None  # the VAE's default learned variance
        loss = reconstruction_loss(likelihood, logvar, upstream_one=True)
        n_x = batch * channels * pixels
        inputs = {"x_hat": n_x}
    parts = [(reparameterize_kl(eps_given=False, logvar_limit=logvar_limit), n_z, {}), (loss, n_x, inputs)]
    # The batch mean: a mean kernel on both paths, whose backward (a div) only the reference launches.
    kernels, kept = MEAN_BACKWARD - extra_kernels, 0
    for costs, n, input_elements in parts:
        eager, fused = costs["eager"], costs["fastvae"]
        kernels += eager.forward_kernels + eager.backward_kernels - fused.forward_kernels - fused.backward_kernels
        kept += round((eager.kept_units - fused.kept_units) * n * 4) + eager.kept_bytes - fused.kept_bytes
        for name, elements in input_elements.items():
            kept += 4 * elements * ((name in eager.kept_inputs) - (name in fused.kept_inputs))
    return {"kernels": kernels, "kept_bytes": kept}


def kl_split_sums(n_rows: int, n_cols: int) -> int:
    """Small kernels beside the fused ``reparameterize_kl`` forward (no shared prior): 1 when the launch planner
    (sized for an H100) splits the columns of a row over several programs, whose partial KLs are then added."""
    from benchmarks.static.capture import planning_for_h100
    from fastvae.kernels.reparameterize_kl import plan_forward

    with planning_for_h100():
        tiling = plan_forward(n_rows, n_cols, "cuda", shared_prior=False)
    return int(tiling.n_splits > 1)


def hvae_step_kernels_saved(batch: int, latent_shapes, likelihood: str = "bce") -> int:
    """Kernels one training step of the hierarchical VAE saves: each stochastic layer's sample and KL against its
    conditional prior (:func:`reparameterize_kl_prior`; ``latent_shapes`` are the layers' ``(C, H, W)``, one row
    per sample and channel, less the partial sums of :func:`kl_split_sums`), and the likelihood's loss, as in
    :func:`vae_step_savings` (the kept bytes are not modelled: which storages each path keeps depends on the
    layers' views)."""
    layers = len(latent_shapes)
    per_layer = reparameterize_kl_prior("conditional")
    loss = reconstruction_loss(likelihood, "scalar" if likelihood == "gaussian" else None, upstream_one=True)
    total = MEAN_BACKWARD - sum(kl_split_sums(batch * c, h * w) for c, h, w in latent_shapes)
    for costs, count in ((per_layer, layers), (loss, 1)):
        eager, fused = costs["eager"], costs["fastvae"]
        total += count * (eager.forward_kernels + eager.backward_kernels - fused.forward_kernels - fused.backward_kernels)
    return total


# ---- checking the counts -----------------------------------------------------------------------------------------


def _check(what: str, model, counted, tolerance: float = 0.0) -> dict:
    agree = counted is not None and abs(counted - model) <= tolerance
    return {"check": what, "model": model, "counted": counted, "agree": agree}


def check_op(record: dict) -> list[dict]:
    """The counts of one op record (see :func:`benchmarks.static.counts.count_ops`) against its model."""
    unit = record["unit_bytes"]
    try:
        costs = model_of(record["op"], record["variant"], unit // record["elements"])
    except KeyError as missing:
        return [
            {"check": f"{_name(record)}: model", "model": None, "counted": None, "agree": False, "note": str(missing)}
        ]
    shape = record["shape"]
    if record["op"] == "reparameterize_kl":
        features = shape[-1] if not record["variant"].startswith("feature maps") else record["elements"] // shape[0]
    elif record["op"] == "discretized_logistic_mixture_nll":
        features = record["elements"] // (shape[0] * shape[1])  # partial sums per sample and pixel split
    else:
        features = record["elements"] // shape[0]
    rows = shape[0]
    # The terms the model leaves out, per sample or per feature (a KL or a loss per sample, a shared logvar and
    # its gradient, partial sums over splits): up to 16 float32 passes over rows + features values, in units.
    slack = 16 * 4 * (rows + features) / unit
    name = _name(record)
    out = []
    fused, counted = costs["fastvae"], record["impls"].get("fastvae")
    if counted:
        out += [
            _check(
                f"{name}: fastvae Triton kernels, forward", fused.forward_kernels, counted["forward"]["triton_kernels"]
            ),
            _check(
                f"{name}: fastvae Triton kernels, backward",
                fused.backward_kernels,
                counted["backward"]["triton_kernels"],
            ),
            _check(
                f"{name}: fastvae units moved, forward", fused.forward_units, counted["forward"]["bytes"] / unit, slack
            ),
            _check(
                f"{name}: fastvae units moved, backward",
                fused.backward_units,
                counted["backward"]["bytes"] / unit,
                slack,
            ),
            _check(
                f"{name}: fastvae units kept beyond inputs",
                fused.kept_units,
                counted["saved_beyond_inputs"] / unit,
                slack,
            ),
        ]
    eager, counted = costs["eager"], record["impls"].get("eager")
    if counted and record["dtype"] == "float32":
        reduction = 1  # the runner's cases reduce with "sum": one more small kernel in the reference's forward
        out += [
            _check(f"{name}: eager kernels, forward", eager.forward_kernels + reduction, counted["forward"]["kernels"]),
            _check(f"{name}: eager kernels, backward", eager.backward_kernels, counted["backward"]["kernels"]),
            _check(
                f"{name}: eager units moved, forward + backward",
                eager.units,
                (counted["forward"]["bytes"] + counted["backward"]["bytes"]) / unit,
                2 * slack + QUOTED,
            ),
            _check(
                f"{name}: eager units kept beyond inputs",
                eager.kept_units,
                counted["saved_beyond_inputs"] / unit,
                slack + QUOTED,
            ),
        ]
    return out


def check_train(record: dict) -> list[dict]:
    """A training step's counts: the fused step saves what :func:`vae_step_savings` (or, for the hierarchical VAE,
    :func:`hvae_step_kernels_saved`) predicts."""
    eager, fused = record["impls"].get("eager"), record["impls"].get("fastvae")
    if not (eager and fused and "step" in eager and "step" in fused) or record["precision"] != "fp32":
        return []  # the model is of the float32 reference: autocast adds casts of its own on each path
    from benchmarks.train_step import MODELS
    from fastvae.models import VAE, HierarchicalVAE

    model = MODELS[record["model"]]("torch")
    if not isinstance(model, (VAE, HierarchicalVAE)):
        return []  # the IWAE's reference is other code (benchmarks/iwae.py): the comparison is the count itself
    name = f"{record['model']} step, batch {record['batch']}, {record['precision']}"
    kernels_saved = eager["step"]["kernels"] - fused["step"]["kernels"]
    likelihood = model.likelihood.name
    if isinstance(model, HierarchicalVAE):
        predicted = hvae_step_kernels_saved(record["batch"], model.latent_shapes, likelihood)
        return [_check(f"{name}: kernels saved", predicted, kernels_saved)]
    mixtures = model.likelihood.mixture.num_mixtures if likelihood == "dmol" else 0
    predicted = vae_step_savings(
        record["batch"],
        model.latent_dim,
        tuple(record["image_shape"]),
        likelihood,
        logvar_limit=model.latent.logvar_limit is not None,
        num_mixtures=mixtures,
    )
    saved = eager["saved_bytes"] - fused["saved_bytes"]
    return [
        _check(f"{name}: kernels saved", predicted["kernels"], kernels_saved),
        _check(f"{name}: bytes kept saved", predicted["kept_bytes"], saved),
    ]


def check_all(ops: list[dict], train: list[dict]) -> list[dict]:
    return [c for r in ops for c in check_op(r)] + [c for r in train for c in check_train(r)]


def _name(record: dict) -> str:
    variant = f" ({record['variant']})" if record["variant"] else ""
    return f"{record['op']}{variant} {'x'.join(map(str, record['shape']))} {record['dtype']}"
