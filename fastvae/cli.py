"""The ``fastvae`` command: ``fastvae train``, ``fastvae eval`` and ``fastvae sample``.

Each subcommand is registered in :data:`SUBCOMMANDS` with :func:`register`
(its name, a one-line help, a function adding its arguments and a function
running it), so later ones (a ``bench`` command) plug in the same way.

Bad input (an unknown option value, dataset or model, an unreadable file, a
run folder that exists, ...) ends with one line on stderr and exit status 2,
without a traceback and without writing anything; a loss that turns NaN or
infinite ends with status 1, an interrupt with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from fastvae.errors import ConfigError, NonFiniteLossError

EXIT_USAGE, EXIT_NONFINITE, EXIT_INTERRUPTED = 2, 1, 130


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, not a usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}


def register(name: str, help: str, add_arguments, run) -> None:
    """Add the subcommand ``fastvae <name>``: ``add_arguments(parser)`` declares its options, ``run(args)`` runs it."""
    SUBCOMMANDS[name] = Subcommand(help, add_arguments, run)


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "a non-negative integer")


def _positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0 and math.isfinite(v), "a positive number")


def _non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0 and math.isfinite(v), "a non-negative number")


def _number(text: str, kind, valid, what: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


# --- fastvae train -----------------------------------------------------------------------------


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from fastvae.backend import BACKENDS
    from fastvae.data import DATASETS
    from fastvae.models import LIKELIHOODS
    from fastvae.training.builders import MODELS
    from fastvae.training.config import NOISE_MODES, PRECISIONS, TrainConfig
    from fastvae.training.distributed import DEVICES

    d = TrainConfig()
    # Options left out are left out of the namespace too (SUPPRESS): on --resume they come from the checkpoint.
    parser.argument_default = argparse.SUPPRESS
    what = parser.add_argument_group("what to train")
    what.add_argument(
        "--data",
        metavar="NAME|FILE",
        help=f"dataset: {', '.join(DATASETS)}, or a .npy/.npz file of images (default: {d.data})",
    )
    what.add_argument(
        "--num-images",
        type=_positive_int,
        metavar="N",
        help="use the first N images (training and held-out together); for shapes, generate N "
        "(default: all; 20000 shapes)",
    )
    what.add_argument(
        "--model",
        choices=MODELS,
        help="mlp: fully connected; conv: convolutional, for square images; hvae: a top-down hierarchical VAE "
        f"(VDVAE/NVAE style) with stochastic layers on latent feature maps (default: {d.model})",
    )
    what.add_argument(
        "--latent-dim", type=_positive_int, metavar="D", help=f"size of the latent z (default: {d.latent_dim})"
    )
    what.add_argument(
        "--hidden",
        type=_positive_int,
        nargs="+",
        metavar="N",
        help="mlp: hidden layer sizes (default: 512 256); conv: channels of the stride-2 layers, "
        "one per halving of the image (default: from the image size); hvae: one number, the channels of the "
        "encoder's features and the decoder's state (default: 32)",
    )
    what.add_argument(
        "--layers-per-resolution",
        type=_non_negative_int,
        nargs="+",
        metavar="N",
        help="hvae: stochastic layers at each resolution of the latent hierarchy, coarsest first (28x28 images: "
        "7x7, then 14x14) (default: 2 2)",
    )
    what.add_argument(
        "--latent-channels",
        type=_positive_int,
        metavar="C",
        help="hvae: latent channels of each stochastic layer (default: 8)",
    )
    what.add_argument(
        "--likelihood",
        choices=LIKELIHOODS,
        help="p(x|z): bce = Bernoulli on logits, gaussian = learned variance, mse = fixed variance, "
        f"l1 = Laplace (default: {d.likelihood})",
    )
    what.add_argument(
        "--logvar-limit",
        type=_non_negative_float,
        metavar="L",
        help="soft-clamp the encoder's log-variance (log sigma^2) to (-L, L) so exp(logvar) stays "
        f"finite; 0 turns it off (default: {d.logvar_limit:g})",
    )
    how = parser.add_argument_group("how to train")
    how.add_argument("--beta", type=_non_negative_float, help=f"weight of the KL term (beta-VAE) (default: {d.beta:g})")
    how.add_argument(
        "--kl-warmup",
        type=_non_negative_int,
        metavar="STEPS",
        help="raise the KL weight linearly from 0 to beta over this many steps "
        f"(default: {d.kl_warmup}, no warm-up)",
    )
    how.add_argument(
        "--free-bits",
        type=_non_negative_float,
        metavar="NATS",
        help="hvae: the KL of each latent channel of each layer, averaged over the batch, counts as at least this "
        f"many nats in the loss; the logged KL stays the true one (default: {d.free_bits:g})",
    )
    how.add_argument(
        "--grad-clip",
        type=_non_negative_float,
        metavar="NORM",
        help="clip the gradient norm to this (every step is taken; the norm is logged as grad_norm); 0 turns it "
        "off (default: the model's: 200 for hvae, none for mlp and conv)",
    )
    how.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="B",
        help=f"global batch size, split evenly among torchrun processes (default: {d.batch_size})",
    )
    how.add_argument("--epochs", type=_positive_int, help=f"passes over the training images (default: {d.epochs})")
    how.add_argument("--steps", type=_positive_int, help="optimizer steps in all; wins over --epochs")
    how.add_argument("--lr", type=_positive_float, help=f"Adam learning rate (default: {d.lr:g})")
    how.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32, or autocast to bf16, or to fp16 with a gradient scaler " f"(default: {d.precision})",
    )
    how.add_argument(
        "--seed", type=_non_negative_int, help=f"seed of the weights, data order and noise (default: {d.seed})"
    )
    how.add_argument(
        "--noise",
        choices=NOISE_MODES,
        help="rank: each process draws its own noise inside the fused op; global: the global "
        "batch's noise from one generator, sliced per process, so results do not depend on "
        f"the number of processes (default: {d.noise})",
    )
    run = parser.add_argument_group("how to run")
    run.add_argument(
        "--out",
        metavar="DIR",
        help="run folder; must not exist unless --resume " "(default: runs/<data>-<model>-<YYYYmmdd-HHMMSS>)",
    )
    run.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint, with its settings"
    )
    run.add_argument(
        "--backend",
        choices=BACKENDS,
        help="fused Triton kernels, or the PyTorch reference path; auto: Triton on CUDA " f"(default: {d.backend})",
    )
    run.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (the fused ops stay whole, without graph breaks)",
    )
    run.add_argument(
        "--device",
        choices=DEVICES,
        help=f"auto: this process's GPU if there is one, else the CPU (default: {d.device})",
    )
    run.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        metavar="STEPS",
        help=f"write checkpoint.pt every this many steps, and at the end (default: {d.checkpoint_every})",
    )
    run.add_argument(
        "--log-every",
        type=_positive_int,
        metavar="STEPS",
        help="fetch the metrics from the device every this many steps (every step is still "
        f"logged) (default: {d.log_every})",
    )
    run.add_argument(
        "--eval-k",
        type=_positive_int,
        metavar="K",
        help=f"importance samples of the final held-out log-likelihood (default: {d.eval_k})",
    )
    run.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar or start line (the bar is off anyway when stderr is not a terminal)",
    )


def _run_train(args: argparse.Namespace) -> int:
    from fastvae.training import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {name: value for name, value in vars(args).items() if name in fields}
    train(TrainConfig(**given), explicit=given.keys())
    return 0


# --- fastvae eval and fastvae sample -----------------------------------------------------------


def _checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that eval and sample share: which checkpoint, and where to run it."""
    from fastvae.backend import BACKENDS
    from fastvae.training.distributed import DEVICES

    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a checkpoint.pt written by fastvae train, or its run folder"
    )
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="auto: the GPU if there is one, else the CPU (default: auto)"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="fused Triton kernels or the PyTorch reference path (default: auto)",
    )


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    _checkpoint_arguments(parser)
    parser.add_argument(
        "--k",
        type=_positive_int,
        default=1000,
        help="importance samples per image for the log-likelihood (default: 1000)",
    )
    # With the run's seed and batch size the noise is that of the evaluation at the end of training.
    parser.add_argument(
        "--batch-size", type=_positive_int, metavar="B", help="held-out images per batch (default: the run's)"
    )
    parser.add_argument(
        "--seed",
        type=_non_negative_int,
        help="seed of the noise (default: the run's, which with the default batch size and the same --k "
        "repeats the numbers printed at the end of training)",
    )


def _open_checkpoint(args: argparse.Namespace):
    from fastvae.training.checkpoint import load_checkpoint, model_from_checkpoint
    from fastvae.training.config import check_backend
    from fastvae.training.distributed import pick_device

    checkpoint, path = load_checkpoint(args.checkpoint)
    device = pick_device(args.device)
    backend = check_backend(args.backend, device)
    model, config = model_from_checkpoint(checkpoint, path, device, backend)
    return model, config, checkpoint, path


def _run_eval(args: argparse.Namespace) -> int:
    from fastvae.data import load_images
    from fastvae.training.builders import describe_model
    from fastvae.training.evaluate import evaluate
    from fastvae.training.seeds import eval_generator

    model, config, checkpoint, path = _open_checkpoint(args)
    data = load_images(config.data, num_images=config.num_images)
    device = next(model.parameters()).device
    seed = config.seed if args.seed is None else args.seed
    batch_size = args.batch_size or config.batch_size
    options = {"k": args.k}
    results = evaluate(model, data.test, batch_size=batch_size, generator=eval_generator(seed, device), **options)
    print(f"{path}: step {checkpoint['step']}, {describe_model(config, model)} on {data.name}")
    print(model.format_evaluation(results, n_images=len(data.test), **options))
    return 0


def _sample_arguments(parser: argparse.ArgumentParser) -> None:
    _checkpoint_arguments(parser)
    parser.add_argument("--n", type=_positive_int, default=64, help="how many samples (default: 64)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the samples (default: 0)")
    parser.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=1.0,
        help="scale the spread of the prior's draws (below 1: smoother, more typical samples) (default: 1)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="PNG file to write; must not exist (default: samples-<n>-seed<seed>[-t<temperature>].png in the "
        "checkpoint's folder)",
    )


def _run_sample(args: argparse.Namespace) -> int:
    import torch

    from fastvae.training.figures import save_image_grid

    model, _, _, path = _open_checkpoint(args)
    temperature = f"-t{args.temperature:g}" if args.temperature != 1.0 else ""
    out = args.out or os.path.join(os.path.dirname(path), f"samples-{args.n}-seed{args.seed}{temperature}.png")
    if os.path.exists(out):
        raise ConfigError(f"{out} already exists; choose another --out")
    if not os.path.isdir(os.path.dirname(out) or "."):
        raise ConfigError(f"the folder of {out} does not exist")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    samples = model.sample(args.n, temperature=args.temperature, generator=generator)
    save_image_grid(out, samples, math.ceil(math.sqrt(args.n)))
    print(f"wrote {args.n} samples to {out}")
    return 0


register("train", "train a VAE and write a run folder (metrics, checkpoint, figures)", _train_arguments, _run_train)
register("eval", "held-out ELBO and importance-sampled log-likelihood of a checkpoint", _eval_arguments, _run_eval)
register("sample", "write a grid of samples from a checkpoint", _sample_arguments, _run_sample)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastvae", description="Fast variational autoencoders: train, evaluate and sample.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, sub in SUBCOMMANDS.items():
        sub_parser = commands.add_parser(name, help=sub.help, description=sub.help[0].upper() + sub.help[1:] + ".")
        sub.add_arguments(sub_parser)
        sub_parser.set_defaults(run=sub.run)
    return parser


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    """Run ``fastvae`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    prefix = f"fastvae {args.command}"
    try:
        return args.run(args)
    except ConfigError as err:
        # The same error arises on every rank; one copy is enough.
        if _is_main_process():
            print(f"{prefix}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as err:
        if _is_main_process():
            print(f"{prefix}: error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except KeyboardInterrupt as err:
        print(f"{prefix}: {err or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
