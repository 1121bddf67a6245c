"""What each of fastvae's Triton kernels reads and writes: one entry per kernel.

The counts model a Triton launch's memory traffic from these (each pointer
argument read or written once, at its footprint), and the audit divides it,
and the instructions the launch executes, by the elements a launch covers.
A program's tile has slots for ``tile`` elements per trip of its loop, and
its instructions run in every slot, live or masked off: the padding of a
dim to a power of two (a mixture's components, a row of 784 columns in
tiles of 1,024) and the tiles that overhang the end. So the audit counts
instructions per slot (the SASS a thread runs for one trip, over its slots)
and scales them by ``slots / elements`` of the launch, the slots its tiles
cover; ``tests/test_static_audit.py`` checks that ratio against the masks
of the interpreter's loads and stores. A kernel with loops inside its main
loop (``inner_trips``) runs their bodies that many times a trip. An argument listed under a condition is only
touched when that expression of the launch's constexprs (and, for traffic
that depends on the data, its arguments) is true; the launcher passes a
placeholder pointer otherwise. ``tests/test_static_audit.py``
checks every entry against the loads and stores the interpreter sees.

To add a kernel: one :class:`KernelSpec` below.
"""

from __future__ import annotations

from dataclasses import dataclass

ALWAYS = "True"


def _scales_a_row(weight) -> bool:
    """Whether an in-place scaling moves any row: only rows whose weight is not exactly 1 are read and written."""
    return bool((weight != 1).any())


# Names the conditions may use besides the launch's arguments and constexprs.
def _padded(n: int, block: int) -> int:
    """``n`` rounded up to a multiple of ``block``: the slots of the tiles that cover ``n`` elements of a dim."""
    return -(-n // block) * block


_HELPERS = {"scales_a_row": _scales_a_row, "padded": _padded}


@dataclass(frozen=True)
class KernelSpec:
    module: str
    name: str
    reads: dict[str, str]  # pointer argument -> when it is read (a Python expression of the constexprs)
    writes: dict[str, str]
    elements: str  # expression of the arguments: elements a launch covers
    tile: str  # expression of the constexprs: slots (elements, padding included) one program covers per loop trip
    # Expression of the arguments and constexprs: the slots all the launch's tiles cover, padding included
    # (``padded(n, block)`` rounds up). Every entry says it: the audit's instructions per element depend on it.
    slots: str
    # Expression of the arguments: trips the kernel's innermost loops make per trip of the loop around them,
    # each over ``tile`` slots (the DMOL's loop over a pixel's components); None for a kernel of one loop.
    inner_trips: str | None = None

    def accessed(self, constexprs: dict, args: dict | None = None) -> tuple[list[str], list[str]]:
        """Pointer arguments read and written by a launch with ``constexprs`` (and argument values ``args``)."""
        names = {**(args or {}), **constexprs}

        def live(table):
            return [arg for arg, when in table.items() if eval(when, dict(_HELPERS), names)]  # noqa: S307

        return live(self.reads), live(self.writes)

    def count_elements(self, args: dict) -> int:
        return int(eval(self.elements, {}, dict(args)))  # noqa: S307

    def tile_elements(self, constexprs: dict) -> int:
        return int(eval(self.tile, {}, dict(constexprs)))  # noqa: S307

    def slots_per_element(self, constexprs: dict, args: dict) -> float:
        """Slots the launch's tiles cover per element it covers: 1 without padding, 1.6 for M = 10 components in
        tiles of 16. A tile's instructions per slot times this are its instructions per element."""
        slots = int(eval(self.slots, dict(_HELPERS), {**args, **constexprs}))  # noqa: S307
        return slots / max(self.count_elements(args), 1)

    def count_inner_trips(self, args: dict) -> int:
        return 1 if self.inner_trips is None else int(eval(self.inner_trips, {}, dict(args)))  # noqa: S307


_REPARAM = "fastvae.kernels.reparameterize_kl"
_LOG_RATIO = "fastvae.kernels.reparameterize_log_ratio"
_LOSS = "fastvae.kernels.reconstruction_loss"
_SCALE = "fastvae.kernels.scale_rows"
_DMOL = "fastvae.kernels.discretized_logistic_mixture"
_VQ = "fastvae.kernels.vector_quantize"
# The row-wise kernels (kernels/launch.py's plan_rows): row tiles of BLOCK_ROWS, each program stepping through its
# column split (a multiple of the column block) in column blocks up to the row's end; reparameterize_kl's column
# blocks are BLOCK_GROUPS groups of 4.
_ROW_SLOTS = "padded(n_rows, BLOCK_ROWS) * padded(n_cols, BLOCK_COLS)"
_ROW_GROUP_SLOTS = "padded(n_rows, BLOCK_ROWS) * padded(n_cols, BLOCK_GROUPS * 4)"
_LOG_RATIO_SLOTS = _ROW_GROUP_SLOTS + " * n_samples"
# A prior tensor is passed as None when absent (Triton compiles None as a constant: a kernel of its own).
_GIVEN = "{} is not None"

KERNELS = [
    KernelSpec(
        _REPARAM,
        "_reparameterize_kl_forward_kernel",
        reads={
            "mu_ptr": ALWAYS,
            "logvar_ptr": ALWAYS,
            "eps_ptr": "HAS_EPS",
            "prior_mu_ptr": _GIVEN.format("prior_mu_ptr"),
            "prior_logvar_ptr": _GIVEN.format("prior_logvar_ptr"),
            # The Philox key and counter from device memory (under CUDA-graph capture), else scalar arguments.
            "philox_ptr": _GIVEN.format("philox_ptr"),
        },
        writes={"z_ptr": ALWAYS, "kl_ptr": ALWAYS},
        elements="n_rows * n_cols",
        tile="BLOCK_ROWS * BLOCK_GROUPS * 4",
        slots=_ROW_GROUP_SLOTS,
    ),
    KernelSpec(
        _REPARAM,
        "_reparameterize_kl_backward_kernel",
        reads={
            "grad_z_ptr": "HAS_GRAD_Z",
            "grad_kl_ptr": "HAS_GRAD_KL",
            "mu_ptr": ALWAYS,
            "logvar_ptr": ALWAYS,
            "eps_ptr": "HAS_GRAD_Z and HAS_EPS",
            # The priors are read for the KL's gradient only.
            "prior_mu_ptr": "HAS_GRAD_KL and " + _GIVEN.format("prior_mu_ptr"),
            "prior_logvar_ptr": "HAS_GRAD_KL and " + _GIVEN.format("prior_logvar_ptr"),
            "philox_ptr": _GIVEN.format("philox_ptr"),
        },
        writes={
            "grad_mu_ptr": ALWAYS,
            "grad_logvar_ptr": ALWAYS,
            "grad_prior_mu_ptr": "HAS_GRAD_KL and " + _GIVEN.format("grad_prior_mu_ptr"),
            "grad_prior_logvar_ptr": "HAS_GRAD_KL and " + _GIVEN.format("grad_prior_logvar_ptr"),
        },
        elements="n_rows * n_cols",
        tile="BLOCK_ROWS * BLOCK_GROUPS * 4",
        slots=_ROW_GROUP_SLOTS,
    ),
    # K importance samples per row of mu: a launch covers the K n_rows x n_cols elements of z. A program's loop over
    # its column blocks loads the posterior's tile once, and an inner loop takes the K samples over that tile.
    KernelSpec(
        _LOG_RATIO,
        "_log_ratio_forward_kernel",
        reads={
            "mu_ptr": ALWAYS,
            "logvar_ptr": ALWAYS,
            "eps_ptr": "HAS_EPS",
            "prior_mu_ptr": _GIVEN.format("prior_mu_ptr"),
            "prior_logvar_ptr": _GIVEN.format("prior_logvar_ptr"),
            "philox_ptr": _GIVEN.format("philox_ptr"),
        },
        writes={"z_ptr": ALWAYS, "log_ratio_ptr": ALWAYS},
        elements="n_samples * n_rows * n_cols",
        tile="BLOCK_ROWS * BLOCK_GROUPS * 4",
        slots=_LOG_RATIO_SLOTS,
        inner_trips="n_samples",
    ),
    KernelSpec(
        _LOG_RATIO,
        "_log_ratio_backward_kernel",
        reads={
            "grad_z_ptr": "HAS_GRAD_Z",
            "grad_log_ratio_ptr": "HAS_GRAD_LOG_RATIO",
            "mu_ptr": ALWAYS,
            "logvar_ptr": ALWAYS,
            "eps_ptr": "HAS_EPS",  # for both gradients: the log ratio's depends on the noise too
            "prior_mu_ptr": "HAS_GRAD_LOG_RATIO and " + _GIVEN.format("prior_mu_ptr"),
            "prior_logvar_ptr": "HAS_GRAD_LOG_RATIO and " + _GIVEN.format("prior_logvar_ptr"),
            "philox_ptr": _GIVEN.format("philox_ptr"),
        },
        writes={
            "grad_mu_ptr": ALWAYS,
            "grad_logvar_ptr": ALWAYS,
            "grad_prior_mu_ptr": "HAS_GRAD_LOG_RATIO and " + _GIVEN.format("grad_prior_mu_ptr"),
            "grad_prior_logvar_ptr": "HAS_GRAD_LOG_RATIO and " + _GIVEN.format("grad_prior_logvar_ptr"),
        },
        elements="n_samples * n_rows * n_cols",
        tile="BLOCK_ROWS * BLOCK_GROUPS * 4",
        slots=_LOG_RATIO_SLOTS,
        inner_trips="n_samples",
    ),
    KernelSpec(
        _LOSS,
        "_reconstruction_loss_forward_kernel",
        reads={"x_hat_ptr": ALWAYS, "x_ptr": ALWAYS, "logvar_ptr": "KIND == 'gaussian'"},
        writes={
            "loss_ptr": ALWAYS,
            "grad_x_hat_ptr": "GRAD_X_HAT",
            "grad_x_ptr": "GRAD_X",
            "grad_logvar_ptr": "LOGVAR_GRAD != 'none'",
        },
        elements="n_rows * n_cols",
        tile="BLOCK_ROWS * BLOCK_COLS",
        slots=_ROW_SLOTS,
    ),
    KernelSpec(
        _REPARAM,
        "_standard_normal_kernel",
        reads={"philox_ptr": _GIVEN.format("philox_ptr")},
        writes={"eps_ptr": ALWAYS},
        elements="n_rows * n_cols",
        tile="BLOCK_ROWS * BLOCK_GROUPS * 4",
        slots=_ROW_GROUP_SLOTS,
    ),
    KernelSpec(
        _SCALE,
        "_scale_rows_kernel",
        # In place (SKIP_UNIT_ROWS), rows of weight exactly 1 are neither read nor written: all of them under
        # loss.backward() of a "sum" or "mean" loss, which then moves only the weights. (A mix of weights is counted
        # as moving every row.)
        reads={"src_ptr": "not SKIP_UNIT_ROWS or scales_a_row(weight_ptr)", "weight_ptr": ALWAYS},
        writes={"out_ptr": "not SKIP_UNIT_ROWS or scales_a_row(weight_ptr)"},
        elements="n_rows * n_cols",
        tile="BLOCK_ROWS * BLOCK_COLS",
        slots=_ROW_SLOTS,
    ),
    # Elements are pixel-components (B x pixels x M). A program's tile is BLOCK_ROWS x BLOCK_COLS pixels, whose M
    # components inner loops take one at a time (one, and a second for the gradient), and a pixel-component reads
    # and writes (1 + 2C + C(C-1)/2) parameters.
    KernelSpec(
        _DMOL,
        "_dmol_forward_kernel",
        reads={"params_ptr": ALWAYS, "x_ptr": ALWAYS},
        writes={"nll_ptr": ALWAYS, "grad_ptr": "WRITE_GRAD"},
        elements="n_rows * n_cols * n_mix",
        tile="BLOCK_ROWS * BLOCK_COLS",
        slots="padded(n_rows, BLOCK_ROWS) * padded(n_cols, BLOCK_COLS) * n_mix",
        inner_trips="n_mix",
    ),
    KernelSpec(
        _VQ,
        "_code_norms_kernel",
        reads={"codebook_ptr": ALWAYS},
        writes={"code_sq_ptr": ALWAYS},
        elements="n_codes * dim",
        tile="BLOCK_K * BLOCK_D",
        slots="padded(n_codes, BLOCK_K) * padded(dim, BLOCK_D)",
    ),
    # The nearest-code search: its elements are (vector, code) pairs, BLOCK_N x BLOCK_K per trip through the codes
    # (each pair's D products on the tensor cores); the codebook is read once per program, and counted once.
    KernelSpec(
        _VQ,
        "_vector_quantize_forward_kernel",
        reads={"z_ptr": ALWAYS, "codebook_ptr": ALWAYS, "code_sq_ptr": ALWAYS},
        writes={"z_q_ptr": ALWAYS, "indices_ptr": ALWAYS, "loss_ptr": ALWAYS},
        elements="n_rows * n_codes",
        tile="BLOCK_N * BLOCK_K",
        slots="padded(n_rows, BLOCK_N) * padded(n_codes, BLOCK_K)",
    ),
    # Elementwise over the vectors' values; the codebook's gradient is added with atomics (counted as written once).
    KernelSpec(
        _VQ,
        "_vector_quantize_backward_kernel",
        reads={
            "grad_zq_ptr": "GRAD_Z and HAS_GRAD_ZQ",
            "grad_loss_ptr": "HAS_GRAD_LOSS",
            "z_ptr": "HAS_GRAD_LOSS",
            "z_q_ptr": "HAS_GRAD_LOSS",
            "indices_ptr": "GRAD_CODEBOOK",
        },
        writes={"grad_z_ptr": "GRAD_Z", "grad_codebook_ptr": "GRAD_CODEBOOK"},
        elements="n_rows * dim",
        tile="BLOCK_N * BLOCK_D * D_CHUNKS",
        slots="padded(n_rows, BLOCK_N) * BLOCK_D * D_CHUNKS",
    ),
    # The in-kernel noise benchmark (benchmarks/noise.py): tl.randn, tl.randn4x and fastvae's generator.
    *(
        KernelSpec("benchmarks.noise", name, reads={}, writes={"out_ptr": ALWAYS}, elements="n", tile="BLOCK",
                   slots="padded(n, BLOCK)")
        for name in ("_randn_kernel", "_randn4x_kernel", "_fastvae_noise_kernel")
    ),
]
_BY_NAME = {(k.module, k.name): k for k in KERNELS}


def kernel_spec(module: str, name: str) -> KernelSpec:
    try:
        return _BY_NAME[(module, name)]
    except KeyError:
        raise KeyError(
            f"{module}.{name} has no entry in benchmarks/static/kernels.py: add what it reads and writes there"
        ) from None
