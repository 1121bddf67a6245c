"""What each of fastvae's Triton kernels reads and writes: one entry per kernel.

The counts model a Triton launch's memory traffic from these (each pointer
argument read or written once, at its footprint), and the audit divides it by
the elements a launch covers. An argument listed under a condition is only
touched when that expression of the launch's constexprs (and, for traffic
that depends on the data, its arguments) is true; the launcher passes a
placeholder pointer otherwise. ``tests/test_static_audit.py``
checks every entry against the loads and stores the interpreter sees.

To add a kernel: one :class:`KernelSpec` below.
"""

from __future__ import annotations

from dataclasses import dataclass

ALWAYS = "True"


@dataclass(frozen=True)
class KernelSpec:
    module: str
    name: str
    reads: dict[str, str]  # pointer argument -> when it is read (a Python expression of the constexprs)
    writes: dict[str, str]
    elements: str  # expression of the arguments: elements a launch covers
    tile: str  # expression of the constexprs: elements one program covers per loop trip

    def accessed(self, constexprs: dict, args: dict | None = None) -> tuple[list[str], list[str]]:
        """Pointer arguments read and written by a launch with ``constexprs`` (and argument values ``args``)."""
        names = {**(args or {}), **constexprs}

        def live(table):
            return [arg for arg, when in table.items() if eval(when, {}, names)]  # noqa: S307

        return live(self.reads), live(self.writes)

    def count_elements(self, args: dict) -> int:
        return int(eval(self.elements, {}, dict(args)))  # noqa: S307

    def tile_elements(self, constexprs: dict) -> int:
        return int(eval(self.tile, {}, dict(constexprs)))  # noqa: S307


_REPARAM = "fastvae.kernels.reparameterize_kl"
_LOSS = "fastvae.kernels.reconstruction_loss"

KERNELS = [
    KernelSpec(
        _REPARAM,
        "_reparameterize_kl_forward_kernel",
        reads={"mu_ptr": ALWAYS, "logvar_ptr": ALWAYS, "eps_ptr": "HAS_EPS"},
        writes={"z_ptr": ALWAYS, "kl_ptr": ALWAYS},
        elements="n_rows * n_cols",
        tile="BLOCK_ROWS * BLOCK_GROUPS * 4",
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
        },
        writes={"grad_mu_ptr": ALWAYS, "grad_logvar_ptr": ALWAYS},
        elements="n_rows * n_cols",
        tile="BLOCK_ROWS * BLOCK_GROUPS * 4",
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
    ),
    KernelSpec(
        _LOSS,
        "_scale_rows_kernel",
        reads={"src_ptr": ALWAYS, "weight_ptr": ALWAYS},
        writes={"out_ptr": ALWAYS},
        elements="n_rows * n_cols",
        tile="BLOCK_ROWS * BLOCK_COLS",
    ),
    # The in-kernel noise benchmark (benchmarks/noise.py): tl.randn against tl.randn4x.
    KernelSpec("benchmarks.noise", "_randn_kernel", reads={}, writes={"out_ptr": ALWAYS}, elements="n", tile="BLOCK"),
    KernelSpec("benchmarks.noise", "_randn4x_kernel", reads={}, writes={"out_ptr": ALWAYS}, elements="n", tile="BLOCK"),
]
_BY_NAME = {(k.module, k.name): k for k in KERNELS}


def kernel_spec(module: str, name: str) -> KernelSpec:
    try:
        return _BY_NAME[(module, name)]
    except KeyError:
        raise KeyError(
            f"{module}.{name} has no entry in benchmarks/static/kernels.py: add what it reads and writes there"
        ) from None
