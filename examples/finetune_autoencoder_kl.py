"""Fine-tune (or train) a diffusers ``AutoencoderKL`` with fastvae's fused posterior and reconstruction loss.

The one line that changes a diffusers training script is ``patch_autoencoder_kl()``:
``vae.encode(x).latent_dist`` then samples ``z`` and computes the KL in one
fused call (the same numbers as diffusers'). The loss is latent diffusion's for
its KL autoencoders without the perceptual and adversarial terms: the L1 (or
squared) error summed per image, averaged over the batch, computed by fastvae's
fused ``reconstruction_loss``, plus ``--kl-weight`` (1e-6) times the KL.

On the CPU, at a tiny size, in a few minutes (64x64 binary shapes, a 0.7M-parameter model)::

    python examples/finetune_autoencoder_kl.py --data shapes --steps 300 --out runs/shapes

On a GPU, Stable Diffusion's VAE (weights from the Hugging Face Hub) on a folder of your images::

    python examples/finetune_autoencoder_kl.py --pretrained stabilityai/sd-vae-ft-mse \\
        --data my_images/ --image-size 256 --batch-size 8 --steps 2000 --precision bf16 --out runs/sd-vae

``--data`` takes what :func:`fastvae.data.load_images` takes (``shapes``,
``mnist``, ``digits``, an ``.npy``/``.npz`` file of images, or a folder of
image files, read once and cut to ``--image-size`` squares). ``--no-patch``
runs diffusers' own posterior and the loss in plain PyTorch, to compare. Needs
diffusers: ``pip install -e ".[diffusers]"``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastvae.data import load_images, loading_message, to_unit_float
from fastvae.errors import ConfigError
from fastvae.functional import reconstruction_loss

SHAPES_IMAGES = 2000  # shapes to generate by default: enough for a few hundred steps on the CPU


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="shapes",
                        help="a fastvae dataset name, an image file or a folder of images (default: shapes)")
    parser.add_argument("--num-images", type=int, default=None,
                        help="images to load (for shapes: to generate; default 2000), default all")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize the images to this size (a folder's: when read; default: as they are)")
    parser.add_argument("--pretrained", default=None,
                        help="a diffusers AutoencoderKL to start from (a Hub name or a folder), else a new one")
    parser.add_argument("--channels", default="16,32,64",
                        help="a new model's channels per level (default 16,32,64: 4x downsampling)")
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--latent-channels", type=int, default=4)
    parser.add_argument("--loss", choices=("l1", "mse"), default="l1", help="reconstruction loss (default l1)")
    parser.add_argument("--kl-weight", type=float, default=1e-6, help="the KL's weight (default 1e-6, as LDM)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam's learning rate (default 1e-4 for --pretrained, 1e-3 for a new model)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: autocast the model to bfloat16 (on a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-patch", action="store_true",
                        help="diffusers' own posterior and the loss in plain PyTorch, to compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None,
                        help="save the model (save_pretrained) and a figure of reconstructions here")
    args = parser.parse_args(argv)
    if args.num_images is None and args.data == "shapes":
        args.num_images = SHAPES_IMAGES
    for name in ("num_images", "steps", "batch_size", "layers_per_block", "latent_channels", "log_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.image_size is not None and args.image_size < 8:
        parser.error("--image-size must be at least 8")
    if args.lr is None:
        args.lr = 1e-4 if args.pretrained else 1e-3
    try:
        args.channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        parser.error(f"--channels must be comma-separated integers, got {args.channels!r}")
    if args.precision == "bf16" and not args.device.startswith("cuda"):
        parser.error("--precision bf16 autocasts on a GPU: use --device cuda")
    return args


def build_autoencoder(args: argparse.Namespace, image_channels: int):
    """The pretrained AutoencoderKL, or a new one of ``--channels`` for ``image_channels``-channel images."""
    from diffusers import AutoencoderKL

    if args.pretrained is not None:
        return AutoencoderKL.from_pretrained(args.pretrained)
    levels = len(args.channels)
    return AutoencoderKL(
        in_channels=image_channels, out_channels=image_channels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=args.channels,
        layers_per_block=args.layers_per_block, latent_channels=args.latent_channels,
        norm_num_groups=math.gcd(*args.channels, 32),
    )


def prepare(images: torch.Tensor, channels: int, size: int | None, device: torch.device) -> torch.Tensor:
    """A batch as the autoencoder takes it: float32 in [-1, 1], ``channels`` channels (grey repeated), resized."""
    x = to_unit_float(images).to(device) * 2 - 1
    if x.shape[1] != channels:
        if x.shape[1] != 1:
            raise ConfigError(f"the model takes {channels}-channel images, the data has {x.shape[1]} channels")
        x = x.expand(-1, channels, -1, -1)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def loss_terms(vae, x: torch.Tensor, args, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The reconstruction error (summed per image, averaged over the batch) and the batch's mean KL."""
    posterior = vae.encode(x).latent_dist
    x_hat = vae.decode(posterior.sample(generator=generator)).sample
    backend = "torch" if args.no_patch else None
    return reconstruction_loss(x_hat, x, args.loss, reduction="mean", backend=backend), posterior.kl().mean()


@torch.no_grad()
def held_out_error(vae, images: torch.Tensor, args, channels: int, size: int | None) -> float:
    """The reconstruction error of the held-out images through the posterior's mode, per image."""
    total = 0.0
    for batch in images.split(args.batch_size):
        x = prepare(batch, channels, size, torch.device(args.device))
        with autocast(args):
            x_hat = vae.decode(vae.encode(x).latent_dist.mode()).sample
        total += reconstruction_loss(x_hat, x, args.loss, reduction="sum").item()
    return total / len(images)


def autocast(args):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16")


def save_figure(vae, images: torch.Tensor, args, channels: int, size: int | None, path: Path) -> None:
    """Eight held-out images (top) and their reconstructions (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = prepare(images[:8], channels, size, torch.device(args.device))
    with torch.no_grad(), autocast(args):
        x_hat = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
    figure, axes = plt.subplots(2, len(x), figsize=(1.5 * len(x), 3.2), squeeze=False)
    for column in range(len(x)):
        for row, batch in enumerate((x, x_hat)):
            picture = ((batch[column].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu()
            axes[row, column].imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray")
            axes[row, column].axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("this example needs diffusers: pip install -e \".[diffusers]\"", file=sys.stderr)
        return 2
    from fastvae.integrations.diffusers import patch_autoencoder_kl

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if not args.no_patch:
        patch_autoencoder_kl()  # the one line: every AutoencoderKL's latent_dist is fused from here on
    message = loading_message(args.data, num_images=args.num_images)
    if message:
        print(message, "...")
    try:
        folder = os.path.isdir(args.data)  # resized when read, not batch by batch
        data = load_images(args.data, num_images=args.num_images, image_size=args.image_size if folder else None)
    except ConfigError as error:
        print(f"--data: {error}", file=sys.stderr)
        return 2
    vae = build_autoencoder(args, data.image_shape[0]).to(device).train()
    channels = vae.config.in_channels
    size = args.image_size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if (size or data.image_shape[-1]) % factor or (size or data.image_shape[-2]) % factor:
        print(f"the images ({size or 'x'.join(map(str, data.image_shape[1:]))}) must be a multiple of {factor} "
              f"(the model downsamples by {factor}): pass --image-size", file=sys.stderr)
        return 2
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.lr)
    sampler = torch.Generator().manual_seed(args.seed)
    noise = torch.Generator(device).manual_seed(args.seed + 1)
    parameters = sum(p.numel() for p in vae.parameters())
    path = "diffusers' own posterior, plain PyTorch loss" if args.no_patch else "fastvae's fused posterior and loss"
    kernels = "Triton kernels" if device.type == "cuda" else "fastvae's reference path (the kernels need a GPU)"
    print(f"AutoencoderKL, {parameters / 1e6:.2f}M parameters, {len(data.train)} training images "
          f"{tuple(data.image_shape)}, on {device}: {path}" + ("" if args.no_patch else f", {kernels}"))
    start, first_step_end = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        batch = data.train[torch.randint(len(data.train), (args.batch_size,), generator=sampler)]
        x = prepare(batch, channels, size, device)
        with autocast(args):
            reconstruction, kl = loss_terms(vae, x, args, noise)
        loss = reconstruction + args.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1:
            first_step_end = time.perf_counter()
        if step % args.log_every == 0 or step == args.steps:  # the only host reads: no sync in the other steps
            if not math.isfinite(loss.item()):
                print(f"step {step}: the loss is {loss.item()}; lower --lr", file=sys.stderr)
                return 1
            rate = (step - 1) / (time.perf_counter() - first_step_end) if step > 1 else float("nan")
            print(f"step {step:5d}  loss {loss.item():.4f}  reconstruction {reconstruction.item():.4f}  "
                  f"kl {kl.item():.1f}  {rate * args.batch_size:.1f} images/s")
    vae.eval()
    print(f"held-out {args.loss} error per image: {held_out_error(vae, data.test, args, channels, size):.4f} "
          f"({len(data.test)} images); {time.perf_counter() - start:.0f} s in all")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        vae.save_pretrained(args.out)
        save_figure(vae, data.test, args, channels, size, args.out / "reconstructions.png")
        print(f"saved the model and reconstructions.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
