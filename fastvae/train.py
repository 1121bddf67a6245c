"""Training and evaluating VAEs: the engine behind ``fastvae train``, ``fastvae eval`` and ``fastvae sample``.

:func:`train` runs one training job from a :class:`TrainConfig` and writes a run
folder (default ``runs/<data>-<model>-<YYYYmmdd-HHMMSS>``):

* ``metrics.jsonl``: one JSON line per optimizer step: ``step``, ``epoch``,
  ``loss``, ``recon``, ``kl`` (means over the global batch, nats per image),
  ``kl_weight``, ``lr`` and ``samples_per_s`` (global, averaged over the
  ``log_every`` steps it was measured on);
* ``checkpoint.pt``: model, optimizer, grad scaler, step, config and every
  rank's RNG state, written atomically (a temporary file, then a rename)
  every ``checkpoint_every`` steps and at the end;
* at the end: ``reconstructions.png`` (held-out images over their
  reconstructions), ``samples.png`` (decoded draws from the prior),
  ``interpolation.png`` (decodes along a line between two encoded held-out
  images, each row framed by the two originals), ``loss.png`` and ``eval.json``
  (held-out ELBO and importance-sampled log-likelihood, also printed).

Reproducibility: the data order is a permutation per epoch drawn from
``(seed, epoch)``; the model is initialised from ``seed`` on every rank; the
noise of rank ``r`` comes from torch's default generators seeded from
``(seed, r)``, so ranks draw different noise. ``noise="global"`` instead draws
the noise of the whole global batch from one generator seeded alike on every
rank, each rank taking its slice: results then do not depend on the number of
processes (at the cost of materialising ``eps``). ``resume=True`` restores the
model, optimizer, scaler and RNG states and the position in the data, so an
interrupted run resumed ends with the weights of one never interrupted.

Multi-process (``torchrun --nproc-per-node N -m fastvae train ...``): one
process per GPU (NCCL) or per CPU process (Gloo); ``batch_size`` is the global
batch, split evenly; gradients are averaged by DistributedDataParallel, the
logged metrics are averaged across ranks, and only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

from fastvae.backend import BACKENDS, resolve_backend
from fastvae.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_atomic,
    set_rng_state,
)
from fastvae.data import ImageData, load_images, to_unit_float
from fastvae.distributed import DEVICES, Distributed, start_distributed, stop_distributed
from fastvae.errors import ConfigError, NonFiniteLossError
from fastvae.evaluate import evaluate, format_eval, interpolation_grid, reconstruction_grid
from fastvae.models import LIKELIHOODS, VAE, conv_vae, kl_warmup_weight, mlp_vae

MODELS = ("mlp", "conv")
PRECISIONS = ("fp32", "bf16", "fp16")
NOISE_MODES = ("rank", "global")
RUNS_DIR = "runs"
FILES = {
    "metrics": "metrics.jsonl",
    "checkpoint": CHECKPOINT_FILE,
    "reconstructions": "reconstructions.png",
    "samples": "samples.png",
    "interpolation": "interpolation.png",
    "loss_curve": "loss.png",
    "eval": "eval.json",
}
# Independent random streams derived from the seed (see derived_seed).
_STREAM_NOISE, _STREAM_EPOCH, _STREAM_GLOBAL_NOISE, _STREAM_EVAL = range(4)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Everything a training run depends on; the ``fastvae train`` options map onto these fields one to one."""

    # What is trained. A resumed run keeps these (and the next group) from its checkpoint.
    data: str = "mnist"
    num_images: int | None = None
    model: str = "mlp"
    latent_dim: int = 16
    hidden: tuple[int, ...] | None = None
    likelihood: str = "bce"
    logvar_limit: float | None = 10.0  # 0 or None: no clamp
    # How it is trained.
    beta: float = 1.0
    kl_warmup: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    precision: str = "fp32"
    seed: int = 0
    noise: str = "rank"
    # How long: steps, when given, wins over epochs. A resumed run may extend either.
    epochs: int = 60
    steps: int | None = None
    # How it runs: free to change when resuming.
    out: str | None = None
    resume: bool = False
    backend: str = "auto"
    compile: bool = False
    device: str = "auto"
    checkpoint_every: int = 500
    log_every: int = 10
    eval_k: int = 1000
    quiet: bool = False

    def __post_init__(self):
        if self.hidden is not None:
            self.hidden = tuple(self.hidden)


MODEL_FIELDS = ("data", "num_images", "model", "latent_dim", "hidden", "likelihood", "logvar_limit")
FIXED_ON_RESUME = MODEL_FIELDS + ("beta", "kl_warmup", "batch_size", "lr", "precision", "seed", "noise")
LENGTH_FIELDS = ("epochs", "steps")


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``elbo`` and ``log_likelihood`` on rank 0 only)."""

    out_dir: str
    step: int
    model: VAE
    elbo: float | None
    log_likelihood: float | None


def derived_seed(seed: int, *stream: int) -> int:
    """A 63-bit seed for the random stream ``stream`` of a run seeded ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1, np.uint64)[0]) >> 1


# --- configuration -----------------------------------------------------------------------------


def validate_config(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` naming the option for a value no run could use."""

    def choose(name, choices):
        if getattr(config, name) not in choices:
            raise ConfigError(f"unknown {name} {getattr(config, name)!r}: choose one of {', '.join(choices)}")

    def at_least(name, low, allow_none=False):
        value = getattr(config, name)
        if value is None and allow_none:
            return
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer of at least {low}, got {value!r}")

    choose("model", MODELS)
    choose("likelihood", LIKELIHOODS)
    choose("precision", PRECISIONS)
    choose("backend", BACKENDS)
    choose("device", DEVICES)
    choose("noise", NOISE_MODES)
    for name in ("latent_dim", "batch_size", "epochs", "checkpoint_every", "log_every", "eval_k"):
        at_least(name, 1)
    at_least("steps", 1, allow_none=True)
    at_least("num_images", 2, allow_none=True)
    at_least("kl_warmup", 0)
    at_least("seed", 0)
    if config.hidden is not None and (not config.hidden or min(config.hidden) < 1):
        raise ConfigError(f"hidden must list positive sizes, got {config.hidden}")
    if not config.lr > 0 or not math.isfinite(config.lr):
        raise ConfigError(f"lr must be a positive number, got {config.lr}")
    if not config.beta >= 0 or not math.isfinite(config.beta):
        raise ConfigError(f"beta must be a non-negative number, got {config.beta}")
    if config.logvar_limit is not None and not config.logvar_limit >= 0:
        raise ConfigError(f"logvar_limit must be non-negative (0 turns the clamp off), got {config.logvar_limit}")
    if config.resume and not config.out:
        raise ConfigError("resume needs out: the folder of the run to continue")


def resumed_config(config: TrainConfig, saved: TrainConfig, explicit: Collection[str]) -> TrainConfig:
    """``config`` with the run-defining fields taken from the ``saved`` config of a checkpoint.

    A field in ``explicit`` (set by the user) that contradicts the checkpoint is an error.
    """
    merged = dataclasses.replace(config)
    for name in FIXED_ON_RESUME:
        saved_value = getattr(saved, name)
        if name not in explicit:
            setattr(merged, name, saved_value)
        elif getattr(config, name) != saved_value:
            raise ConfigError(
                f"the checkpoint in {config.out} was trained with {name}={saved_value!r}, not "
                f"{getattr(config, name)!r}; a resumed run keeps its settings (leave the option out)"
            )
    if not explicit & set(LENGTH_FIELDS):  # the run's own length, unless a new one is given
        for name in LENGTH_FIELDS:
            setattr(merged, name, getattr(saved, name))
    return merged


def check_backend(backend: str, device: torch.device) -> str:
    """The backend (``"triton"`` or ``"torch"``) that ``backend`` picks for float32 tensors on ``device``."""
    try:
        return resolve_backend(backend, device, {"images": torch.float32})
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"backend {backend!r} cannot run here: {err}") from None


def build_model(config: TrainConfig, image_shape: tuple[int, int, int], backend: str | None = None) -> VAE:
    """The VAE that ``config`` describes, for images of ``image_shape`` ``(C, H, W)``."""
    common = dict(
        latent_dim=config.latent_dim,
        likelihood=config.likelihood,
        beta=config.beta,
        logvar_limit=config.logvar_limit or None,
        backend=backend,
    )
    try:
        if config.model == "mlp":
            return mlp_vae(image_shape, **common, **({"hidden": config.hidden} if config.hidden else {}))
        channels, height, width = image_shape
        if height != width:
            raise ValueError(f"model 'conv' takes square images, got {height}x{width}; use model 'mlp'")
        return conv_vae(channels, height, widths=config.hidden, **common)
    except ValueError as err:
        raise ConfigError(f"cannot build model {config.model!r}: {err}") from None


# --- checkpoints and run folders ---------------------------------------------------------------


def model_from_checkpoint(
    checkpoint: dict, path: str, device: torch.device, backend: str | None = None
) -> tuple[VAE, TrainConfig]:
    """Rebuild the VAE that ``checkpoint`` (read from ``path``) was trained as, with its weights, on ``device``."""
    config = checkpoint_config(checkpoint)
    model = build_model(config, tuple(checkpoint["image_shape"]), backend)
    load_model_state(model, checkpoint["model"], path)
    return model.to(device).eval(), config


def checkpoint_config(checkpoint: dict) -> TrainConfig:
    """The config a checkpoint was trained with (fields this version does not know are dropped)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{name: value for name, value in checkpoint["config"].items() if name in known})


def new_run_dir(config: TrainConfig, data_name: str) -> str:
    """Create the run folder: ``config.out``, which must not exist, or a fresh ``runs/<data>-<model>-<time>``."""
    if config.out:
        if os.path.exists(config.out):
            raise ConfigError(
                f"{config.out} already exists; pass --resume to continue that run, or choose another --out"
            )
        os.makedirs(config.out)
        return config.out
    stem = os.path.join(RUNS_DIR, f"{data_name}-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    for attempt in range(1, 1000):
        path = stem if attempt == 1 else f"{stem}-{attempt}"
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"cannot find a free run folder name like {stem}; pass --out")


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop the lines logged after ``last_step`` (after the checkpoint a resumed run starts from)."""
    kept = [r for r in read_metrics(path) if r["step"] <= last_step]
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(temporary, path)


# --- the loop ----------------------------------------------------------------------------------


class ProgressBar:
    """A one-line progress bar on stderr: step, loss and samples/s. Silent when disabled."""

    WIDTH = 24

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.enabled = enabled

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        done = record["step"] / self.total
        bar = "#" * int(done * self.WIDTH)
        sys.stderr.write(
            f"\r[{bar:<{self.WIDTH}}] step {record['step']}/{self.total} loss {record['loss']:.2f} "
            f"(recon {record['recon']:.2f}, kl {record['kl']:.2f}) {record['samples_per_s']:,.0f} samples/s "
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


class MetricsLog:
    """Per-step metrics held on the device and written every few steps, so the GPU is not synced each step.

    :meth:`flush` averages them over ranks, checks that the loss is finite,
    appends them to ``metrics.jsonl`` (rank 0) and returns them.
    """

    def __init__(self, path: str | None, ctx: Distributed, local_batch: int):
        self.path = path
        self.ctx = ctx
        self.local_batch = local_batch
        self.pending: list[tuple[dict, torch.Tensor]] = []
        self.window_start = time.perf_counter()

    def add(self, info: dict, loss: torch.Tensor, recon: torch.Tensor, kl: torch.Tensor) -> None:
        self.pending.append((info, torch.stack([loss.detach(), recon.detach().mean(), kl.detach().mean()])))

    def flush(self, last_good: str) -> list[dict]:
        if not self.pending:
            return []
        values = self.ctx.mean(torch.stack([v for _, v in self.pending]).float()).tolist()
        now = time.perf_counter()
        rate = len(self.pending) * self.local_batch * self.ctx.world_size / max(now - self.window_start, 1e-9)
        self.window_start = now
        records = []
        for (info, _), (loss, recon, kl) in zip(self.pending, values):
            if not math.isfinite(loss):
                self._write(records)
                raise NonFiniteLossError(
                    f"the loss became {loss} at step {info['step']} (recon {recon}, kl {kl}); training stopped "
                    f"and {last_good}. Try a lower --lr, --precision fp32 or a smaller --logvar-limit"
                )
            records.append({**info, "loss": loss, "recon": recon, "kl": kl, "samples_per_s": rate})
        self.pending.clear()
        self._write(records)
        return records

    def _write(self, records: list[dict]) -> None:
        if self.path is not None and records:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)


def epoch_order(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    """The order of the ``n`` training images in ``epoch``: the same on every rank and after a resume."""
    generator = torch.Generator().manual_seed(derived_seed(seed, _STREAM_EPOCH, epoch))
    return torch.randperm(n, generator=generator).to(device)


def _log(config: TrainConfig, ctx: Distributed, message: str) -> None:
    if ctx.is_main and not config.quiet:
        print(message, file=sys.stderr, flush=True)


def train(config: TrainConfig, *, explicit: Collection[str] | None = None) -> TrainResult:
    """Train the VAE ``config`` describes; see the module docstring for what is written where.

    Args:
        config: the run's settings.
        explicit: the fields the user set (the command line passes them); on
            resume the others come from the checkpoint, and a set one that
            contradicts it is an error. ``None``: the fields that differ from
            :class:`TrainConfig`'s defaults.

    Raises:
        ConfigError: bad settings, data, output folder or checkpoint; nothing was written.
        NonFiniteLossError: the loss became NaN or infinite (the last checkpoint stays intact).
    """
    if explicit is None:
        default = TrainConfig()
        explicit = {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(default, f.name)}
    validate_config(config)
    ctx = start_distributed(config.device)
    try:
        return _train(config, set(explicit), ctx)
    finally:
        stop_distributed(ctx)


def _train(config: TrainConfig, explicit: set[str], ctx: Distributed) -> TrainResult:
    checkpoint = None
    if config.resume:
        checkpoint, _ = ctx.decide_on_main(lambda: load_checkpoint(config.out))
        config = resumed_config(config, checkpoint_config(checkpoint), explicit)
    data = load_images(config.data, num_images=config.num_images)
    run = _Run(config, ctx, data, checkpoint)
    try:
        run.train()
    except KeyboardInterrupt:
        run.progress.close()
        raise KeyboardInterrupt(
            f"interrupted at step {run.step + 1}; {run.last_good()}; "
            f"continue with: fastvae train --out {run.out_dir} --resume"
        ) from None
    elbo = log_likelihood = None
    if ctx.is_main:
        elbo, log_likelihood = _finish_run(run.model, data, config, run.paths, run.total_steps)
    ctx.barrier()
    return TrainResult(run.out_dir, run.total_steps, run.model, elbo, log_likelihood)


class _Run:
    """One training run's state: what :func:`train` sets up, steps through and checkpoints."""

    def __init__(self, config: TrainConfig, ctx: Distributed, data: ImageData, checkpoint: dict | None):
        self.config, self.ctx, self.data = config, ctx, data
        n_train = len(data.train)
        if config.batch_size > n_train:
            raise ConfigError(
                f"batch size {config.batch_size} is larger than the {n_train} training images of {config.data}; "
                "use a smaller --batch-size"
            )
        if config.batch_size % ctx.world_size:
            raise ConfigError(
                f"batch size {config.batch_size} (the global batch) must divide evenly among "
                f"{ctx.world_size} processes"
            )
        backend = check_backend(config.backend, ctx.device)
        self.steps_per_epoch = n_train // config.batch_size
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        self.saved_step = self.step = checkpoint["step"] if checkpoint else 0
        if self.step >= self.total_steps:
            raise ConfigError(
                f"the run in {config.out} is already at step {self.step} of {self.total_steps}; "
                "pass a larger --steps or --epochs to train further"
            )

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.model = build_model(config, data.image_shape, backend).to(ctx.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=config.precision == "fp16")
        self.autocast = torch.autocast(
            ctx.device.type, dtype=_AUTOCAST_DTYPES.get(config.precision), enabled=config.precision != "fp32"
        )
        self.noise_generator = None
        if config.noise == "global":
            self.noise_generator = torch.Generator(device=ctx.device)
            self.noise_generator.manual_seed(derived_seed(config.seed, _STREAM_GLOBAL_NOISE))
        torch.manual_seed(derived_seed(config.seed, _STREAM_NOISE, ctx.rank))  # each rank its own noise
        if checkpoint:
            self._restore(checkpoint)

        if config.resume:
            self.out_dir = config.out
            if ctx.is_main:
                truncate_metrics(os.path.join(self.out_dir, FILES["metrics"]), self.step)
        else:
            self.out_dir = ctx.decide_on_main(lambda: new_run_dir(config, data.name))
        self.paths = {key: os.path.join(self.out_dir, name) for key, name in FILES.items()}
        _log(
            config,
            ctx,
            f"training the {config.model} VAE on {data.name} ({n_train} images, {len(data.test)} held out) "
            f"for steps {self.step + 1}..{self.total_steps} on {ctx.device} x{ctx.world_size} "
            f"({config.precision}, backend {backend}); writing {self.out_dir}",
        )

        self.trained = self.model
        if ctx.world_size > 1:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.trained = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if config.compile:
            self.trained = torch.compile(self.trained)
        self.local_batch = config.batch_size // ctx.world_size
        self.metrics = MetricsLog(self.paths["metrics"] if ctx.is_main else None, ctx, self.local_batch)
        self.progress = ProgressBar(self.total_steps, enabled=ctx.is_main and not config.quiet and sys.stderr.isatty())
        self.train_images = data.train.to(ctx.device)
        self.order = None

    def _restore(self, checkpoint: dict) -> None:
        """Load a checkpoint's model, optimizer, scaler and this rank's RNG state."""
        load_model_state(self.model, checkpoint["model"], self.config.out)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        states = checkpoint["rng"]
        if len(states) == self.ctx.world_size:
            set_rng_state(states[self.ctx.rank], self.ctx.device, self.noise_generator)
        elif self.ctx.is_main:
            warnings.warn(
                f"the checkpoint was written by {len(states)} processes and this run has {self.ctx.world_size}: "
                "the noise after resuming differs from an uninterrupted run's",
                stacklevel=2,
            )

    def train(self) -> None:
        """Run the steps from the current one to the last, checkpointing on the way and at the end."""
        self.model.train()
        while self.step < self.total_steps:
            self._train_step()
            self.step += 1
            if self.step % self.config.checkpoint_every == 0 and self.step < self.total_steps:
                self.save()
            elif self.step % self.config.log_every == 0:
                self._flush_metrics()
        self.save()
        self.progress.close()

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's share of the current step's global batch: images, and the noise if drawn globally."""
        epoch, position = divmod(self.step, self.steps_per_epoch)
        if self.order is None or position == 0:
            self.order = epoch_order(self.config.seed, epoch, len(self.train_images), self.ctx.device)
        mine = slice(self.ctx.rank * self.local_batch, (self.ctx.rank + 1) * self.local_batch)
        global_batch = self.order[position * self.config.batch_size : (position + 1) * self.config.batch_size]
        x = to_unit_float(self.train_images[global_batch[mine]])
        if self.noise_generator is None:
            return x, None
        shape = (self.config.batch_size, self.config.latent_dim)
        return x, torch.randn(shape, generator=self.noise_generator, device=self.ctx.device)[mine]

    def _train_step(self) -> None:
        x, eps = self._batch()
        kl_weight = kl_warmup_weight(self.step, self.config.kl_warmup, self.config.beta)
        with self.autocast:
            # A tensor, not a float: torch.compile would recompile for every new warm-up weight.
            out = self.trained(x, eps=eps, kl_weight=torch.tensor(kl_weight))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        epoch = self.step // self.steps_per_epoch
        info = {"step": self.step + 1, "epoch": epoch, "kl_weight": kl_weight, "lr": self.config.lr}
        self.metrics.add(info, out.loss, out.recon, out.kl)

    def _flush_metrics(self) -> None:
        for record in self.metrics.flush(self.last_good()):
            self.progress.update(record)

    def last_good(self) -> str:
        if self.saved_step == 0:
            return "no checkpoint was written"
        return (
            f"the last checkpoint, {self.paths['checkpoint']} (step {self.saved_step}, written while the loss was "
            "finite), is intact"
        )

    def save(self) -> None:
        """Check the metrics and weights are finite, then write the checkpoint of the current step (rank 0)."""
        self._flush_metrics()
        if not torch.stack([p.isfinite().all() for p in self.model.parameters()]).all():
            raise NonFiniteLossError(
                f"the weights became NaN or infinite by step {self.step}; training stopped and {self.last_good()}"
            )
        states = self.ctx.gather(rng_state(self.ctx.device, self.noise_generator))
        if self.ctx.is_main:
            checkpoint = {
                "format": CHECKPOINT_FORMAT,
                "config": dataclasses.asdict(self.config),
                "image_shape": list(self.data.image_shape),
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": states,
            }
            save_atomic(checkpoint, self.paths["checkpoint"])
        self.saved_step = self.step


# --- evaluation and figures --------------------------------------------------------------------


def eval_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator of the noise used to evaluate and draw figures: independent of training's."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, _STREAM_EVAL))


def _finish_run(model: VAE, data: ImageData, config: TrainConfig, paths: dict, step: int) -> tuple[float, float]:
    """Evaluate on the held-out images, write the figures and eval.json, and print the results."""
    from fastvae.figures import save_image_grid, save_loss_curve

    device = next(model.parameters()).device
    generator = eval_generator(config.seed, device)
    elbo, log_likelihood = evaluate(
        model, data.test, k=config.eval_k, batch_size=config.batch_size, generator=generator
    )
    model.eval()
    held_out = to_unit_float(data.test[:16].to(device))
    ncols = min(8, len(held_out))
    save_image_grid(paths["reconstructions"], reconstruction_grid(model, held_out, ncols), ncols)
    save_image_grid(paths["samples"], model.sample(64, generator=generator), 8)
    interpolation_points = 10
    save_image_grid(
        paths["interpolation"], interpolation_grid(model, held_out, interpolation_points), interpolation_points + 2
    )
    save_loss_curve(paths["loss_curve"], read_metrics(paths["metrics"]))
    results = {
        "step": step,
        "held_out_images": len(data.test),
        "k": config.eval_k,
        "elbo": elbo,
        "log_likelihood": log_likelihood,
    }
    with open(paths["eval"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    print(format_eval(elbo, log_likelihood, config.eval_k, len(data.test)))
    print(f"run folder: {os.path.dirname(paths['checkpoint'])}")
    return elbo, log_likelihood
