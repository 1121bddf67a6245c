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


def reparameterize_kl(eps_given: bool) -> dict[str, Cost]:
    """``reparameterize_kl(mu, logvar, eps)``, with gradients flowing from both ``z`` and the KL.

    Fused (``kernels/reparameterize_kl.py``): the forward reads mu, logvar
    (and eps) and writes z; the backward reads grad_z, mu, logvar (and eps) and
    writes both gradients; the noise is regenerated, never kept. Eager: z takes
    mul, exp, mul, add; the KL add, mul, sub, exp, sub, sum, mul; drawn noise
    one randn. Its backward is 13 calls; it keeps exp(logvar / 2), exp(logvar),
    mu, and the noise.
    """
    eps = 1 if eps_given else 0
    fused = Cost(1, 1, 3 + eps, 5 + eps, 0, PHILOX_STATE_BYTES, ("mu", "logvar") + (("eps",) if eps_given else ()))
    eager = Cost(11 + (1 - eps), 13, 24 - eps, 30, 2 + (1 - eps), 0, ("mu",) + (("eps",) if eps_given else ()))
    return {"eager": eager, "fastvae": fused}


# kind -> (forward kernels, backward kernels, forward units, backward units, kept units, kept inputs) of the
# float32 reference with reduction="none"; the gaussian's logvar per feature, per element, or a scalar.
_EAGER_LOSS = {
    "mse": (3, 3, 6, 6, 1, ()),
    "l1": (3, 2, 6, 4, 1, ()),
    "bce": (9, 13, 20, 26.5, 1, ("x_hat", "x")),
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
    or ``"mean"`` loss under ``loss.backward()``), so the fused backward hands
    the saved gradient on untouched; otherwise it scales it (read + write).

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
    fused = Cost(1, scaled, 3 + 2 * per_element + columns, scaled * 2 * (1 + per_element), 1 + per_element)
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


def vae_step_savings(batch: int, latent_dim: int, image_elements: int, likelihood: str = "bce") -> dict:
    """Kernels and float32 bytes kept that one VAE training step saves with the fused ops, against the reference.

    The VAE calls ``reparameterize_kl`` on the halves of its linear head (noise
    drawn) and the likelihood with ``reduction="mean"`` (the per-image values
    come beside it, detached), so the loss's upstream gradient is 1 and the
    saved gradient is handed over unscaled. Everything else in the step is the same code on both paths and
    cancels. An input kept by one path only counts against that path, except
    the image batch, which the encoder's first layer keeps anyway; mu is kept
    by both (the reference's mu * mu, the fused backward).
    """
    n_z, n_x = batch * latent_dim, batch * image_elements
    logvar = "scalar" if likelihood == "gaussian" else None  # the VAE's default learned variance
    parts = {
        "reparameterize_kl": (reparameterize_kl(eps_given=False), n_z, {"mu": n_z, "logvar": n_z}),
        "reconstruction_loss": (reconstruction_loss(likelihood, logvar, upstream_one=True), n_x, {"x_hat": n_x}),
    }
    kernels = kept = 0
    for costs, n, input_elements in parts.values():
        eager, fused = costs["eager"], costs["fastvae"]
        kernels += eager.forward_kernels + eager.backward_kernels - fused.forward_kernels - fused.backward_kernels
        kept += round((eager.kept_units - fused.kept_units) * n * 4) + eager.kept_bytes - fused.kept_bytes
        for name, elements in input_elements.items():
            kept += 4 * elements * ((name in eager.kept_inputs) - (name in fused.kept_inputs))
    return {"kernels": kernels, "kept_bytes": kept}


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
    features = shape[-1] if record["op"] == "reparameterize_kl" else record["elements"] // shape[0]
    rows = record["elements"] // features
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
            _check(f"{name}: fastvae kernels, backward", fused.backward_kernels, counted["backward"]["kernels"]),
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
                2 * slack,
            ),
            _check(
                f"{name}: eager units kept beyond inputs",
                eager.kept_units,
                counted["saved_beyond_inputs"] / unit,
                slack,
            ),
        ]
    return out


def check_train(record: dict) -> list[dict]:
    """A training step's counts: the fused step saves what :func:`vae_step_savings` predicts."""
    eager, fused = record["impls"].get("eager"), record["impls"].get("fastvae")
    if not (eager and fused):
        return []
    from benchmarks.train_step import MODELS

    model = MODELS[record["model"]]("torch")
    image_elements = 1
    for size in record["image_shape"]:
        image_elements *= size
    predicted = vae_step_savings(record["batch"], model.latent_dim, image_elements, model.likelihood.kind)
    name = f"{record['model']} VAE step, batch {record['batch']}"
    return [
        _check(f"{name}: kernels saved", predicted["kernels"], eager["step"]["kernels"] - fused["step"]["kernels"]),
        _check(f"{name}: bytes kept saved", predicted["kept_bytes"], eager["saved_bytes"] - fused["saved_bytes"]),
    ]


def check_all(ops: list[dict], train: list[dict]) -> list[dict]:
    return [c for r in ops for c in check_op(r)] + [c for r in train for c in check_train(r)]


def _name(record: dict) -> str:
    variant = f" ({record['variant']})" if record["variant"] else ""
    return f"{record['op']}{variant} {'x'.join(map(str, record['shape']))} {record['dtype']}"
