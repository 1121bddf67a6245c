"""The training run: :func:`train` runs one job from a :class:`~fastvae.training.config.TrainConfig`.

It builds the model through :mod:`fastvae.training.builders` and speaks to it
only through :class:`~fastvae.models.base.TrainableModel`; it writes the run
folder described in :mod:`fastvae.training.rundir`, with the random streams of
:mod:`fastvae.training.seeds`.

Multi-process (``torchrun --nproc-per-node N -m fastvae train ...``): one
process per GPU (NCCL) or per CPU process (Gloo); ``batch_size`` is the global
batch, split evenly; gradients are averaged by DistributedDataParallel, the
logged metrics are averaged across ranks, and only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from collections.abc import Collection
from dataclasses import dataclass

import torch

from fastvae.data import ImageData, load_images, to_unit_float
from fastvae.errors import ConfigError, NonFiniteLossError
from fastvae.models import TrainableModel
from fastvae.training.builders import build_model, describe_model, evaluation_options, grad_clip
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
from fastvae.training.evaluate import evaluate, write_evaluation
from fastvae.training.figures import save_loss_curve, save_metric_plots, save_model_figures
from fastvae.training.metrics import MetricsLog, ProgressBar, read_metrics, truncate_metrics
from fastvae.training.rundir import FILES, new_run_dir
from fastvae.training.seeds import epoch_order, eval_generator, global_noise_generator, seed_rank_noise

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``evaluation`` on rank 0 only)."""

    out_dir: str
    step: int
    model: TrainableModel
    evaluation: dict[str, float] | None  # the held-out means of the model's metrics, as in eval.json


def _log(config: TrainConfig, ctx: Distributed, message: str) -> None:
    if ctx.is_main and not config.quiet:
        print(message, file=sys.stderr, flush=True)


def train(config: TrainConfig, *, explicit: Collection[str] | None = None) -> TrainResult:
    """Train the model ``config`` describes; see :mod:`fastvae.training.rundir` for what is written where.

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
    evaluation = None
    if ctx.is_main:
        evaluation = _finish_run(run.model, data, config, run.paths, run.total_steps)
    ctx.barrier()
    return TrainResult(run.out_dir, run.total_steps, run.model, evaluation)


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
        self.grad_clip = grad_clip(config, self.model)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=config.precision == "fp16")
        self.autocast = torch.autocast(
            ctx.device.type, dtype=_AUTOCAST_DTYPES.get(config.precision), enabled=config.precision != "fp32"
        )
        self.noise_generator = None
        if config.noise == "global":
            self.noise_generator = global_noise_generator(config.seed, ctx.device)
        seed_rank_noise(config.seed, ctx.rank)
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
            f"training the {describe_model(config, self.model)} on {data.name} ({n_train} images, {len(data.test)} held out) "
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

    def _batch(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's share of the current step's global batch: images, and forward's noise arguments if the
        noise is drawn for the global batch (none otherwise)."""
        epoch, position = divmod(self.step, self.steps_per_epoch)
        if self.order is None or position == 0:
            self.order = epoch_order(self.config.seed, epoch, len(self.train_images), self.ctx.device)
        mine = slice(self.ctx.rank * self.local_batch, (self.ctx.rank + 1) * self.local_batch)
        global_batch = self.order[position * self.config.batch_size : (position + 1) * self.config.batch_size]
        x = to_unit_float(self.train_images[global_batch[mine]])
        if self.noise_generator is None:
            return x, {}
        noise = self.model.noise_inputs(self.config.batch_size, generator=self.noise_generator, device=self.ctx.device)
        return x, {name: value[mine] for name, value in (noise or {}).items()}

    def _train_step(self) -> None:
        x, noise = self._batch()
        inputs = self.model.step_inputs(self.step)
        with self.autocast:
            out = self.trained(x, **noise, **inputs.forward)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        metrics = out.metrics
        if self.grad_clip is not None:
            # Every step is taken, with the gradient scaled down to the limit where it is above it (never
            # skipped: skipping steps above a threshold can stall a run for good). The norm before clipping is
            # logged; it stays on the device.
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            metrics = {**metrics, "grad_norm": norm}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        epoch = self.step // self.steps_per_epoch
        info = {"step": self.step + 1, "epoch": epoch, **inputs.log, "lr": self.config.lr}
        self.metrics.add(info, out.loss, metrics)

    def _flush_metrics(self) -> None:
        for record in self.metrics.flush(self.last_good()):
            self.progress.update(record, self.metrics.names)

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


def _finish_run(
    model: TrainableModel, data: ImageData, config: TrainConfig, paths: dict, step: int
) -> dict[str, float]:
    """Evaluate on the held-out images, write the figures and eval.json, and print the results."""
    generator = eval_generator(config.seed, next(model.parameters()).device)
    options = evaluation_options(config)
    results = evaluate(model, data.test, batch_size=config.batch_size, generator=generator, **options)
    save_model_figures(paths, model, data.test, generator)
    records = read_metrics(paths["metrics"])
    save_loss_curve(paths["loss_curve"], records)
    save_metric_plots(os.path.dirname(paths["checkpoint"]), model.metric_plots(), records)
    write_evaluation(paths["eval"], results, step=step, n_images=len(data.test), options=options)
    print(model.format_evaluation(results, n_images=len(data.test), **options))
    print(f"run folder: {os.path.dirname(paths['checkpoint'])}")
    return results
