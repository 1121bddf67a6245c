"""The training run: :func:`train` runs one job from a :class:`~fastvae.training.config.TrainConfig`.

It writes the run folder described in :mod:`fastvae.training.rundir`, with the
random streams of :mod:`fastvae.training.seeds`.

Multi-process (``torchrun --nproc-per-node N -m fastvae train ...``): one
process per GPU (NCCL) or per CPU process (Gloo); ``batch_size`` is the global
batch, split evenly; gradients are averaged by DistributedDataParallel, the
logged metrics are averaged across ranks, and only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Collection
from dataclasses import dataclass

import torch

from fastvae.data import ImageData, load_images, to_unit_float
from fastvae.errors import ConfigError, NonFiniteLossError
from fastvae.models import VAE, kl_warmup_weight
from fastvae.training.builders import build_model
from fastvae.training.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_atomic,
    set_rng_state,
)
from fastvae.training.config import TrainConfig, check_backend, checkpoint_config, resumed_config, validate_config
from fastvae.training.distributed import Distributed, start_distributed, stop_distributed
from fastvae.training.evaluate import evaluate, format_eval
from fastvae.training.figures import interpolation_grid, reconstruction_grid, save_image_grid, save_loss_curve
from fastvae.training.metrics import MetricsLog, ProgressBar, read_metrics, truncate_metrics
from fastvae.training.rundir import FILES, new_run_dir
from fastvae.training.seeds import _STREAM_GLOBAL_NOISE, _STREAM_NOISE, derived_seed, epoch_order, eval_generator

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``elbo`` and ``log_likelihood`` on rank 0 only)."""

    out_dir: str
    step: int
    model: VAE
    elbo: float | None
    log_likelihood: float | None


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


def _finish_run(model: VAE, data: ImageData, config: TrainConfig, paths: dict, step: int) -> tuple[float, float]:
    """Evaluate on the held-out images, write the figures and eval.json, and print the results."""
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
