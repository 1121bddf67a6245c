"""The ``fastvae`` command: ``fastvae train``, ``fastvae eval``, ``fastvae sample`` and ``fastvae encode``.

Each subcommand is registered in :data:`SUBCOMMANDS` with :func:`register`
(its name, a one-line help, a function adding its arguments and a function
running it), so later ones (a ``bench`` command) plug in the same way.

Bad input (an unknown option value, dataset or model, an unreadable file, a
run folder that exists, ...) ends with one line on stderr and exit status 2,
without a traceback and without writing anything; a run that cannot go on (a
loss that turns NaN or infinite, a file it cannot write, memory running out)
ends with status 1, an interrupt with 130. Warnings are one line too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastvae.errors import ConfigError, RunError

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


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


def _seed(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v < 2**64, "a seed from 0 to 2**64 - 1")


def _number(text: str, kind, valid, what: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


# --- fastvae train -----------------------------------------------------------------------------

_IMAGE_SIZE_HELP = (
    "a folder of images: resize each image's shorter side to S and crop its centre to S x S (needed where its "
    "images differ in size)"
)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from fastvae.backend import BACKENDS
    from fastvae.data import DATASETS
    from fastvae.corruption import CORRUPTIONS
    from fastvae.models import LIKELIHOODS
    from fastvae.training.builders import (
        DEFAULT_IWAE_K,
        MLP_HIDDEN,
        MODELS,
        OBJECTIVES,
        default_likelihood,
        describe_default_eval_k,
    )
    from fastvae.training.config import NOISE_MODES, PRECISIONS, TrainConfig
    from fastvae.training.distributed import DEVICES
    from fastvae.training.schedule import LR_SCHEDULES

    d = TrainConfig()
    # Options left out are left out of the namespace too (SUPPRESS): on --resume they come from the checkpoint.
    parser.argument_default = argparse.SUPPRESS
    what = parser.add_argument_group("what to train")
    what.add_argument(
        "--data",
        metavar="NAME|PATH",
        help=f"dataset: {', '.join(DATASETS)}, a .npy/.npz file of images, or a folder of PNG, JPEG, BMP, GIF or "
        f"WebP files (read recursively) (default: {d.data})",
    )
    what.add_argument("--image-size", type=_positive_int, metavar="S", help=_IMAGE_SIZE_HELP)
    what.add_argument(
        "--num-images",
        type=_positive_int,
        metavar="N",
        help="use the first N images (training and held-out together; for mnist, N/10 of each digit, one more of "
        "each of the first N%%10 digits; for a folder, a fixed random N of its files); for shapes, generate N "
        "(default: all; 20000 shapes)",
    )
    what.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="; ".join(f"{name}: {objective.description}" for name, objective in OBJECTIVES.items())
        + f" (default: {d.objective})",
    )
    what.add_argument(
        "--model",
        choices=MODELS,
        help="mlp: fully connected; conv: convolutional, for square images; hvae: a top-down hierarchical VAE "
        "(VDVAE/NVAE style) with stochastic layers on latent feature maps; vqvae: a VQ-VAE, discrete codes on a "
        f"latent map through the fused nearest-code search (default: {d.model})",
    )
    what.add_argument(
        "--latent-dim", type=_positive_int, metavar="D", help=f"size of the latent z (default: {d.latent_dim})"
    )
    what.add_argument(
        "--hidden",
        type=_positive_int,
        nargs="+",
        metavar="N",
        help=f"mlp: hidden layer sizes (default: {' '.join(map(str, MLP_HIDDEN))}); conv: channels of the stride-2 "
        "layers, one per halving of the image (default: from the image size); hvae: one number, the channels of "
        "the encoder's features and the decoder's state (default: 32)",
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
    # The VQ-VAE's (model vqvae only).
    what.add_argument(
        "--num-codes", type=_positive_int, metavar="K", help="vqvae: codes in the codebook (default: 512)"
    )
    what.add_argument("--code-dim", type=_positive_int, metavar="D", help="vqvae: values per code (default: 64)")
    what.add_argument(
        "--likelihood",
        choices=LIKELIHOODS,
        help="p(x|z): bce = Bernoulli on logits, gaussian = learned variance, mse = fixed variance, "
        "l1 = Laplace, dmol = discretized mixture of logistics; an autoencoder minimises its loss (mse: the "
        "squared error) (default: "
        + ", ".join(f"{default_likelihood(name)} for {name}" for name in OBJECTIVES)
        + ")",
    )
    dmol = LIKELIHOODS["dmol"].options
    what.add_argument(
        "--num-mixtures",
        type=_positive_int,
        metavar="M",
        help=f"dmol only: logistic components per pixel (default: {dmol['num_mixtures']})",
    )
    what.add_argument(
        "--num-bits",
        type=_positive_int,
        metavar="B",
        help=f"dmol only: bits per value, 1 to 16: 2**B levels (default: {dmol['num_bits']})",
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
        "--iwae-k",
        type=_positive_int,
        metavar="K",
        help=f"--objective iwae: importance samples per image of the bound it trains on (default: {DEFAULT_IWAE_K})",
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
        "--denoise",
        metavar="KIND:LEVEL",
        help="train to denoise: corrupt each training input with fresh noise and score the output against the "
        f"clean image; KIND is {' or '.join(CORRUPTIONS)}: gaussian:SIGMA adds N(0, SIGMA^2) noise clipped to "
        "[0, 1], mask:FRACTION zeroes that fraction of the pixels at random (default: no corruption)",
    )
    how.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="B",
        help=f"global batch size, split evenly among torchrun processes (default: {d.batch_size})",
    )
    how.add_argument("--epochs", type=_positive_int, help=f"passes over the training images (default: {d.epochs})")
    how.add_argument("--steps", type=_positive_int, help="optimizer steps in all; wins over --epochs")
    how.add_argument(
        "--lr", type=_positive_float, help=f"Adam learning rate, the peak of --lr-schedule (default: {d.lr:g})"
    )
    how.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help="constant: --lr throughout; cosine: from --lr down to 0 over the run's steps (a run resumed with "
        f"more --steps goes on along the cosine of its new length) (default: {d.lr_schedule})",
    )
    how.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32, or autocast to bf16, or to fp16 with a gradient scaler " f"(default: {d.precision})",
    )
    how.add_argument("--seed", type=_seed, help=f"seed of the weights, data order and noise (default: {d.seed})")
    how.add_argument(
        "--noise",
        choices=NOISE_MODES,
        help="rank: each process draws its own noise inside the fused op (and its own --denoise corruption); "
        "global: the global batch's noise (and corruption) from one generator, sliced per process, so results "
        f"do not depend on the number of processes (default: {d.noise})",
    )
    run = parser.add_argument_group(
        "how to run",
        "--resume keeps every option the run was started with. Of those, --data (a file that moved; its "
        "fingerprint must match), --backend, --compile, --device, --checkpoint-every, --log-every, --eval-k, "
        "--tensorboard, --tensorboard-image-every and the length (--steps, --epochs) may be set anew; the others may not change. --out and --quiet belong to each "
        "command.",
    )
    run.add_argument(
        "--out",
        metavar="DIR",
        help="run folder; must not exist, or hold only a run stopped before its first checkpoint, unless --resume "
        "(default: runs/<data>-<model>-<YYYYmmdd-HHMMSS>)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint, with its settings; a run at its last step writes the "
        "evaluation and figures it lacks",
    )
    run.add_argument(
        "--backend",
        choices=BACKENDS,
        help="fused Triton kernels, or the PyTorch reference path; auto: Triton on CUDA "
        f"(default: $FASTVAE_BACKEND, else {d.backend})",
    )
    run.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the model (the fused ops stay whole, without graph breaks) (default: off)",
    )
    run.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="run each training step (forward, backward, optimizer step) as a replayed CUDA graph, after 3 eager "
        "warm-up steps: no Python or launch overhead per kernel, for small, launch-bound models; a CUDA GPU only, "
        "not with --compile or --precision fp16; kept on resume (default: off)",
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
        help=f"importance samples of the final held-out log-likelihood of a VAE (default: {describe_default_eval_k()})",
    )
    run.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars or status lines (the bars are off anyway when stderr is not a terminal)",
    )
    run.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        help="also write TensorBoard event files into the run folder: every logged metric, lr, samples/s, image "
        'grids and the held-out results (needs the tensorboard package: pip install -e ".[tensorboard]") '
        "(default: off)",
    )
    run.add_argument(
        "--tensorboard-image-every",
        type=_positive_int,
        metavar="STEPS",
        help="with --tensorboard: log the sample and reconstruction grids every this many steps, and at the end "
        f"(default: {d.tensorboard_image_every})",
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
        help="fused Triton kernels or the PyTorch reference path (default: $FASTVAE_BACKEND, else auto)",
    )


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    from fastvae.training.builders import describe_default_eval_k

    _checkpoint_arguments(parser)
    parser.add_argument(
        "--k",
        type=_positive_int,
        help="a VAE's importance samples per image for the log-likelihood (default: the model's, as for "
        f"fastvae train --eval-k: {describe_default_eval_k()})",
    )
    parser.add_argument(
        "--denoise",
        metavar="KIND:LEVEL",
        help="also measure the model from inputs corrupted so (gaussian:SIGMA, mask:FRACTION), against the clean "
        "images (default: the run's --denoise, if any)",
    )
    # With the run's seed and batch size the noise is that of the evaluation at the end of training.
    parser.add_argument(
        "--batch-size", type=_positive_int, metavar="B", help="held-out images per batch (default: the run's)"
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        help="seed of the noise (default: the run's, which with the default batch size and the same --k "
        "repeats the numbers printed at the end of training)",
    )
    parser.add_argument(
        "--data",
        metavar="NAME|PATH",
        help="the run's data, where its file or folder has moved (it must match the checkpoint's fingerprint) "
        "(default: the run's)",
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


def _parse_corruption(spec: str | None):
    from fastvae.corruption import parse_corruption

    try:
        return parse_corruption(spec)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _run_eval(args: argparse.Namespace) -> int:
    from fastvae.data import load_images, loading_message
    from fastvae.training.builders import check_options_apply, default_eval_k, describe_model, evaluation_options
    from fastvae.training.checkpoint import check_checkpoint_data
    from fastvae.training.evaluate import evaluate_held_out, format_held_out
    from fastvae.training.progress import Progress
    from fastvae.training.seeds import eval_generator

    model, config, checkpoint, path = _open_checkpoint(args)
    check_options_apply(config, {"eval_k"} if args.k is not None else set(), {"eval_k": "--k"})
    corruption = _parse_corruption(args.denoise or config.denoise)
    # Status lines and the bar only for a person watching: eval's stderr is otherwise kept for errors.
    progress = Progress(quiet=not _watched())
    source = args.data or config.data
    message = loading_message(source, num_images=config.num_images)
    if message:
        progress.working(message)
    data = load_images(source, num_images=config.num_images, image_size=config.image_size, bar=progress.bar)
    check_checkpoint_data(checkpoint, path, data, source)
    device = next(model.parameters()).device
    seed = config.seed if args.seed is None else args.seed
    batch_size = args.batch_size or config.batch_size
    options = evaluation_options(dataclasses.replace(config, eval_k=args.k or default_eval_k(config.model)))
    results = evaluate_held_out(
        model,
        data.test,
        batch_size=batch_size,
        generator=eval_generator(seed, device),
        corruption=corruption,
        options=options,
        progress=progress.bars,
    )
    print(f"{path}: step {checkpoint['step']}, {describe_model(config, model)} on {data.name}")
    print(format_held_out(model, results, n_images=len(data.test), corruption=corruption, options=options))
    return 0


def _sample_arguments(parser: argparse.ArgumentParser) -> None:
    _checkpoint_arguments(parser)
    parser.add_argument("--n", type=_positive_int, default=64, help="how many samples (default: 64)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the samples (default: 0)")
    parser.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=1.0,
        help="scale the spread of the prior's draws (below 1: smoother, more typical samples) (default: 1)",
    )
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="image file to write, in the format its suffix names (.png, .jpg, .pdf, .svg, ...); must not exist "
        "(default: samples-<n>-seed<seed>[-t<temperature>].png in the checkpoint's folder)",
    )


def _run_sample(args: argparse.Namespace) -> int:
    import torch

    from fastvae.training.figures import image_format, save_image_grid
    from fastvae.training.files import write_new_file

    if args.out:
        image_format(args.out)  # refuse a format it cannot write before loading anything
    model, _, _, path = _open_checkpoint(args)
    temperature = f"-t{args.temperature:g}" if args.temperature != 1.0 else ""
    out = args.out or os.path.join(os.path.dirname(path), f"samples-{args.n}-seed{args.seed}{temperature}.png")
    with _new_output(out):
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(args.seed)
        samples = model.sample(args.n, temperature=args.temperature, generator=generator)
        write_new_file(out, lambda file: save_image_grid(file, samples, math.ceil(math.sqrt(args.n))))
    print(f"wrote {args.n} samples to {out}")
    note = model.sample_note()
    if note:
        print(f"note: {note}")
    return 0


@contextlib.contextmanager
def _new_output(path: str) -> Iterator[None]:
    """Check that ``path`` can be written as a new file, and hold its folder's lock for the block where that
    folder is a run folder (:mod:`fastvae.training.runlock`): a live run's folder is refused."""
    from fastvae.training.files import check_new_file
    from fastvae.training.runlock import hold_run_folder

    check_new_file(path)
    with hold_run_folder(os.path.dirname(path) or ".", create=False):
        yield


# --- fastvae encode ----------------------------------------------------------------------------


def _encode_arguments(parser: argparse.ArgumentParser) -> None:
    from fastvae.data import SPLITS

    _checkpoint_arguments(parser)
    parser.add_argument(
        "--data",
        metavar="NAME|PATH",
        help="the dataset to encode, of the run's image shape (default: the run's, with its --num-images)",
    )
    parser.add_argument(
        "--num-images",
        type=_positive_int,
        metavar="N",
        help="use the first N images of --data (default: all; without --data, the run's)",
    )
    parser.add_argument(
        "--image-size", type=_positive_int, metavar="S", help=_IMAGE_SIZE_HELP + " (default: the run's)"
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="all",
        help="train: the training images; test: the held-out ones; all: every image, in the dataset's order "
        "(default: all)",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, metavar="B", help="images encoded at once (default: the run's)"
    )
    parser.add_argument(
        "--out",
        metavar="FILE.npz",
        help="file to write; must not exist (default: latents-<data>-<split>.npz in the checkpoint's folder)",
    )


def _run_encode(args: argparse.Namespace) -> int:
    import numpy as np

    from fastvae.data import load_images
    from fastvae.training.checkpoint import save_atomic
    from fastvae.training.evaluate import batched_codes
    from fastvae.training.progress import Progress
    from fastvae.training.files import write_new_file

    model, config, checkpoint, path = _open_checkpoint(args)
    source = args.data or config.data
    num_images = args.num_images if args.data or args.num_images else config.num_images
    image_size = args.image_size or config.image_size
    data = load_images(source, num_images=num_images, image_size=image_size, bar=Progress(quiet=not _watched()).bar)
    out = args.out or os.path.join(os.path.dirname(path), f"latents-{data.name}-{args.split}.npz")
    if not out.endswith(".npz"):
        raise ConfigError(f"--out must name a .npz file, got {out}")
    trained_on = tuple(checkpoint["image_shape"])
    if data.image_shape != trained_on:
        shape = "x".join(map(str, data.image_shape))
        raise ConfigError(
            f"{data.name} holds {shape} images, but {path} was trained on {'x'.join(map(str, trained_on))} images"
        )
    with _new_output(out):
        subset = data.subset(args.split)
        codes = batched_codes(model, subset.images, args.batch_size or config.batch_size).cpu()
        codes = (codes.float() if codes.is_floating_point() else codes).numpy()  # a VQ-VAE's code maps stay integers
        arrays = {"codes": codes, "index": subset.index.numpy()}
        if subset.labels is not None:
            arrays["labels"] = subset.labels.numpy()
        if subset.factors is not None:
            arrays["factors"] = subset.factors.numpy()
            arrays["factor_names"] = np.array(data.factor_names)
        if data.files is not None:
            arrays["files"] = np.array([data.files.names[i] for i in subset.index.tolist()])
        write_new_file(out, lambda file: save_atomic(arrays, file, save=lambda values, f: np.savez(f, **values)))
    which = {"train": "the training images", "test": "the held-out images", "all": "all the images"}[args.split]
    print(f"wrote the codes {codes.shape} of {which} of {data.name} ({', '.join(arrays)}) to {out}")
    return 0


register(
    "train",
    "train a VAE, a VQ-VAE or an autoencoder and write a run folder (metrics, checkpoint, figures)",
    _train_arguments,
    _run_train,
)
register(
    "eval",
    "held-out evaluation of a checkpoint: a VAE's ELBO and importance-sampled log-likelihood, an autoencoder's "
    "reconstruction error",
    _eval_arguments,
    _run_eval,
)
register("sample", "write a grid of samples from a checkpoint", _sample_arguments, _run_sample)
register(
    "encode",
    "write the latent codes of a dataset (a VAE's posterior means; a VQ-VAE's integer code maps) with their labels "
    "to a .npz file",
    _encode_arguments,
    _run_encode,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastvae", description="Fast variational autoencoders: train, evaluate, sample and encode.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, sub in SUBCOMMANDS.items():
        sub_parser = commands.add_parser(name, help=sub.help, description=sub.help[0].upper() + sub.help[1:] + ".")
        sub.add_arguments(sub_parser)
        sub_parser.add_argument(
            "--threads",
            type=_positive_int,
            metavar="N",
            help="CPU threads of torch's ops and of reading a folder of images (torch.set_num_threads); on a busy "
            "machine fewer than the cores run faster (default: $OMP_NUM_THREADS, else one per core)",
        )
        sub_parser.set_defaults(run=sub.run)
    return parser


def _watched() -> bool:
    from fastvae.training.progress import interactive_stderr

    return interactive_stderr()


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that failed: Python's, CUDA's, or torch's CPU allocator's."""
    import torch

    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def main(argv: list[str] | None = None) -> int:
    """Run ``fastvae`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    prefix = f"fastvae {args.command}"
    with warnings.catch_warnings():
        # One line per warning, as for errors, rather than Python's two with a source line.
        warnings.showwarning = lambda message, *_, **__: print(f"{prefix}: warning: {message}", file=sys.stderr)
        return _run(args, prefix)


def _run(args: argparse.Namespace, prefix: str) -> int:
    # ConfigError and RunError arise alike on every rank of a torchrun job; one copy of the line is enough.
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.run(args)
    except ConfigError as err:
        if _is_main_process():
            print(f"{prefix}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RunError as err:
        if _is_main_process():
            print(f"{prefix}: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as err:
        if _is_main_process():
            print(f"{prefix}: {str(err) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (MemoryError, RuntimeError) as err:
        if not _is_out_of_memory(err):
            raise
        detail = _first_line(err).split("DefaultCPUAllocator: ")[-1]  # torch's CPU message starts with C++ details
        print(f"{prefix}: error: out of memory ({detail}); try smaller sizes", file=sys.stderr)
        return EXIT_FAILED
