"""The static audit's own machinery: the SASS walk, the H100 model, the kernels' access table, the counts."""

import json

import numpy as np
import pytest
import torch

from benchmarks.static import hardware
from benchmarks.static.capture import LaunchRecorder, footprint_bytes
from benchmarks.static.counts import events_of
from benchmarks.static.kernels import KERNELS
from benchmarks.static.sass import analyse, executed_path, parse_sass
from fastvae.backend import kernels_interpreted
from fastvae.functional import discretized_logistic_mixture_nll, reconstruction_loss, reparameterize_kl

interpreted = pytest.mark.skipif(not kernels_interpreted(), reason="runs the Triton path on CPU tensors")


def sass(*lines: str) -> str:
    """A SASS listing as cuobjdump prints it, one instruction per 16 bytes."""
    return "\n".join(f"        /*{16 * i:04x}*/                   {line} ;" for i, line in enumerate(lines))


# ---- the SASS walk -----------------------------------------------------------------------------------------------


def test_walk_skips_a_trig_slow_path_and_runs_a_do_while_loop_once():
    code = parse_sass(
        sass(
            "S2R R0, SR_CTAID.X",  # 0x00
            "FFMA R1, R0, R0, R0",  # 0x10  loop body start
            "BSSY B0, 0x70",  # 0x20
            "@!P0 BRA 0x60",  # 0x30  skips the slow path
            "LDG.E.CONSTANT R2, desc[UR4][R4.64]",  # 0x40  libdevice's table
            "FMUL R1, R2, R1",  # 0x50
            "BSYNC B0",  # 0x60
            "@P1 BRA 0x10",  # 0x70  back edge: one trip
            "STG.E.128 desc[UR4][R6.64], R8",  # 0x80
            "EXIT",  # 0x90
            "BRA 0xa0",  # 0xa0  padding
        )
    )
    path = executed_path(code)
    assert [i.addr for i in path.executed] == [0x00, 0x10, 0x20, 0x30, 0x60, 0x70, 0x80, 0x90]
    assert path.loops == 1 and path.loop_body == 5


def test_walk_takes_a_bottom_tested_loop_once():
    code = parse_sass(
        sass(
            "S2R R0, SR_CTAID.X",  # 0x00
            "@P0 EXIT",  # 0x10  nothing to do: not taken
            "LDG.E.128 R4, desc[UR4][R2.64]",  # 0x20  loop
            "FADD R4, R4, R4",  # 0x30
            "@P1 EXIT",  # 0x40  the loop's exit test, right before its back edge
            "BRA 0x20",  # 0x50
        )
    )
    assert [i.addr for i in executed_path(code).executed] == [0x00, 0x10, 0x20, 0x30, 0x40]


def test_walk_takes_a_bottom_test_with_code_before_the_back_edge():
    code = parse_sass(
        sass(
            "S2R R0, SR_CTAID.X",  # 0x00
            "LDG.E.128 R4, desc[UR4][R2.64]",  # 0x10  loop
            "FADD R4, R4, R4",  # 0x20
            "FADD R5, R5, R5",  # 0x30
            "@P1 EXIT",  # 0x40  exit test in the loop's second half ...
            "UMOV UR12, UR4",  # 0x50  ... then straight-line code to the back edge
            "BRA 0x10",  # 0x60
        )
    )
    assert [i.addr for i in executed_path(code).executed] == [0x00, 0x10, 0x20, 0x30, 0x40]


def test_walk_leaves_a_top_tested_loop_after_one_trip():
    code = parse_sass(
        sass(
            "MOV R0, RZ",  # 0x00
            "@P0 BRA 0x50",  # 0x10  loop test at the top: enter the first time, leave the second
            "FADD R1, R1, R1",  # 0x20
            "IADD3 R0, R0, 0x1, RZ",  # 0x30
            "BRA 0x10",  # 0x40
            "EXIT",  # 0x50
        )
    )
    assert [i.addr for i in executed_path(code).executed] == [0x00, 0x10, 0x20, 0x30, 0x40, 0x10, 0x50]


def test_walk_counts_the_innermost_loops_apart():
    """A main loop around two inner ones (the DMOL's loops over components): each runs once, and the instructions
    of the innermost (which hold no loop) are counted apart, for the audit to multiply by their trips."""
    listing = sass(
        "S2R R0, SR_CTAID.X",  # 0x00
        "FADD R1, R1, R1",  # 0x10  main loop: per-tile work
        "FFMA R2, R2, R2, R2",  # 0x20  first inner loop
        "@P0 BRA 0x20",  # 0x30
        "FMUL R3, R3, R3",  # 0x40  between the inner loops
        "MUFU.EX2 R4, R4",  # 0x50  second inner loop
        "FADD R4, R4, R4",  # 0x60
        "@P1 BRA 0x50",  # 0x70
        "@P2 BRA 0x10",  # 0x80  the main loop's back edge
        "EXIT",  # 0x90
    )
    path = executed_path(parse_sass(listing))
    assert [i.addr for i in path.executed] == [0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90]
    assert path.loops == 3 and path.loop_body == 8
    assert [i.addr for i in path.innermost] == [0x20, 0x30, 0x50, 0x60, 0x70]
    result = analyse(listing, "REG:8")
    assert result["innermost_loop_instructions"] == 5 and result["innermost_pipes"] == {"fp32": 2, "mufu": 1}


def test_walk_skips_a_division_subroutine():
    listing = sass(
        "MUFU.RCP R1, R0",  # 0x00
        "BSSY B1, 0x50",  # 0x10
        "@!P0 BRA 0x40",  # 0x20  FCHK passed: the fast division stands
        "CALL.REL.NOINC 0x80",  # 0x30
        "BSYNC B1",  # 0x40
        "STG.E desc[UR4][R2.64], R1",  # 0x50
        "EXIT",  # 0x60
        "BRA 0x70",  # 0x70  padding
        "RET.REL.NODEC R20 0x0",  # 0x80  the subroutine
    )
    assert [i.addr for i in executed_path(parse_sass(listing)).executed] == [0x00, 0x10, 0x20, 0x40, 0x50, 0x60]
    result = analyse(listing, "REG:12 STACK:0 SHARED:0 LOCAL:0")
    assert result["executed_instructions"] == 6 and result["cold_instructions"] == 2
    assert result["global_stores"] == {32: 1} and result["pipes"] == {"mufu": 1}


def test_memory_widths_and_resources_are_read():
    result = analyse(
        sass(
            "LDG.E.128 R4, desc[UR4][R2.64]",
            "LDG.E.U16 R8, desc[UR4][R2.64]",
            "STG.E.64 desc[UR4][R2.64], R4",
            "STL [R1], R3",
            "EXIT",
        ),
        "Function k:\n REG:40 STACK:8 SHARED:0 LOCAL:16 CONSTANT[0]:600",
    )
    assert result["global_loads"] == {128: 1, 16: 1} and result["global_stores"] == {64: 1}
    assert result["resources"] == {"reg": 40, "stack": 8, "shared": 0, "local": 16}
    assert result["spill_instructions"] == 1


# ---- the H100 model ----------------------------------------------------------------------------------------------


def test_occupancy_from_registers_and_shared_memory():
    # 156 registers: 4992 per warp, allocated as 5120; 65536 / 5120 = 12 warps: one block of 8.
    assert hardware.occupancy(156, 128, 8) == {
        "blocks_per_sm": 1,
        "warps_per_sm": 8,
        "occupancy": 0.125,
        "limited_by": "registers",
    }
    assert hardware.occupancy(32, 0, 8)["warps_per_sm"] == 64
    assert hardware.occupancy(32, 100 * 1024, 4)["limited_by"] == "shared memory"


def test_bound_compares_issue_time_with_memory_time():
    per_byte = hardware.thread_instructions_per_second() / hardware.BANDWIDTH_BYTES_PER_S
    assert hardware.bound(per_byte * 4 * 0.5, {}, 4)["label"] == "memory-bound"
    assert hardware.bound(per_byte * 4 * 2, {}, 4)["label"] == "issue-bound"
    # A MUFU-heavy kernel is bound by its pipe (16 per SM per clock) before issue.
    assert hardware.bound(10, {"mufu": 10}, 4)["compute_limiter"] == "mufu"


# ---- counting -----------------------------------------------------------------------------------------------------


def test_footprint_counts_a_broadcast_dim_once():
    assert footprint_bytes(torch.zeros(5).expand(3, 5)) == 20
    assert footprint_bytes(torch.zeros(4, 8)[:, :2]) == 32
    assert footprint_bytes(torch.zeros(0, 3)) == 0


def test_views_are_free_and_copies_count():
    x = torch.randn(8, 16)
    names = [
        e.name
        for e in events_of(
            lambda: (x.view(16, 8), x.t(), x[:, :4], x.to(torch.float32), x.to(torch.bfloat16), x.t().contiguous())
        )
    ]
    assert names == ["_to_copy", "clone"]  # the float32 .to() returns x itself; views launch nothing


class _Accesses:
    """The storages a launch under the interpreter loads from and stores to (by address)."""

    def __init__(self):
        self.loads, self.stores = [], []
        # ("load" or "store", slots, live lanes, the access's shape, its lowest address) of each access, in order
        self.masks = []

    def __enter__(self):
        from triton.runtime.interpreter import InterpreterBuilder

        self._saved = (InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store,
                       InterpreterBuilder.create_atomic_rmw)
        original_load, original_store, original_atomic = self._saved
        recorder = self

        def live(ptrs, mask, kind="store"):
            mask = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data))
            recorder.masks.append((kind, mask.size, int(mask.sum()), mask.shape, int(np.min(ptrs.data))))
            return np.asarray(ptrs.data)[mask]

        def load(builder, ptrs, mask, *args, **kwargs):
            recorder.loads.append(live(ptrs, mask, "load"))
            return original_load(builder, ptrs, mask, *args, **kwargs)

        def store(builder, ptrs, value, mask, *args, **kwargs):
            recorder.stores.append(live(ptrs, mask))
            return original_store(builder, ptrs, value, mask, *args, **kwargs)

        def atomic(builder, op, ptrs, value, mask, *args, **kwargs):  # a read-modify-write: counted as a store
            recorder.stores.append(live(ptrs, mask))
            return original_atomic(builder, op, ptrs, value, mask, *args, **kwargs)

        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = load, store
        InterpreterBuilder.create_atomic_rmw = atomic
        return self

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpreterBuilder

        (InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store,
         InterpreterBuilder.create_atomic_rmw) = self._saved

    @staticmethod
    def storages(addresses, tensors):
        spans = {}
        for t in tensors:
            start = t.untyped_storage().data_ptr()
            spans[start] = (start, start + t.untyped_storage().nbytes())
        found = set()
        for chunk in addresses:
            for start, (lo, hi) in spans.items():
                if chunk.size and ((chunk >= lo) & (chunk < hi)).any():
                    found.add(start)
        return found


def _calls_covering_every_kernel_flag():
    def reparam(eps, grad_z, grad_kl, clamp=None):
        mu, logvar = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10, requires_grad=True)
        z, kl = reparameterize_kl(mu, logvar, torch.randn(6, 10) if eps else None, logvar_clamp=clamp,
                                  backend="triton")
        outs = [o for o, used in ((z, grad_z), (kl, grad_kl)) if used]
        torch.autograd.grad(outs, [mu, logvar], [torch.randn_like(o) for o in outs])

    def loss(kind, logvar_shape, reduction, weighted, grad_x):
        x_hat = torch.randn(20, 7, requires_grad=True)
        x = torch.rand(20, 7, requires_grad=grad_x)
        logvar = torch.zeros(logvar_shape, requires_grad=True) if logvar_shape is not None else None
        out = reconstruction_loss(x_hat, x, kind, reduction=reduction, logvar=logvar, backend="triton")
        wrt = [t for t in (x_hat, x, logvar) if t is not None and t.requires_grad]
        torch.autograd.grad(out, wrt, torch.rand_like(out) if weighted else torch.ones_like(out))

    calls = [
        lambda e=e, z=z, k=k: reparam(e, z, k)
        for e in (False, True)
        for z, k in ((True, True), (True, False), (False, True))
    ]
    def prior(shared, limit, only_kl):
        h = torch.randn(4, 6, 3, 3, requires_grad=True)
        mu, logvar = h[:, :3], h[:, 3:]
        p = torch.randn(3, 3, 3, requires_grad=True) if shared else torch.randn(4, 3, 3, 3, requires_grad=True)
        z, kl = reparameterize_kl(mu, logvar, prior_mu=p, prior_logvar=p * 0.5, event_dims=3, logvar_limit=limit,
                                  backend="triton")
        outs = [kl] if only_kl else [z, kl]
        torch.autograd.grad(outs, [h, p], [torch.randn_like(o) for o in outs])

    def second_order():  # create_graph with drawn noise: the noise written out by _standard_normal_kernel
        mu, logvar = torch.randn(5, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)
        z, kl = reparameterize_kl(mu, logvar, backend="triton")
        torch.autograd.grad([z, kl], [mu, logvar], [torch.randn_like(z), torch.ones_like(kl)], create_graph=True)

    def dmol(grad, retain):
        params = torch.randn(3, 6, 2, 3, requires_grad=grad)
        nll = discretized_logistic_mixture_nll(params, torch.rand(3, 1, 2, 3), num_mixtures=2, backend="triton")
        if grad:  # retained: scaled out of place; then in place, with weights that are and are not 1
            torch.autograd.grad(nll, [params], torch.rand_like(nll), retain_graph=retain)
            torch.autograd.grad(nll, [params], torch.ones_like(nll)) if retain else None

    calls += [lambda s=s, lim=lim, k=k: prior(s, lim, k) for s in (False, True) for lim in (None, 4.0)
              for k in (False, True)]
    def device_state():  # the Philox key and counter read from device memory, as under CUDA-graph capture
        from fastvae.ops.rng import philox_state_on_device

        with philox_state_on_device():
            reparam(False, True, True)

    def log_ratio(eps, prior, grad_z, grad_log_ratio):  # K = 3 samples; a prior shared by K, per sample, or by all
        from fastvae.functional import reparameterize_log_ratio

        h = torch.randn(4, 12, requires_grad=True)
        mu, logvar = h[:, :6], h[:, 6:]
        p = {"none": None, "per posterior": torch.randn(4, 6), "per sample": torch.randn(3, 4, 6),
             "shared": torch.randn(6)}[prior]
        p = p.requires_grad_() if p is not None else None
        z, lr = reparameterize_log_ratio(mu, logvar, torch.randn(3, 4, 6) if eps else None, samples=3, prior_mu=p,
                                         prior_logvar=p, logvar_limit=4.0, backend="triton")
        outs = [o for o, used in ((z, grad_z), (lr, grad_log_ratio)) if used]
        torch.autograd.grad(outs, [h] + ([p] if p is not None else []), [torch.randn_like(o) for o in outs])

    def vq(grad_z_q, grad_loss, grad_z, grad_codebook):
        from fastvae.functional import vector_quantize

        z = torch.randn(9, 2, 5, requires_grad=grad_z)[:, 1]  # strided rows
        codebook = torch.randn(7, 5, requires_grad=grad_codebook)
        z_q, _, loss = vector_quantize(z, codebook, backend="triton")
        outs = [o for o, used in ((z_q, grad_z_q), (loss, grad_loss)) if used]
        wrt = [t for t, used in ((z, grad_z), (codebook, grad_codebook)) if used]
        torch.autograd.grad(outs, wrt, [torch.randn_like(o) for o in outs])

    calls += [second_order, device_state, lambda: reparam(True, True, True, clamp=(-1.0, 1.0))]  # the hard clamp
    calls += [lambda e=e, p=p, z=z, r=r: log_ratio(e, p, z, r) for e in (False, True)
              for p in ("none", "per posterior", "per sample", "shared") for z, r in ((True, True), (False, True))]
    calls += [lambda: log_ratio(False, "none", True, False)]
    calls += [lambda f=f: vq(*f) for f in ((True, True, True, True), (True, False, True, False),
                                           (False, True, True, False), (False, True, False, True))]
    calls += [lambda g=g, r=r: dmol(g, r) for g, r in ((False, False), (True, False), (True, True))]
    calls += [lambda k=k: loss(k, None, "sum", False, True) for k in ("mse", "bce", "l1")]
    calls += [
        lambda s=s, r=r: loss("gaussian", s, r, r == "none", False)
        for s, r in (((), "none"), ((7,), "mean"), ((20, 7), "sum"), ((7,), "none"))
    ]
    return calls


def _launches_run(calls):
    """Each Triton launch of ``calls`` (recorded, then run alone under the interpreter): the launch, its kernel's
    entry in the access table, and what the run loaded and stored."""
    from benchmarks.static.kernels import kernel_spec

    for call in calls:
        launches = []
        with LaunchRecorder(launches=launches, execute=False):
            call()
        for launch in launches:
            kernel = getattr(__import__(launch.module, fromlist=[launch.kernel]), launch.kernel)
            with _Accesses() as accesses:
                kernel[launch.grid](*launch.args.values(), **launch.constexprs, **launch.options)
            yield launch, kernel_spec(launch.module, launch.kernel), accesses


@interpreted
def test_access_table_matches_the_loads_and_stores_the_interpreter_sees():
    """Each kernel entry's reads and writes, under each flag the ops use, against what the kernel touches."""
    seen = set()
    for launch, spec, accesses in _launches_run(_calls_covering_every_kernel_flag()):
        reads, writes = spec.accessed(launch.constexprs, launch.args)
        tensors = [v for v in launch.args.values() if isinstance(v, torch.Tensor)]
        storage = {name: launch.args[name].untyped_storage().data_ptr() for name in reads + writes}
        context = (launch.kernel, launch.constexprs)
        assert _Accesses.storages(accesses.loads, tensors) == {storage[n] for n in reads}, context
        assert _Accesses.storages(accesses.stores, tensors) == {storage[n] for n in writes}, context
        seen.add(launch.kernel)
    assert seen >= {k.name for k in KERNELS if k.module.startswith("fastvae")}


def _padded_calls():
    """Launches whose tiles have padding: rows of 10, 7 and 784 columns, mixtures of 3 and 10 components (in 4 and
    16 slots), a codebook of 7 codes of 5 values, the splits of rows over several programs, and the noise
    benchmark's normals (a block and 904 more)."""

    def dmol(channels, mixtures, pixels, grad):
        params = torch.randn(3, mixtures * (channels + 1) * (channels + 2) // 2, *pixels, requires_grad=grad)
        x = torch.rand(3, channels, *pixels)
        nll = discretized_logistic_mixture_nll(params, x, num_mixtures=mixtures, backend="triton")
        if grad:
            torch.autograd.grad(nll, [params], torch.rand_like(nll))

    def loss():
        x_hat = torch.randn(3, 784, requires_grad=True)
        out = reconstruction_loss(x_hat, torch.rand(3, 784), "bce", reduction="none", backend="triton")
        torch.autograd.grad(out, [x_hat], torch.rand_like(out))

    def noise():  # the noise benchmark's kernels, at a size past a block
        import triton

        from benchmarks.noise import BLOCK, NOISE_KERNELS

        n = BLOCK + 904
        for kernel in NOISE_KERNELS.values():
            kernel[(triton.cdiv(n, BLOCK),)](torch.empty(n), n, 7, BLOCK=BLOCK)

    calls = [lambda a=a: dmol(*a) for a in ((1, 3, (5, 7), True), (3, 10, (4, 5), False), (3, 1, (9,), True),
                                             (1, 10, (28, 28), False))]
    return _calls_covering_every_kernel_flag() + calls + [loss, noise]


def _measured_slots_per_element(spec, launch, masks) -> float:
    """Slots per live lane of the accesses that span a whole tile: the fraction of a tile's slots that hold an
    element, as the interpreter's masks see it. The nearest-code search's tiles are (vector, code) pairs, which
    no access spans: its vectors' live fraction (the stores of an index and a loss per vector) times its codes'
    (the loads of their norms). reparameterize_kl's rows that are not 16-byte aligned are loaded and stored lane
    by lane (``[R, G, 1]`` accesses, four to a tile): together those span the tile. Where a tile is one group
    wide, a row's value (its KL or the KL's gradient, ``[R, 1, 1]``) looks the same: only the accesses to the
    element tensors count (those of at least ``n_rows * n_cols`` elements' bytes: a row's values are fewer)."""
    elements = launch.args["n_rows"] * launch.args["n_cols"] if "n_cols" in launch.args else 0
    element_tensors = [t for t in launch.args.values()
                       if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= elements * t.element_size()]

    def in_element_tensor(address):
        return any(0 <= address - t.untyped_storage().data_ptr() < t.untyped_storage().nbytes()
                   for t in element_tensors)

    def ratio(kinds, size):
        spanning = [(slots, live) for kind, slots, live, _, _ in masks if kind in kinds and slots == size]
        if not spanning:
            spanning = [(slots, live) for kind, slots, live, shape, address in masks
                        if kind in kinds and 4 * slots == size and len(shape) == 3 and shape[-1] == 1
                        and in_element_tensor(address)]
        assert spanning, (launch.kernel, launch.constexprs)
        return sum(slots for slots, _ in spanning) / sum(live for _, live in spanning)

    if launch.kernel == "_vector_quantize_forward_kernel":
        return ratio(("store",), launch.constexprs["BLOCK_N"]) * ratio(("load",), launch.constexprs["BLOCK_K"])
    return ratio(("load", "store"), spec.tile_elements(launch.constexprs))


@interpreted
def test_slots_per_element_match_the_masks_the_interpreter_sees():
    """Each kernel entry's slots over elements (the padding whose instructions the audit counts) against the
    fraction of masked-off lanes in the kernel's tile-wide loads and stores."""
    seen = set()
    for launch, spec, accesses in _launches_run(_padded_calls()):
        if launch.constexprs.get("SKIP_UNIT_ROWS") and not any(
            slots == spec.tile_elements(launch.constexprs) for _, slots, *_ in accesses.masks
        ):
            continue  # scale_rows in place with every weight 1: no tile ran
        measured = _measured_slots_per_element(spec, launch, accesses.masks)
        modelled = spec.slots_per_element(launch.constexprs, launch.args)
        assert modelled == pytest.approx(measured, rel=1e-12), (launch.kernel, launch.constexprs, launch.grid)
        seen.add((launch.kernel, modelled > 1))
    every_kernel = {k.name for k in KERNELS}
    assert {name for name, _ in seen} >= every_kernel
    assert {name for name, padded in seen if padded} >= every_kernel - {"_scale_rows_kernel"}


@interpreted
def test_recorded_counts_equal_counts_of_kernels_that_ran():
    def step():
        h = torch.randn(12, 8, requires_grad=True)
        mu, logvar = h.chunk(2, dim=-1)
        z, kl = reparameterize_kl(mu, logvar, backend="triton")
        loss = reconstruction_loss(z, torch.rand(12, 4), "bce", backend="triton") + kl
        loss.mean().backward()

    def summary(execute):
        torch.manual_seed(0)
        return [(e.kind, e.name, e.read_bytes, e.write_bytes) for e in events_of(step, execute=execute)]

    assert summary(execute=True) == summary(execute=False)


# ---- the whole command, small ------------------------------------------------------------------------------------


@interpreted
def test_static_run_writes_its_results(tmp_path, sm90_variants):
    from benchmarks.static.audit import run_static

    payload = run_static(
        tmp_path,
        "test",
        dtypes=(torch.float32,),
        train_batches={"*": 4},
        log=lambda *_: None,
        max_elements=1 << 14,
        op_impls=("eager", "fastvae"),
        train_impls=("eager", "fastvae"),
        launch_bound_cases=(("mlp", 4),),
    )
    from benchmarks.train_step import MODELS

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["audit"] and saved["ops"] and {r["model"] for r in saved["train"]} == set(MODELS)
    assert [(r["model"], r["precision"]) for r in saved["launch_bound"]] == [("mlp", "fp32"), ("mlp", "bf16")]
    assert all(r["impls"]["fastvae"]["step"]["host_syncs"] == 0 for r in saved["launch_bound"])
    text = (tmp_path / "results.md").read_text()
    assert "## Kernel variants compiled for sm_90" in text and "tl.randn4x" in text
    assert "## The launch-bound regime (issue 12)" in text
    assert payload["checks"] and any(c["agree"] for c in payload["checks"])
