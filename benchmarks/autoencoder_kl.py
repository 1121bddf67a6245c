"""diffusers' ``AutoencoderKL`` posterior, diffusers' way and fused: ``python -m benchmarks.autoencoder_kl``.

Needs diffusers (``pip install -e ".[diffusers]"``). Two parts, each written
to ``benchmarks/results/autoencoder_kl/``:

* ``--counts`` (no GPU needed: fastvae's Triton launches are recorded, not run,
  with :mod:`benchmarks.static`'s machinery, the launch planner sized for an
  H100): kernels launched, modelled bytes moved and bytes kept for the backward
  of the posterior (chunk, clamp, exp, exp, sample, KL: ``encode(x).latent_dist``,
  ``.sample()``, ``.kl()``, then the backward of ``z`` and the KL into the
  encoder's output) with diffusers' ``DiagonalGaussianDistribution`` and with
  :class:`fastvae.integrations.diffusers.FusedDiagonalGaussianDistribution`,
  at SD's ``(B, 4, 64, 64)`` and Flux's ``(B, 16, 128, 128)`` latents, float32
  and bfloat16; and the share of the posterior and the loss in a whole training
  step (forward, backward, Adam) of three AutoencoderKL configurations.
* ``--times DEVICE``: the time of a training step, unpatched and patched, and
  of its posterior + loss part alone, on ``DEVICE``. On the CPU the patched
  posterior runs fastvae's reference path (the kernels need a GPU): only the
  unpatched share means something there, and a CPU's share is not a GPU's.

The loss is latent diffusion's (LDM's ``LPIPSWithDiscriminator`` without its
perceptual and adversarial terms): the L1 reconstruction error summed per image
and averaged over the batch, plus ``1e-6`` times the KL averaged over the batch;
patched, the L1 term is fastvae's fused ``reconstruction_loss(..., "l1",
reduction="mean")``, which is that same number.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results" / "autoencoder_kl"
KL_WEIGHT = 1e-6  # latent diffusion's KL weight for its KL-regularised autoencoders
COUNT_BATCH = 8
# (C, H, W) of one latent.
LATENTS = {"SD (B, 4, 64, 64)": (4, 64, 64), "Flux (B, 16, 128, 128)": (16, 128, 128)}
LAYOUTS = ("channels_last", "contiguous")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Config:
    """An AutoencoderKL and the images of one training step."""

    name: str
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    image_channels: int
    image_size: int
    batch: int
    quant_convs: bool = True

    def build(self):
        from diffusers import AutoencoderKL

        levels = len(self.block_out_channels)
        return AutoencoderKL(
            in_channels=self.image_channels, out_channels=self.image_channels,
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels, norm_num_groups=self.norm_num_groups,
            sample_size=self.image_size, use_quant_conv=self.quant_convs, use_post_quant_conv=self.quant_convs,
        )

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        factor = 2 ** (len(self.block_out_channels) - 1)
        size = self.image_size // factor
        return (self.batch, self.latent_channels, size, size)


SD_CHANNELS = (128, 256, 512, 512)  # Stable Diffusion's VAE (83.7M parameters); Flux's has 16 latent channels
CONFIGS = [
    # The example's CPU size (examples/finetune_autoencoder_kl.py): 64x64 binary shapes, 16x16 latents.
    Config("tiny (16, 32, 64), 1x64x64 images, batch 8", (16, 32, 64), 1, 4, 8, 1, 64, 8),
    # SD's and Flux's VAEs (Flux's: 16 latent channels, no quant convs). The activations and the posterior both
    # grow with the pixels while the weights' and Adam's bytes do not: at 64x64 images those dominate, at 256x256
    # (32x32 latents) less so; fine-tuning runs at 256 to 1024.
    Config("SD's VAE, 3x64x64 images, batch 2", SD_CHANNELS, 2, 4, 32, 3, 64, 2),
    Config("SD's VAE, 3x256x256 images, batch 1", SD_CHANNELS, 2, 4, 32, 3, 256, 1),
    Config("Flux's VAE, 3x256x256 images, batch 1", SD_CHANNELS, 2, 16, 32, 3, 256, 1, quant_convs=False),
]


# ---- the posterior + loss, diffusers' way and fastvae's ----------------------------------------------------------


@contextlib.contextmanager
def posterior_impl(impl: str, backend: str | None):
    """AutoencoderKL with diffusers' posterior (``"diffusers"``) or fastvae's (``"fastvae"``, patched)."""
    from fastvae.integrations.diffusers import patch_autoencoder_kl, unpatch_autoencoder_kl

    if impl == "fastvae":
        patch_autoencoder_kl(backend=backend)
    try:
        yield
    finally:
        unpatch_autoencoder_kl()


def make_posterior(h: torch.Tensor, impl: str, backend: str | None):
    """diffusers' ``DiagonalGaussianDistribution(h)``, or fastvae's fused one."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from fastvae.integrations.diffusers import FusedDiagonalGaussianDistribution

    if impl == "fastvae":
        return FusedDiagonalGaussianDistribution(h, backend=backend)
    return DiagonalGaussianDistribution(h)


def reconstruction_l1(x_hat: torch.Tensor, x: torch.Tensor, impl: str, backend: str | None) -> torch.Tensor:
    """The L1 error summed per image, averaged over the batch: LDM's code, or fastvae's fused loss."""
    if impl == "fastvae":
        from fastvae.functional import reconstruction_loss

        return reconstruction_loss(x_hat, x, "l1", reduction="mean", backend=backend)
    return (x_hat - x).abs().sum() / x.shape[0]


def posterior_and_loss(h, x_hat, x, grad_z, impl: str, backend: str | None) -> None:
    """The step's part that fastvae fuses, forward and backward: the posterior of the encoder's output ``h``
    (sample, KL) and the loss of the decoder's output ``x_hat``; the decoder left out, ``grad_z`` stands for the
    gradient its backward hands to ``z``."""
    posterior = make_posterior(h, impl, backend)
    z = posterior.sample()
    loss = reconstruction_l1(x_hat, x, impl, backend) + KL_WEIGHT * posterior.kl().mean()
    return loss, z


# ---- counts -------------------------------------------------------------------------------------------------------


def count_posterior(
    latent: tuple[int, int, int], dtype: torch.dtype, impl: str, batch: int = COUNT_BATCH, layout: str = "channels_last"
) -> dict:
    """Kernels, modelled bytes and bytes kept of the posterior of a ``(batch, *latent)`` latent, forward (encode's
    posterior, ``sample()``, ``kl()``) and backward (from ``z`` and the KL into the encoder's output).

    ``layout``: the encoder output's, ``"channels_last"`` (what AutoencoderKL's encoder returns: its mid-block
    attention reshapes to it) or ``"contiguous"``."""
    from benchmarks.static.capture import SavedTensors, counting, summarise
    from benchmarks.static.counts import _as_on_a_gpu

    torch.manual_seed(0)
    channels, height, width = latent
    h = torch.randn(batch, 2 * channels, height, width).to(dtype)
    if layout == "channels_last":
        h = h.contiguous(memory_format=torch.channels_last)
    h.requires_grad_()
    forward, backward = [], []
    with _as_on_a_gpu():
        with SavedTensors() as saved, counting(forward):
            posterior = make_posterior(h, impl, "triton")
            z = posterior.sample()
            kl = posterior.kl()
        grads = [torch.randn_like(z), torch.ones_like(kl)]
        with counting(backward):
            torch.autograd.grad([z, kl], [h], grads)
    unit = h.numel() // 2 * h.element_size()  # one latent's worth: B x C x H x W elements
    return {
        "unit_bytes": unit,
        "forward": summarise(forward),
        "backward": summarise(backward),
        "kept_bytes": saved.bytes(exclude=[h]),
    }


def count_step(config: Config, impl: str) -> dict:
    """Kernels and modelled bytes of one training step (forward, backward, Adam with ``foreach``), the second
    (the first creates Adam's state), and of its posterior + loss part alone, at the same shapes."""
    from benchmarks.static.capture import LaunchRecorder, SavedTensors, counting, summarise
    from benchmarks.static.counts import _as_on_a_gpu

    torch.manual_seed(0)
    with _as_on_a_gpu(), LaunchRecorder(execute=False), posterior_impl(impl, "triton"):
        vae = config.build()
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-4, foreach=True)
        x = torch.rand(config.batch, config.image_channels, config.image_size, config.image_size) * 2 - 1

        def step(events):
            optimizer.zero_grad(set_to_none=True)
            with SavedTensors() as saved, counting(events["forward"]) if events else contextlib.nullcontext():
                posterior = vae.encode(x).latent_dist
                x_hat = vae.decode(posterior.sample()).sample
                loss = reconstruction_l1(x_hat, x, impl, "triton") + KL_WEIGHT * posterior.kl().mean()
            with counting(events["backward"]) if events else contextlib.nullcontext():
                loss.backward()
            host = {id(s["step"]) for s in optimizer.state.values() if "step" in s}
            with counting(events["optimizer"], host=host) if events else contextlib.nullcontext():
                optimizer.step()
            return saved, memory_format(posterior.parameters)

        step(None)
        events = {phase: [] for phase in ("forward", "backward", "optimizer")}
        saved, layout = step(events)
        h, x_hat, grad_z = _part_inputs(config, x, layout)
        part = {"forward": [], "backward": []}
        with SavedTensors() as part_saved, counting(part["forward"]):
            loss, z = posterior_and_loss(h, x_hat, x, grad_z, impl, "triton")
        with counting(part["backward"]):
            part_backward(loss, z, h, x_hat, grad_z)
    step_events = [e for phase in events.values() for e in phase]
    return {
        "parameters": sum(p.numel() for p in vae.parameters()),
        "layout": str(layout).replace("torch.", ""),
        "step": summarise(step_events) | {"kept_bytes": saved.bytes(exclude=list(vae.parameters()) + [x])},
        "phases": {phase: summarise(e) for phase, e in events.items()},
        "posterior_and_loss": summarise(part["forward"] + part["backward"])
        | {"kept_bytes": part_saved.bytes(exclude=[h, x_hat, x])},
    }


def part_backward(loss, z, h, x_hat, grad_z) -> None:
    """The part's backward into ``h`` and ``x_hat``: gradients returned, not accumulated into ``.grad`` (which
    would copy a gradient the loss still holds, a cost the real step, where ``x_hat`` is no leaf, never pays)."""
    torch.autograd.grad([loss, z], [h, x_hat], [torch.ones_like(loss), grad_z])


def memory_format(h: torch.Tensor) -> torch.memory_format:
    """The layout of an encoder's output: channels_last (AutoencoderKL's on the CPU: its mid-block attention
    reshapes to that layout) or contiguous."""
    channels_last = h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _part_inputs(config: Config, x: torch.Tensor, layout: torch.memory_format):
    """The encoder's output ``h`` (in the step's ``layout``), the decoder's ``x_hat`` and the gradient the decoder
    gives ``z``, for the posterior + loss part alone at ``config``'s shapes."""
    batch, channels, height, width = config.latent_shape
    h = torch.randn(batch, 2 * channels, height, width, device=x.device).contiguous(memory_format=layout)
    return h.requires_grad_(), torch.randn_like(x).requires_grad_(), torch.randn(config.latent_shape, device=x.device)


def run_counts(log=print) -> dict:
    posterior = []
    for latent_name, latent in LATENTS.items():
        for layout in LAYOUTS:
            for dtype_name, dtype in DTYPES.items():
                for impl in ("diffusers", "fastvae"):
                    record = count_posterior(latent, dtype, impl, layout=layout)
                    posterior.append({"latent": latent_name, "batch": COUNT_BATCH, "layout": layout,
                                      "dtype": dtype_name, "impl": impl} | record)
                    log(f"  counted the posterior, {latent_name}, {layout}, {dtype_name}, {impl}")
    steps = []
    for config in CONFIGS:
        for impl in ("diffusers", "fastvae"):
            start = time.perf_counter()
            steps.append({"config": asdict(config), "impl": impl} | count_step(config, impl))
            log(f"  counted the step of {config.name}, {impl}, in {time.perf_counter() - start:.0f} s")
    return {"posterior": posterior, "steps": steps}


# ---- times --------------------------------------------------------------------------------------------------------


def _median_s(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_config(config: Config, device: torch.device, reps: int) -> list[dict]:
    """Median seconds of a training step and of its posterior + loss part alone, unpatched and patched."""
    records = []
    for impl in ("diffusers", "fastvae"):
        torch.manual_seed(0)
        with posterior_impl(impl, None):
            vae = config.build().to(device)
            optimizer = torch.optim.Adam(vae.parameters(), lr=1e-4)
            x = torch.rand(config.batch, config.image_channels, config.image_size, config.image_size, device=device)
            x = x * 2 - 1

            def step():
                optimizer.zero_grad(set_to_none=True)
                posterior = vae.encode(x).latent_dist
                x_hat = vae.decode(posterior.sample()).sample
                loss = reconstruction_l1(x_hat, x, impl, None) + KL_WEIGHT * posterior.kl().mean()
                loss.backward()
                optimizer.step()

            with torch.no_grad():
                layout = memory_format(vae._encode(x))
            h, x_hat, grad_z = _part_inputs(config, x, layout)

            def part():
                loss, z = posterior_and_loss(h, x_hat, x, grad_z, impl, None)
                part_backward(loss, z, h, x_hat, grad_z)

            step_s, part_s = _median_s(step, device, reps), _median_s(part, device, reps)
        records.append({"config": asdict(config), "impl": impl, "step_s": step_s, "posterior_and_loss_s": part_s,
                        "share": part_s / step_s})
    return records


# ---- report -------------------------------------------------------------------------------------------------------


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def counts_markdown(counts: dict, command: str) -> str:
    lines = [
        "# diffusers' AutoencoderKL posterior: counts",
        "",
        f"`{command}` (no GPU: fastvae's launches recorded, not run; the planner sized for an H100). Units: one "
        "latent's bytes (B x C x H x W elements). Forward: `encode(x).latent_dist`, `.sample()`, `.kl()`; backward: "
        "from `z` (random upstream gradient) and the KL into the encoder's output. Kept: bytes autograd keeps for "
        "the backward beyond the encoder's output. AutoencoderKL's encoder returns its output channels_last on "
        "this CPU (its mid-block attention reshapes to that layout); the fused posterior reads either layout in "
        "place.",
        "",
        "| latent | encoder output | dtype | posterior | kernels fwd + bwd | bytes moved fwd + bwd (units) "
        "| kept (units) | kept (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in counts["posterior"]:
        f, b, unit = r["forward"], r["backward"], r["unit_bytes"]
        lines.append(
            f"| {r['latent'].replace('(B', '(' + str(r['batch']))} | {r['layout']} | "
            f"{r['dtype']} | {r['impl']} | {f['kernels']} + {b['kernels']} = {f['kernels'] + b['kernels']} | "
            f"{f['bytes'] / unit:.1f} + {b['bytes'] / unit:.1f} = {(f['bytes'] + b['bytes']) / unit:.1f} | "
            f"{r['kept_bytes'] / unit:.2f} | {_mib(r['kept_bytes'])} |"
        )
    lines += ["", "Kernels in order (float32, SD's latent):", ""]
    for r in counts["posterior"]:
        if r["dtype"] == "float32" and r["latent"].startswith("SD"):
            lines.append(f"* {r['impl']}, {r['layout']}: forward {', '.join(r['forward']['launches'])}; "
                         f"backward {', '.join(r['backward']['launches'])}")
    lines += [
        "",
        "## The posterior and the loss in a whole training step",
        "",
        "One step (forward, backward, Adam with `foreach`) of L1 reconstruction + 1e-6 KL; the part: the posterior "
        "(sample, KL) and the loss alone, forward and backward, at the step's shapes and its encoder output's layout. "
        "Modelled bytes count each kernel's tensor arguments once (a lower bound for convolutions).",
        "",
        "| model | parameters | encoder output | posterior | step kernels | step bytes (MiB) | of which forward + "
        "backward | part kernels | part bytes (MiB) | part's share of kernels | of bytes | of forward + backward "
        "bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in counts["steps"]:
        s, p = r["step"], r["posterior_and_loss"]
        passes = r["phases"]["forward"]["bytes"] + r["phases"]["backward"]["bytes"]
        lines.append(
            f"| {r['config']['name']} | {r['parameters'] / 1e6:.2f}M | {r['layout']} | {r['impl']} | {s['kernels']} | "
            f"{_mib(s['bytes'])} | {_mib(passes)} | {p['kernels']} | {_mib(p['bytes'])} | "
            f"{p['kernels'] / s['kernels']:.1%} | {p['bytes'] / s['bytes']:.2%} | {p['bytes'] / passes:.2%} |"
        )
    return "\n".join(lines) + "\n"


def _share(value: float) -> str:
    return f"{100 * value:.2g}%"


def times_markdown(times: list[dict], device: torch.device, command: str, machine: str) -> str:
    lines = [
        f"# diffusers' AutoencoderKL training step: times on {device.type}",
        "",
        f"`{command}` on {machine}: median seconds of a step (forward, backward, Adam) and of its posterior + loss "
        "part alone.",
    ]
    if device.type == "cpu":
        lines += [
            "",
            "On the CPU the patched posterior runs fastvae's reference path (plain PyTorch), not the Triton "
            "kernels, and a CPU's share of a step is not a GPU's: these times say only how small the part is "
            "beside the convolutions here. Steps of the two rows differ by the machine's load, not by the posterior.",
        ]
    lines += ["", "| model | posterior | step (s) | posterior + loss (s) | share |", "|---|---|---|---|---|"]
    for r in times:
        lines.append(f"| {r['config']['name']} | {r['impl']} | {r['step_s']:.3f} | {r['posterior_and_loss_s']:.5f} | "
                     f"{_share(r['share'])} |")
    return "\n".join(lines) + "\n"


def _machine(device: torch.device) -> str:
    """The device in words, with the CPU's load (other jobs' work slows a shared machine's steps)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    load = ", load average {:.1f}".format(os.getloadavg()[0]) if hasattr(os, "getloadavg") else ""
    return f"a CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}{load})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.autoencoder_kl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", action="store_true", help="count kernels and bytes (no GPU; a fresh process)")
    parser.add_argument("--times", metavar="DEVICE", default=None, help="time the steps on DEVICE (cpu, cuda)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (default 5)")
    parser.add_argument("--configs", default=None,
                        help="comma-separated indices of the configurations to time (default: all)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args(argv)
    if not args.counts and args.times is None:
        parser.error("ask for --counts, --times DEVICE, or both")
    command = "python -m benchmarks.autoencoder_kl " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    if args.counts:
        if "fastvae.kernels.launch" in sys.modules and not sys.modules["fastvae.kernels.launch"].is_interpreted():
            raise SystemExit("--counts must run in a fresh process: fastvae's kernels were already compiled for a GPU")
        os.environ["TRITON_INTERPRET"] = "1"  # the launches are recorded on CPU tensors
        counts = run_counts()
        (args.out / "counts.json").write_text(json.dumps({"command": command} | counts, indent=1, default=str))
        (args.out / "counts.md").write_text(counts_markdown(counts, command))
        print(f"wrote {args.out}/counts.md")
    if args.times is not None:
        device = torch.device(args.times)
        chosen = [CONFIGS[int(i)] for i in args.configs.split(",")] if args.configs else CONFIGS
        times = []
        for config in chosen:
            times += time_config(config, device, args.reps)
            print(f"  timed {config.name}")
        from benchmarks.harness import device_name

        name = device_name(device)
        machine = _machine(device)
        (args.out / f"times-{name}.json").write_text(
            json.dumps({"command": command, "machine": machine, "times": times}, indent=1))
        (args.out / f"times-{name}.md").write_text(times_markdown(times, device, command, machine))
        print(f"wrote {args.out}/times-{name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
