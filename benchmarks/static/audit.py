"""``python -m benchmarks --static``: the static audit and the counts, written to ``benchmarks/results/static/``.

1. Counts (:mod:`benchmarks.static.counts`) of every op case of the runner's
   headline grid (2**24 elements, float32 and bfloat16) and of one training
   step of every model, recording fastvae's Triton launches as they go.
2. A few more launches of the ops at representative shapes
   (:data:`EXTRA_SCENARIOS`, which the tests compile too, and issue 18's grid
   of latent shapes, :data:`LATENT_SCENARIOS`) and of the in-kernel noise
   benchmark.
3. Every distinct kernel variant among those launches compiled for sm_90 as
   the launcher specialises it (:mod:`benchmarks.static.compile_sm90`), and
   read: registers, spills, shared memory, occupancy, load/store widths,
   instructions per element on the executed path, and an estimate of what
   bounds it on an H100 (:mod:`benchmarks.static.hardware`).
4. The counts checked against the byte model (:mod:`benchmarks.static.model`).
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.static import hardware
from benchmarks.static.capture import Launch, LaunchRecorder
from benchmarks.static.counts import (
    HEADLINE_ELEMENTS,
    IMPLS,
    TRAIN_IMPLS,
    _as_on_a_gpu,
    count_ops,
    count_train_cases,
    count_train_steps,
    headline_cases,
)
from benchmarks.static.kernels import kernel_spec
from benchmarks.train_step import LAUNCH_BOUND_BATCHES

DTYPES = (torch.float32, torch.bfloat16)
TRAIN_BATCHES = {"*": 128}  # the training command's default batch
# Issue 12's launch-bound regime: (model, batch) of the runner's launch-bound cases, counted in both precisions.
LAUNCH_BOUND_CASES = tuple(
    (model, batch) for model, batches in LAUNCH_BOUND_BATCHES.items() for batch in batches
)
LAUNCH_BOUND_PRECISIONS = ("fp32", "bf16")
NOISE_ELEMENTS = HEADLINE_ELEMENTS


@dataclass(frozen=True)
class Scenario:
    """Fused ops at a representative shape, run forward and backward with their launches recorded."""

    name: str
    run: Callable[[torch.dtype], None]


def _gaussian(logvar_shape, reduction, weights=False, batch=256, sample=(784,)):
    def run(dtype):
        from fastvae.functional import reconstruction_loss

        x_hat = torch.randn(batch, *sample).to(dtype).requires_grad_()
        x = torch.rand(batch, *sample).to(dtype)
        logvar = torch.zeros(logvar_shape, dtype=dtype, requires_grad=True)
        loss = reconstruction_loss(x_hat, x, "gaussian", reduction=reduction, logvar=logvar, backend="triton")
        upstream = torch.rand_like(loss) if weights else torch.ones_like(loss)
        torch.autograd.grad(loss, [x_hat, logvar], upstream)

    return run


def _weighted(kind, batch=256, sample=(784,)):
    def run(dtype):
        from fastvae.functional import reconstruction_loss

        x_hat = torch.randn(batch, *sample).to(dtype).requires_grad_()
        loss = reconstruction_loss(x_hat, torch.rand(batch, *sample).to(dtype), kind, backend="triton")
        torch.autograd.grad(loss, [x_hat], torch.rand_like(loss))

    return run


def _latent_head(batch, latent_dim, logvar_limit=None, logvar_clamp=None):
    def run(dtype):
        from fastvae.functional import reparameterize_kl

        h = torch.randn(batch, 2 * latent_dim).to(dtype).requires_grad_()
        mu, logvar = h.chunk(2, dim=-1)  # strided views, as a VAE's linear head gives them
        z, kl = reparameterize_kl(mu, logvar, logvar_limit=logvar_limit, logvar_clamp=logvar_clamp, backend="triton")
        torch.autograd.grad([z, kl], [h], [torch.randn_like(z), torch.ones_like(kl)])

    return run


def _latent_map(batch, channels, size, prior, logvar_clamp=None):
    """A stochastic layer on ``(B, C, H, W)`` latent maps, noise drawn, ``logvar_limit=10`` (or the hard clamp
    ``logvar_clamp``): ``"conditional"``, the hvae's (channel slices of the posterior and prior nets' outputs, one KL
    per image and channel: ``event_dims=2``); ``"shared"``, a learned ``(C, H, W)`` prior shared by the batch, one
    KL per image."""
    clamp = dict(logvar_limit=10.0) if logvar_clamp is None else dict(logvar_clamp=logvar_clamp)

    def run(dtype):
        from fastvae.functional import reparameterize_kl

        posterior = torch.randn(batch, 2 * channels, size, size).to(dtype).requires_grad_()
        if prior == "conditional":
            prior_out = torch.randn(batch, 2 * channels, size, size).to(dtype).requires_grad_()
            prior_mu, prior_logvar, event_dims = prior_out[:, :channels], prior_out[:, channels:], 2
            wrt = [posterior, prior_out]
        else:
            prior_mu = torch.randn(channels, size, size).to(dtype).requires_grad_()
            prior_logvar = torch.randn(channels, size, size).to(dtype).requires_grad_()
            event_dims, wrt = 3, [posterior, prior_mu, prior_logvar]
        z, kl = reparameterize_kl(
            posterior[:, :channels], posterior[:, channels:], prior_mu=prior_mu, prior_logvar=prior_logvar,
            event_dims=event_dims, backend="triton", **clamp,
        )
        torch.autograd.grad([z, kl], wrt, [torch.randn_like(z), torch.ones_like(kl)])

    return run


def _hvae_layer(batch, channels, size):
    def run(dtype):
        from fastvae.functional import reparameterize_kl

        # The hvae's stochastic layer: one KL per image and channel over (B, C, H, W) channel slices.
        posterior = torch.randn(batch, 2 * channels, size, size).to(dtype).requires_grad_()
        prior = torch.randn(batch, 2 * channels + 32, size, size).to(dtype).requires_grad_()
        z, kl = reparameterize_kl(
            posterior[:, :channels], posterior[:, channels:], prior_mu=prior[:, :channels],
            prior_logvar=prior[:, channels : 2 * channels], event_dims=2, logvar_limit=10.0, backend="triton",
        )
        torch.autograd.grad([z, kl], [posterior, prior], [torch.randn_like(z), torch.ones_like(kl)])

    return run


def _importance_samples(batch, latent_dim, samples):
    def run(dtype):
        from fastvae.functional import reparameterize_log_ratio

        # The IWAE's latent layer (fastvae train --objective iwae): K samples of a linear head's halves.
        h = torch.randn(batch, 2 * latent_dim).to(dtype).requires_grad_()
        mu, logvar = h.chunk(2, dim=-1)
        z, log_ratio = reparameterize_log_ratio(mu, logvar, samples=samples, logvar_limit=10.0, backend="triton")
        torch.autograd.grad([z, log_ratio], [h], [torch.randn_like(z), torch.rand_like(log_ratio)])

    return run


def _hvae_importance_samples(batch, channels, size, samples):
    def run(dtype):
        from fastvae.functional import reparameterize_log_ratio

        # A hierarchical VAE's layer under importance sampling: the prior per sample (channel slices of the prior
        # net's output on the K B states), the posterior of the top layer shared by the samples.
        posterior = torch.randn(batch, 2 * channels, size, size).to(dtype).requires_grad_()
        prior = torch.randn(samples, batch, 2 * channels + 32, size, size).to(dtype).requires_grad_()
        z, log_ratio = reparameterize_log_ratio(
            posterior[:, :channels], posterior[:, channels:], samples=samples, prior_mu=prior[:, :, :channels],
            prior_logvar=prior[:, :, channels : 2 * channels], event_dims=3, logvar_limit=10.0, backend="triton",
        )
        torch.autograd.grad([z, log_ratio], [posterior, prior], [torch.randn_like(z), torch.rand_like(log_ratio)])

    return run


def _dmol(batch, image_shape, num_mixtures, grad=True):
    def run(dtype):
        from fastvae.functional import discretized_logistic_mixture_nll
        from fastvae.ops.discretized_logistic_mixture import params_per_component

        channels, *pixels = image_shape
        params = torch.randn(batch, num_mixtures * params_per_component(channels), *pixels).to(dtype)
        x = torch.randint(0, 256, (batch, *image_shape)).float() / 255
        with torch.set_grad_enabled(grad):
            params.requires_grad_(grad)
            loss = discretized_logistic_mixture_nll(
                params, x, num_mixtures=num_mixtures, reduction="mean", backend="triton"
            )
            if grad:  # the gradient is written in the forward; the backward hands it over
                torch.autograd.grad(loss, [params])

    return run


def _vector_quantize(n, k, d, learned_codebook):
    def run(dtype):
        from fastvae.functional import vector_quantize

        z = torch.randn(n, d).to(dtype).requires_grad_()
        codebook = torch.randn(k, d).to(dtype).requires_grad_(learned_codebook)
        z_q, _, loss = vector_quantize(z, codebook, reduction="mean", backend="triton")
        wrt = [z, codebook] if learned_codebook else [z]
        torch.autograd.grad([z_q, loss], wrt, [torch.randn_like(z_q), torch.ones_like(loss)])

    return run


def _vq_feature_map(batch, d, size):
    def run(dtype):
        from fastvae.functional import vector_quantize

        # A VQ-VAE's bottleneck: a channel slice of a conv output, an EMA codebook (no gradient).
        h = torch.randn(batch, d + 8, size, size).to(dtype).requires_grad_()
        z_q, _, loss = vector_quantize(h[:, :d], torch.randn(512, d).to(dtype), dim=1, reduction="mean",
                                       backend="triton")
        torch.autograd.grad([z_q, loss], [h], [torch.randn_like(z_q), torch.ones_like(loss)])

    return run


def _diffusers_posterior(batch, channels, size, sampled=True, per_pixel=False):
    def run(dtype):
        from fastvae.functional import reparameterize_kl

        # diffusers' AutoencoderKL posterior as fastvae.integrations.diffusers computes it: the channel halves of
        # the encoder's (B, 2C, H, W) output, the hard clamp to [-30, 20], the noise given (diffusers draws it),
        # one KL per image; kl() before any sample() passes zero noise as one value (stride 0) and uses no z.
        # ``per_pixel``: the halves of a channels_last output read in place instead, one row per pixel of its C
        # channels (event_dims=1: rows of C = 4 columns), the KL per pixel then summed per image.
        h = torch.randn(batch, 2 * channels, size, size).to(dtype).requires_grad_()
        mean, logvar = h.permute(0, 2, 3, 1).chunk(2, dim=-1) if per_pixel else h.chunk(2, dim=1)
        noise = torch.randn_like(mean) if sampled else mean.new_zeros(()).expand(mean.shape)
        z, kl = reparameterize_kl(mean, logvar, noise, event_dims=1 if per_pixel else 3,
                                  logvar_clamp=(-30.0, 20.0), backend="triton")
        kl = kl.sum(dim=(1, 2)) if per_pixel else kl
        if sampled:
            torch.autograd.grad([z, kl], [h], [torch.randn_like(z), torch.ones_like(kl)])
        else:
            torch.autograd.grad(kl, [h], torch.ones_like(kl))

    return run


# Launches beyond the runner's cases and the training steps: one entry per scenario.
EXTRA_SCENARIOS = [
    Scenario("gaussian, logvar per element, mean, 256x784", _gaussian((256, 784), "mean")),
    Scenario("gaussian, scalar logvar, none, weighted, 256x784", _gaussian((), "none", weights=True)),
    Scenario("bce, none, weighted, 256x784", _weighted("bce")),
    Scenario("reparameterize_kl of a linear head's halves, 4096x32", _latent_head(4096, 32)),
    Scenario("reparameterize_kl of a linear head's halves, 128x16", _latent_head(128, 16)),
    Scenario("reparameterize_kl of an hvae layer, 8 channels of 7x7 maps, batch 64", _hvae_layer(64, 8, 7)),
    Scenario("reparameterize_log_ratio of a linear head's halves, K=5 samples of 128x20", _importance_samples(128, 20, 5)),
    Scenario("reparameterize_log_ratio of a linear head's halves, K=50 samples of 128x20",
             _importance_samples(128, 20, 50)),
    Scenario("reparameterize_log_ratio of an hvae layer, K=5, a prior per sample, 8 channels of 7x7, batch 16",
             _hvae_importance_samples(16, 8, 7, 5)),
    # Issue 18: the layouts that pick other variants (rows not a multiple of four columns in half precision, wide
    # rows, many channels of small maps, few channels of large ones); the whole grid is LATENT_SCENARIOS.
    Scenario("reparameterize_kl of a linear head's halves, 128x20, logvar_limit=10", _latent_head(128, 20, 10.0)),
    Scenario("reparameterize_kl of a linear head's halves, 128x512, logvar_limit=10", _latent_head(128, 512, 10.0)),
    Scenario("reparameterize_kl, conditional prior, 64 channels of 4x4 maps, batch 32",
             _latent_map(32, 64, 4, "conditional")),
    Scenario("reparameterize_kl, shared prior, 4 channels of 64x64 maps, batch 32", _latent_map(32, 4, 64, "shared")),
    Scenario("vector_quantize, 4096 vectors of 64 against 512 codes, codebook by gradient",
             _vector_quantize(4096, 512, 64, True)),
    Scenario("vector_quantize, 1024 vectors of 200 against 300 codes", _vector_quantize(1024, 300, 200, False)),
    Scenario("vector_quantize of a VQ-VAE's 7x7 map slice, 16 channels, batch 128, EMA codebook",
             _vq_feature_map(128, 16, 7)),
    # The DMOL forward's variants: greyscale and RGB at 5 and 10 components, with the gradient as training takes it
    # and without, as an evaluation does (several tiles per program, as at scale).
    Scenario("dmol nll, 1x28x28, M=5, batch 128", _dmol(128, (1, 28, 28), 5)),
    Scenario("dmol nll, 1x28x28, M=10, batch 128", _dmol(128, (1, 28, 28), 10)),
    Scenario("dmol nll, 3x32x32, M=5, batch 64", _dmol(64, (3, 32, 32), 5)),
    Scenario("dmol nll, 3x32x32, M=10, batch 64", _dmol(64, (3, 32, 32), 10)),
    Scenario("dmol nll without gradient (evaluation), 1x28x28, M=5, batch 128", _dmol(128, (1, 28, 28), 5, False)),
    Scenario("dmol nll without gradient (evaluation), 1x28x28, M=10, batch 128", _dmol(128, (1, 28, 28), 10, False)),
    Scenario("dmol nll without gradient (evaluation), 3x32x32, M=5, batch 64", _dmol(64, (3, 32, 32), 5, False)),
    Scenario("dmol nll without gradient (evaluation), 3x32x32, M=10, batch 64", _dmol(64, (3, 32, 32), 10, False)),
    Scenario("diffusers' AutoencoderKL posterior, sample and KL, SD's 4x64x64 latents, batch 8",
             _diffusers_posterior(8, 4, 64)),
    Scenario("diffusers' AutoencoderKL posterior, KL alone, SD's 4x64x64 latents, batch 8",
             _diffusers_posterior(8, 4, 64, sampled=False)),
    # The hard clamp with the noise drawn, on rows not a multiple of four columns (its backward once spilled).
    Scenario("reparameterize_kl of a linear head's halves, 128x20, logvar_clamp=(-30, 20)",
             _latent_head(128, 20, logvar_clamp=(-30.0, 20.0))),
]

# Issue 18's grid, audited by ``python -m benchmarks --static`` (too many variants to compile in every test run):
# flat latents as a VAE's head gives them (with the soft clamp the models use), latent maps of 4 to 64 channels
# from 4x4 to 64x64 with a conditional (hvae) or shared (learned) prior, and the hard clamp's variants.
FLAT_LATENT_DIMS = (16, 20, 32, 64, 128, 256, 512)
MAP_CHANNELS = (4, 16, 64)
MAP_SIZES = (4, 8, 16, 32, 64)
LATENT_SCENARIOS = [
    Scenario(f"reparameterize_kl of a linear head's halves, 128x{d}, logvar_limit=10", _latent_head(128, d, 10.0))
    for d in FLAT_LATENT_DIMS
] + [
    Scenario(f"reparameterize_kl, {prior} prior, {c} channels of {size}x{size} maps, batch 32",
             _latent_map(32, c, size, prior))
    for prior in ("conditional", "shared")
    for c in MAP_CHANNELS
    for size in MAP_SIZES
] + [
    # The hard clamp (diffusers' [-30, 20]) in the variants that keep the most values live: noise drawn, rows not a
    # multiple of four, wide rows, both priors.
    Scenario(f"reparameterize_kl of a linear head's halves, 128x{d}, logvar_clamp=(-30, 20)",
             _latent_head(128, d, logvar_clamp=(-30.0, 20.0)))
    for d in (20, 512)
] + [
    Scenario(f"reparameterize_kl, {prior} prior, {c} channels of {size}x{size} maps, batch 32, "
             "logvar_clamp=(-30, 20)", _latent_map(32, c, size, prior, logvar_clamp=(-30.0, 20.0)))
    for prior, c, size in (("conditional", 64, 4), ("conditional", 4, 64), ("shared", 4, 64), ("shared", 64, 4))
] + [
    # diffusers' posterior read in place from a channels_last encoder output: rows of C = 4 columns (the
    # integration copies such an output to contiguous halves instead; docs/diffusers.md).
    Scenario("diffusers' AutoencoderKL posterior of a channels_last output read per pixel (C = 4 columns), sample "
             "and KL, SD's 4x64x64 latents, batch 8", _diffusers_posterior(8, 4, 64, per_pixel=True)),
    Scenario("diffusers' AutoencoderKL posterior of a channels_last output read per pixel (C = 4 columns), KL "
             "alone, SD's 4x64x64 latents, batch 8", _diffusers_posterior(8, 4, 64, sampled=False, per_pixel=True)),
]


def audited_scenarios() -> list[Scenario]:
    """What ``python -m benchmarks --static`` runs beyond the counted cases: :data:`EXTRA_SCENARIOS` and
    :data:`LATENT_SCENARIOS`, each name once."""
    names = {s.name for s in EXTRA_SCENARIOS}
    return EXTRA_SCENARIOS + [s for s in LATENT_SCENARIOS if s.name not in names]


def noise_launches() -> dict[str, list[Launch]]:
    """The in-kernel noise benchmark's kernels (``tl.randn``, ``tl.randn4x``, fastvae's generator) at 2**24
    normals, recorded."""
    import triton

    from benchmarks.noise import BLOCK, NOISE_KERNELS, NUM_WARPS

    out = torch.empty(NOISE_ELEMENTS)
    launches: dict[str, list[Launch]] = {}
    for name, kernel in NOISE_KERNELS.items():
        with LaunchRecorder(launches=launches.setdefault(f"noise: {name}, 2^24 normals", []), execute=False):
            kernel[(triton.cdiv(NOISE_ELEMENTS, BLOCK),)](
                out, NOISE_ELEMENTS, 0x5EED_0F_FA57_FAE, BLOCK=BLOCK, num_warps=NUM_WARPS
            )
    return launches


def small_cases(dtypes) -> list:
    """Op cases small enough for the tests, with the tile shapes of the headline grid's (one per block shape)
    and every kernel variant the headline cases launch (priors, the soft clamp, the DMOL's gradient), and the
    hard clamp (diffusers' posterior)."""
    from benchmarks.ops import dmol_case, latent_map_case, loss_case, reparameterize_case

    cases = []
    for dtype in dtypes:
        cases += [
            reparameterize_case(64, 256, dtype, eps_given=False),
            reparameterize_case(64, 256, dtype, True),
            reparameterize_case(256, 32, dtype, eps_given=False),
            reparameterize_case(64, 256, dtype, False, logvar_limit=10.0),
            reparameterize_case(64, 256, dtype, True, logvar_clamp=(-30.0, 20.0)),
            latent_map_case(32, 16, dtype, "conditional"),
            latent_map_case(32, 16, dtype, "shared"),
            dmol_case(2, (3, 32, 32), dtype),
        ]
        for kind in ("mse", "bce", "gaussian", "l1"):
            cases += [loss_case(kind, 32, (784,), dtype), loss_case(kind, 2, (3, 64, 64), dtype)]
    return cases


def record_cases(cases) -> dict[str, list[Launch]]:
    """fastvae's launches for each case, forward and backward (not run)."""
    launches: dict[str, list[Launch]] = {}
    count_ops(cases, impls=("fastvae",), launches=launches, log=lambda *_: None)
    return launches


def record_extra(dtypes, scenarios=EXTRA_SCENARIOS) -> dict[str, list[Launch]]:
    """fastvae's launches in ``scenarios`` (default :data:`EXTRA_SCENARIOS`; not run), each once per dtype."""
    launches: dict[str, list[Launch]] = {}
    with _as_on_a_gpu():
        for scenario in scenarios:
            for dtype in dtypes:
                name = f"{scenario.name} {str(dtype).replace('torch.', '')}"
                with LaunchRecorder(launches=launches.setdefault(name, []), execute=False):
                    scenario.run(dtype)
    return launches


# ---- the audit table ---------------------------------------------------------------------------------------------


def audit_variants(launches: dict[str, list[Launch]], workers: int | None = None) -> list[dict]:
    """One row per distinct compiled variant among ``launches`` (and per trip count of its inner loops, if it has
    any), with where it is used; its figures per element are those of its largest launch."""
    from benchmarks.static.compile_sm90 import compile_in_subprocess

    flat = [(scenario, launch) for scenario, items in launches.items() for launch in items]
    compiled = compile_in_subprocess([launch.job() for _, launch in flat], workers)
    rows: dict[tuple[str, int], dict] = {}
    for (scenario, launch), key in zip(flat, compiled["variant_of"]):
        variant = compiled["variants"][key]
        spec = kernel_spec(launch.module, launch.kernel)
        # A row per variant, and per trip count of its inner loops (the DMOL's M): the work per element differs.
        trips = spec.count_inner_trips(launch.args)
        row = rows.get((key, trips))
        if row is None:
            row = rows[(key, trips)] = variant_row(launch, variant)
            row["inner_trips"] = trips
        row["used_by"].add(scenario)
        if launch.elements > row["elements_of_launch"]:
            row["elements_of_launch"] = launch.elements
            row["bytes_per_element"] = (launch.read_bytes + launch.write_bytes) / max(launch.elements, 1)
            row["grid"] = list(launch.grid)
            row["slots_per_element"] = spec.slots_per_element(launch.constexprs, launch.args)
    out = []
    for row in rows.values():
        row["used_by"] = sorted(row["used_by"])
        # Per element of the same launch as the bytes: a slot's instructions run in the padding too, and the inner
        # loops (if any) run their trips over the same tile.
        trips = row["inner_trips"]
        extra = trips - 1  # trips of the inner loops beyond the one the walk took
        per_slot = row["slots_per_element"] / (row["elements_per_thread"] * trips)
        executed = row["executed_instructions"] + extra * row["innermost_loop_instructions"]
        row["instructions_per_element"] = executed * per_slot
        inner_pipes = row.pop("innermost_pipes_per_thread")
        row["pipes_per_element"] = {
            p: (n + extra * inner_pipes.get(p, 0)) * per_slot for p, n in row.pop("pipes_per_thread").items()
        }
        row["bound"] = hardware.bound(
            row["instructions_per_element"], row["pipes_per_element"], row["bytes_per_element"]
        )
        out.append(row)
    return sorted(
        out, key=lambda r: (r["kernel"], r["dtype"], json.dumps(r["constexprs"], sort_keys=True), r["inner_trips"])
    )


def variant_row(launch: Launch, variant: dict) -> dict:
    spec = kernel_spec(launch.module, launch.kernel)
    summary = variant["specialisation"]
    num_warps = summary["num_warps"]
    tile = spec.tile_elements(launch.constexprs)
    per_thread = tile / (num_warps * hardware.WARP)
    resources = variant["resources"]
    shared = max(variant["shared_dynamic"], 0)
    pointer_types = [t for t in summary["types"].values() if t.startswith("*")]
    not_divisible = [name for name in summary["types"] if name not in summary["divisible_by_16"]]
    reads, writes = spec.accessed(launch.constexprs, launch.args)
    live = set(reads + writes)
    # What the launcher could not specialise, of the arguments the kernel uses: a pointer or a size not a
    # multiple of 16, a column stride not 1 (each costs vector width or index arithmetic).
    unspecialised = [a for a in not_divisible if a in live or a in ("n_rows", "n_cols", "cols_per_split")]
    unspecialised += [
        f"{a} != 1"
        for a in summary["types"]
        if a.startswith("stride_") and a.endswith("_col") and f"{a[7:-4]}_ptr" in live
    ]
    return {
        "kernel": launch.kernel,
        "key": variant["key"],
        "dtype": pointer_types[0][1:] if pointer_types else "",
        "constexprs": summary["constexprs"],
        "types": summary["types"],
        "num_warps": num_warps,
        "divisible_by_16": summary["divisible_by_16"],
        "not_divisible_by_16": not_divisible,
        "unspecialised": unspecialised,
        "enable_fp_fusion": summary["enable_fp_fusion"],
        "registers": resources.get("reg"),
        "stack_bytes": resources.get("stack"),
        "local_bytes": resources.get("local"),
        "spill_instructions": variant["spill_instructions"],
        "ptxas": variant["ptxas"],
        "local_instructions_off_path": variant["local_instructions_off_path"],
        "shared_bytes": shared,
        "static_shared_bytes": resources.get("shared"),
        "occupancy": hardware.occupancy(resources.get("reg", 255), shared, num_warps),
        "global_loads": variant["global_loads"],
        "global_stores": variant["global_stores"],
        "static_instructions": variant["static_instructions"],
        "executed_instructions": variant["executed_instructions"],
        "cold_instructions": variant["cold_instructions"],
        "loop_body_instructions": variant["loop_body_instructions"],
        "tile_elements": tile,  # slots, padding included
        "elements_per_thread": per_thread,  # slots a thread holds per trip
        "pipes_per_thread": variant["pipes"],
        "loops": variant["loops"],
        "innermost_loop_instructions": variant["innermost_loop_instructions"],
        "innermost_pipes_per_thread": variant["innermost_pipes"],
        "mix": variant["mix"],
        "used_by": set(),
        "elements_of_launch": -1,
        "bytes_per_element": 0.0,
        "slots_per_element": 1.0,  # of the launch the bytes are of (see benchmarks/static/kernels.py)
        "inner_trips": 1,  # of its inner loops per trip of its main loop, in the launches of this row
        "grid": None,
    }


def audit_matching(patterns: list[str], dtypes=DTYPES, workers: int | None = None) -> list[dict]:
    """The audit's rows for the scenarios of :func:`audited_scenarios` whose names contain one of ``patterns``
    (``python -m benchmarks --static --scenario TEXT``: a part of the audit in minutes, nothing written)."""
    scenarios = [s for s in audited_scenarios() if any(p in s.name for p in patterns)]
    if not scenarios:
        raise SystemExit(f"no audited scenario's name contains any of {patterns}")
    return audit_variants(record_extra(dtypes, scenarios), workers)


def variant_lines(rows: list[dict]) -> list[str]:
    """One line per variant: kernel, dtype, the constexprs that tell variants apart, registers, spill bytes,
    instructions per element and compute over memory time; then the scenarios that launch it."""
    lines = []
    for r in rows:
        flags = {k: v for k, v in r["constexprs"].items() if not k.startswith("BLOCK") and v not in (None, False)}
        spills = r["ptxas"]["spill_stores"] + r["ptxas"]["spill_loads"] if r["ptxas"] else "?"
        lines.append(
            f"{r['kernel']} {r['dtype']} {flags} warps={r['num_warps']}: {r['registers']} registers, spilled "
            f"{spills} B (ptxas), local {r['local_bytes']} B, {r['spill_instructions']} LDL/STL executed, "
            f"{r['instructions_per_element']:.1f} instructions/element, compute/memory "
            f"{r['bound']['compute_over_memory']:.2f}"
        )
        lines.extend(f"    {name}" for name in r["used_by"])
    return lines


# ---- everything --------------------------------------------------------------------------------------------------


def provenance(command: str) -> dict:
    import triton

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "target": "sm_90 (compiled without a GPU)",
        "hardware_model": hardware.describe(),
    }


def run_static(
    out_dir: Path,
    command: str,
    dtypes=DTYPES,
    train_batches=TRAIN_BATCHES,
    log=print,
    workers: int | None = None,
    max_elements: int = HEADLINE_ELEMENTS,
    op_impls=IMPLS,
    train_impls=TRAIN_IMPLS,
    launch_bound_cases=LAUNCH_BOUND_CASES,
    launch_bound_precisions=LAUNCH_BOUND_PRECISIONS,
) -> dict:
    """Count, compile, audit, check, and write ``results.json`` and ``results.md`` into ``out_dir``.

    The defaults are what ``python -m benchmarks --static`` runs (a few minutes on a 2-core CPU); the tests
    run it smaller.
    """
    from benchmarks.static import model
    from benchmarks.static.report import markdown

    start = time.perf_counter()
    launches: dict[str, list[Launch]] = {}
    log("counting the runner's op cases (eager, torch.compile, fastvae) ...")
    ops = count_ops(headline_cases(list(dtypes), max_elements), op_impls, launches=launches, log=log)
    log("counting the training steps ...")
    train = count_train_steps(train_batches, train_impls, launches=launches, log=log)
    log("counting the launch-bound regime's steps (eager, fastvae; fp32 and bf16) ...")
    launch_bound = count_train_cases(
        [(m, b, p) for p in launch_bound_precisions for m, b in launch_bound_cases],
        ("eager", "fastvae"),
        launches=launches,
        log=log,
        regime="launch-bound",
    )
    launches.update(record_extra(dtypes, audited_scenarios()))
    launches.update(noise_launches())
    n = sum(len(v) for v in launches.values())
    log(f"compiling the variants of {n} launches for sm_90 ...")
    variants = audit_variants(launches, workers)
    checks = model.check_all(ops, train + launch_bound)
    payload = {
        "provenance": provenance(command),
        "seconds": round(time.perf_counter() - start, 1),
        "audit": variants,
        "ops": ops,
        "train": train,
        "launch_bound": launch_bound,
        "checks": checks,
        "notes": NOTES,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    (out_dir / "results.md").write_text(markdown(payload))
    log(f"wrote {out_dir}/results.md and results.json in {payload['seconds']:.0f} s")
    return payload


NOTES = [
    "Counts are counts, not times: kernels launched, bytes kept for the backward and modelled bytes moved, "
    "read off the CPU run of the same code a GPU would run (launch planner sized for an H100).",
    "The audit's bound labels are estimates from static instruction counts against an H100's issue rate, "
    "pipe throughputs and bandwidth; only the GPU run measures them.",
]
