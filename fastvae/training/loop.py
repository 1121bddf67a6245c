"""The training run: :func:`train` runs one job from a :class:`~fastvae.training.config.TrainConfig`.

It builds the model through :mod:`fastvae.training.builders` and speaks to it
only through :class:`~fastvae.models.base.TrainableModel`; it writes the run
folder described in :mod:`fastvae.training.rundir`, with the random streams of
:mod:`fastvae.training.seeds`.

Multi-process (``torchrun --nproc-per-node N -m fastvae train ...``): one
process per GPU (NCCL) or per CPU process (Gloo); ``batch_size`` is the global
batch, split evenly; gradients are averaged by DistributedDataParallel, the
logged metrics are averaged across ranks, and only rank 0 writes files.

Denoising (``config.denoise``): each training batch is corrupted with fresh
noise (:mod:`fastvae.corruption`, drawn as :mod:`fastvae.training.seeds`
describes) and the model is called as ``model(corrupted, target=clean, ...)``;
the model needs no other knowledge of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from fastvae.corruption import parse_corruption
from fastvae.data import ImageData, data_source, fingerprint, load_images, loading_message, to_unit_float
from fastvae.errors import ConfigError, NonFiniteLossError, RunError
from fastvae.models import TrainableModel
from fastvae.training.builders import (
    OBJECTIVES,
    build_model,
    check_options_apply,
    describe_model,
    evaluation_options,
    grad_clip,
)
from fastvae.training.checkpoint import (
    CHECKPOINT_FORMAT,
    check_checkpoint_data,
    load_model_state,
    rng_state,
    save_atomic,
    set_rng_state,
)
from fastvae.training.config import (
    TrainConfig,
    backend_from_environment,
    check_backend,
    check_cuda_graphs,
    checkpoint_config,
    resumed_config,
    validate_config,
)
from fastvae.training.cuda_graph import GraphedStep
from fastvae.training.distributed import Distributed, start_distributed, stop_distributed
from fastvae.training.evaluate import evaluate_held_out, format_held_out, write_evaluation
from fastvae.training.files import describe_os_error, interrupts_deferred
from fastvae.training.figures import MODEL_FIGURES, save_loss_curve, save_metric_plots, save_model_figures
from fastvae.training.metrics import MetricsLog, read_metrics, truncate_metrics
from fastvae.training.progress import Progress
from fastvae.training.rundir import (
    FILES,
    OPTIONAL_FILES,
    checkpoint_to_resume,
    missing_final_files,
    new_run_dir,
    remove_temporaries,
)
from fastvae.training.runlock import hold_run_folder, refuse_if_held
from fastvae.training.schedule import learning_rate
from fastvae.training.seeds import (
    corruption_generator,
    epoch_order,
    eval_generator,
    global_noise_generator,
    seed_rank_noise,
)
from fastvae.training.tensorboard_log import TensorBoardLog, require_tensorboard

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``evaluation`` on rank 0 only)."""

    out_dir: str
    step: int
    model: TrainableModel
    # The held-out means of the model's metrics, as in eval.json (a denoising run's corrupted-input ones in a dict
    # under "corrupted_inputs").
    evaluation: dict | None


def train(config: TrainConfig, *, explicit: Collection[str] | None = None) -> TrainResult:
    """Train the model ``config`` describes; see :mod:`fastvae.training.rundir` for what is written where.

    Args:
        config: the run's settings. ``backend`` not set explicitly takes the
            value of ``FASTVAE_BACKEND``; a data file's path is stored absolute.
        explicit: the fields the user set (the command line passes them); on
            resume the others come from the checkpoint (see
            :func:`~fastvae.training.config.resumed_config`). ``None``: the
            fields that differ from :class:`TrainConfig`'s defaults.

    A resumed run that already reached its last step but lacks its evaluation
    or figures (stopped while writing them) writes them and returns.

    The run folder is held (:mod:`fastvae.training.runlock`) from before its
    first write until this returns or raises: another command writing into it
    meanwhile is refused.

    Raises:
        ConfigError: bad settings, data, output folder or checkpoint, or an output folder that a live process
            holds; nothing was written.
        NonFiniteLossError: the loss became NaN or infinite (the last checkpoint stays intact).
        RunError: a file of the run could not be written, a full disk (the last checkpoint stays intact).
        KeyboardInterrupt: Ctrl-C, with a message saying what is intact and how to go on.
    """
    if explicit is None:
        default = TrainConfig()
        explicit = {f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(default, f.name)}
    explicit = set(explicit)
    backend = config.backend if "backend" in explicit else backend_from_environment()
    config = dataclasses.replace(config, backend=backend, data=data_source(config.data))
    validate_config(config)
    if config.out:
        refuse_if_held(config.out)  # before any work; the run takes the lock itself before its first write
    checkpoint, path, changes = None, None, []
    if config.resume:  # before the process group starts: the run's --device decides how it connects
        checkpoint, path = checkpoint_to_resume(config.out)
        config, changes = resumed_config(config, checkpoint_config(checkpoint, path), explicit)
    check_options_apply(config, explicit)
    check_cuda_graphs(config)
    if config.tensorboard:
        require_tensorboard()
    ctx = start_distributed(config.device)
    try:
        with contextlib.ExitStack() as folder_lock:  # rank 0 holds the run folder from its first write to the end
            return _train(config, ctx, checkpoint, path, changes, folder_lock)
    finally:
        stop_distributed(ctx)


def _train(
    config: TrainConfig,
    ctx: Distributed,
    checkpoint: dict | None,
    path: str | None,
    changes: list[str],
    folder_lock: contextlib.ExitStack,
) -> TrainResult:
    """Train; ``checkpoint``, read from ``path``, is the one a resumed run continues, with the ``changes`` it makes.
    The run folder's lock is entered into ``folder_lock``, which the caller releases when the run ends."""
    progress = Progress(quiet=config.quiet, is_main=ctx.is_main)
    message = loading_message(config.data, num_images=config.num_images)
    if message:
        progress.working(message)
    data = load_images(config.data, num_images=config.num_images, image_size=config.image_size, bar=progress.bar)
    if checkpoint is not None:
        ctx.decide_on_main(lambda: check_checkpoint_data(checkpoint, path, data, config.data))
    run = _Run(
        config, ctx, data, checkpoint, changes, progress, hold=lambda f: folder_lock.enter_context(hold_run_folder(f))
    )
    try:
        run.train()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted at step {run.step + 1}; {run.last_good()}{run.how_to_go_on()}") from None
    except OSError as err:  # a write that failed: metrics.jsonl on a full disk, say
        raise RunError(
            f"cannot write {err.filename or 'to ' + run.out_dir}: {describe_os_error(err)}; training stopped at "
            f"step {run.step} and {run.last_good()}"
        ) from None
    finally:
        run.close()
    evaluation = None
    if ctx.is_main:
        try:
            evaluation = _finish_run(
                run.model, data, config, run.paths, run.total_steps, run.metric_names(), progress, run.tensorboard
            )
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                f"interrupted while writing the evaluation and figures; {run.last_good()}; write them with: "
                f"fastvae train --out {run.out_dir} --resume"
            ) from None
        except OSError as err:
            raise RunError(
                f"cannot write {err.filename or 'the evaluation and figures'}: {describe_os_error(err)}; "
                f"{run.last_good()}; write them with: fastvae train --out {run.out_dir} --resume"
            ) from None
    ctx.barrier()
    return TrainResult(run.out_dir, run.total_steps, run.model, evaluation)


class _Run:
    """One training run's state: what :func:`train` sets up, steps through and checkpoints."""

    def __init__(
        self,
        config: TrainConfig,
        ctx: Distributed,
        data: ImageData,
        checkpoint: dict | None,
        changes: list[str],
        progress: Progress,
        hold: Callable[[str], None],
    ):
        """``hold(folder)`` takes the run folder's lock before anything in it is written (rank 0 only)."""
        self.config, self.ctx, self.data, self.progress = config, ctx, data, progress
        n_train = len(data.train)
        if config.batch_size > n_train:
            raise ConfigError(
                f"batch size {config.batch_size} is larger than the {n_train} training images of {config.data}; "
                "use a smaller --batch-size"
            )
        if config.cuda_graphs and ctx.world_size > 1:
            raise ConfigError("--cuda-graphs runs in one process: it does not capture DistributedDataParallel's steps")
        if config.batch_size % ctx.world_size:
            raise ConfigError(
                f"batch size {config.batch_size} (the global batch) must divide evenly among "
                f"{ctx.world_size} processes"
            )
        backend = check_backend(config.backend, ctx.device)
        self.steps_per_epoch = n_train // config.batch_size
        self.total_steps = config.steps or config.epochs * self.steps_per_epoch
        self.saved_step = self.step = checkpoint["step"] if checkpoint else 0
        missing = missing_final_files(config.out) if config.resume else []
        if self.step > self.total_steps or self.step == self.total_steps and not missing:
            raise ConfigError(
                f"the run in {config.out} is already at step {self.step} of {self.total_steps}; "
                "pass a larger --steps or --epochs to train further"
            )

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.model = build_model(config, data.image_shape, backend).to(ctx.device)
        self.optimizer = _optimizer(self.model, config, ctx.device)
        self.grad_clip = grad_clip(config, self.model)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=config.precision == "fp16")
        self.autocast = torch.autocast(
            ctx.device.type,
            dtype=_AUTOCAST_DTYPES.get(config.precision),
            enabled=config.precision != "fp32",
            cache_enabled=not config.cuda_graphs,  # a captured step must not reuse casts cached outside it
        )
        self.noise_generator = None
        if config.noise == "global":
            self.noise_generator = global_noise_generator(config.seed, ctx.device)
        seed_rank_noise(config.seed, ctx.rank)
        self.corruption = parse_corruption(config.denoise)
        self.corruption_generator = None
        if self.corruption is not None:
            rank = None if config.noise == "global" else ctx.rank
            self.corruption_generator = corruption_generator(config.seed, rank, ctx.device)
        if checkpoint:
            self._restore(checkpoint)
        self.fingerprint = fingerprint(data) if ctx.is_main else None

        took_over = False
        if config.resume:
            self.out_dir = config.out
        else:
            self.out_dir, took_over = ctx.decide_on_main(lambda: new_run_dir(config, data.name, hold))
        self.paths = {key: os.path.join(self.out_dir, name) for key, name in {**FILES, **OPTIONAL_FILES}.items()}
        if config.resume:
            ctx.decide_on_main(lambda: (hold(self.out_dir), self._tidy_run_dir()))
        if self.step == self.total_steps:
            progress.say(
                f"the run in {self.out_dir} is at its last step, {self.step}; writing the evaluation and figures it "
                f"lacks ({', '.join(missing)})"
            )
        else:
            progress.say(
                f"training the {describe_model(config, self.model)} on {data.name} ({n_train} images, "
                f"{len(data.test)} held out{'; ' + data.files.summary if data.files else ''}) for steps {self.step + 1}..{self.total_steps} on {ctx.device} "
                f"x{ctx.world_size} ({config.precision}, backend {backend}"
                + (f", inputs corrupted by {self.corruption}" if self.corruption else "")
                + f"); writing {self.out_dir}"
                + (" (taken over: it held no checkpoint)" if took_over else "")
                + (f"; resumed with {', '.join(changes)}" if changes else ""),
            )

        self.trained = self.model
        if ctx.world_size > 1:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.trained = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        if config.compile:
            self.trained = torch.compile(self.trained)
        self.graphed = GraphedStep(self._step, ctx.device) if config.cuda_graphs else None
        self.local_batch = config.batch_size // ctx.world_size
        self.metrics = MetricsLog(
            self.paths["metrics"] if ctx.is_main else None, ctx, self.local_batch, _nonfinite_advice(config)
        )
        self.tensorboard = None
        if config.tensorboard and ctx.is_main:
            self.tensorboard = TensorBoardLog(
                self.out_dir,
                resumed_from=self.step,
                held_out=data.test,
                image_every=config.tensorboard_image_every,
                seed=config.seed,
            )
        self.bar = None
        self.train_images = data.train.to(ctx.device)
        self.order = None

    def metric_names(self) -> tuple[str, ...]:
        """The names of the model's metrics in ``metrics.jsonl``: as this process logged them, or, for a run that
        took no step here (a finished run writing what it lacks), as the log's last line has them."""
        if self.metrics.names:
            return self.metrics.names
        records = read_metrics(self.paths["metrics"])[-1:]
        logged = {"step", "epoch", "loss", "lr", "samples_per_s", *self.model.step_inputs(self.step).log}
        return tuple(name for name in (records[0] if records else {}) if name not in logged)

    def _tidy_run_dir(self) -> None:
        """Before resuming: drop what a stopped run left behind (temporary files, metrics past its checkpoint)."""
        remove_temporaries(self.out_dir)
        truncate_metrics(self.paths["metrics"], self.step)

    def _restore(self, checkpoint: dict) -> None:
        """Load a checkpoint's model, optimizer, scaler and this rank's RNG state."""
        load_model_state(self.model, checkpoint["model"], self.config.out)
        states = checkpoint["rng"]
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            _learning_rate_on_device(self.optimizer, self.config, self.ctx.device)
            self.scaler.load_state_dict(checkpoint["scaler"])
            if len(states) == self.ctx.world_size:
                set_rng_state(
                    states[self.ctx.rank], self.ctx.device, self.noise_generator, self.corruption_generator
                )
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            detail = (str(err).splitlines() or [type(err).__name__])[0]
            raise ConfigError(
                f"the checkpoint in {self.config.out} does not fit this run: its optimizer, scaler or RNG state "
                f"cannot be restored ({detail})"
            ) from None
        if len(states) != self.ctx.world_size and self.ctx.is_main:
            warnings.warn(
                f"the checkpoint was written by {len(states)} processes and this run has {self.ctx.world_size}: "
                "the noise after resuming differs from an uninterrupted run's",
                stacklevel=2,
            )

    def train(self) -> None:
        """Run the steps from the current one to the last, checkpointing on the way and at the end."""
        self.model.train()
        if self.config.compile:
            self.progress.working("torch.compile: compiling the model in its first step (a minute or more)")
        self.bar = self.progress.training_bar(self.total_steps, self.step)
        while self.step < self.total_steps:
            self._train_step()
            self.step += 1
            if self.step % self.config.checkpoint_every == 0 and self.step < self.total_steps:
                self.save()
            elif self.step % self.config.log_every == 0:
                self._flush_metrics()
            if self.tensorboard is not None:
                self.tensorboard.after_step(self.model, self.step)
        if self.step > self.saved_step:
            self._after_training()
            self.save()
        self.bar.close()

    def close(self) -> None:
        """Close the progress bar and flush the TensorBoard log (after the run, or when it stops early)."""
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.flush()

    @torch.no_grad()
    def _after_training(self) -> None:
        """Show the model its training images once more (:meth:`TrainableModel.after_training`), in float32."""
        self.model.eval()
        batches = (to_unit_float(batch) for batch in self.train_images.split(self.config.batch_size))
        with torch.autocast(self.ctx.device.type, enabled=False):
            self.model.after_training(batches)
        self.model.train()

    def _batch(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's share of the current step's global batch: the model's input images, and forward's
        keyword arguments: ``target``, the clean images, when the inputs are corrupted; the noise if it is drawn
        for the global batch."""
        epoch, position = divmod(self.step, self.steps_per_epoch)
        if self.order is None or position == 0:
            self.order = epoch_order(self.config.seed, epoch, len(self.train_images), self.ctx.device)
        mine = slice(self.ctx.rank * self.local_batch, (self.ctx.rank + 1) * self.local_batch)
        global_batch = self.order[position * self.config.batch_size : (position + 1) * self.config.batch_size]
        x = to_unit_float(self.train_images[global_batch[mine]])
        arguments = {}
        if self.corruption is not None:
            x, arguments["target"] = self._corrupt(x, mine), x
        if self.noise_generator is not None:
            noise = self.model.noise_inputs(
                self.config.batch_size, generator=self.noise_generator, device=self.ctx.device
            )
            arguments.update({name: value[mine] for name, value in (noise or {}).items()})
        return x, arguments

    def _corrupt(self, x: torch.Tensor, mine: slice) -> torch.Tensor:
        """``x`` corrupted with fresh noise: this rank's own, or its slice of the global batch's (``noise="global"``)."""
        whole = self.config.noise == "global"
        noise = self.corruption.noise(
            self.config.batch_size if whole else len(x),
            tuple(x.shape[1:]),
            generator=self.corruption_generator,
            device=x.device,
        )
        return self.corruption.apply(x, noise[mine] if whole else noise)

    def _train_step(self) -> None:
        x, arguments = self._batch()
        inputs = self.model.step_inputs(self.step)
        lr = self._set_learning_rate()
        step_inputs = {"x": x, **arguments, **inputs.forward}
        values = self.graphed(step_inputs) if self.graphed is not None else self._step(**step_inputs)
        epoch = self.step // self.steps_per_epoch
        info = {"step": self.step + 1, "epoch": epoch, **inputs.log, "lr": lr}
        self.metrics.hold(info, values)

    def _step(self, x: torch.Tensor, **forward: torch.Tensor) -> torch.Tensor:
        """Forward, backward and optimizer step on a batch: the part a CUDA graph captures (no host read). Returns
        the step's logged values on the device (:meth:`MetricsLog.step_values`)."""
        with self.autocast:
            out = self.trained(x, **forward)
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
        return self.metrics.step_values(out.loss, metrics)

    def _set_learning_rate(self) -> float:
        """Give the optimizer the schedule's learning rate for the current step, and return it (written into the
        device tensor that a captured step reads, under ``--cuda-graphs``)."""
        lr = learning_rate(self.config.lr, self.config.lr_schedule, self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        return lr

    def _flush_metrics(self) -> None:
        records = self.metrics.flush(self.last_good())
        if self.tensorboard is not None:
            self.tensorboard.add_records(records)
        for record in records:
            self.bar.update(record, self.metrics.names)

    def last_good(self) -> str:
        """What of the run is intact, in words."""
        if self.saved_step == 0:
            return "no checkpoint was written"
        return (
            f"the last checkpoint, {self.paths['checkpoint']} (step {self.saved_step}, written while the loss was "
            "finite), is intact"
        )

    def how_to_go_on(self) -> str:
        """How to continue after an interruption, in words that follow :meth:`last_good`."""
        if self.saved_step == 0:
            return f"; to start again, run the same command (it takes over {self.out_dir})"
        return f"; continue with: fastvae train --out {self.out_dir} --resume"

    def save(self) -> None:
        """Check the metrics and weights are finite, then write the checkpoint of the current step (rank 0).

        Ctrl-C waits until the checkpoint is written and counted; a failed write
        (a full disk) is a :class:`RunError` that leaves the last checkpoint intact.
        """
        self._flush_metrics()
        if not torch.stack([p.isfinite().all() for p in self.model.parameters()]).all():
            raise NonFiniteLossError(
                f"the weights became NaN or infinite by step {self.step}; training stopped and {self.last_good()}"
            )
        states = self.ctx.gather(rng_state(self.ctx.device, self.noise_generator, self.corruption_generator))
        with interrupts_deferred():
            if self.ctx.is_main:
                self._write_checkpoint(states)
            self.saved_step = self.step

    def _write_checkpoint(self, states: list[dict]) -> None:
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "config": dataclasses.asdict(self.config),
            "image_shape": list(self.data.image_shape),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": states,
            "data": self.fingerprint,
        }
        try:
            save_atomic(checkpoint, self.paths["checkpoint"])
        except OSError as err:
            raise RunError(
                f"cannot write the checkpoint {self.paths['checkpoint']}: {describe_os_error(err)}; training "
                f"stopped at step {self.step} and {self.last_good()}"
            ) from None
        if self.tensorboard is not None:
            self.tensorboard.flush()


def _nonfinite_advice(config: TrainConfig) -> str:
    """What might keep this run's loss finite, in words: the options it uses that could change."""
    tries = ["a lower --lr"]
    if config.precision != "fp32":
        tries.append("--precision fp32")
    if "logvar_limit" not in OBJECTIVES[config.objective].unused_options:  # a model with a log-variance
        if config.logvar_limit:
            tries.append("a smaller --logvar-limit")
        else:  # the clamp is off: a smaller limit would be no clamp either
            tries.append(f"the log-variance clamp this run turned off (--logvar-limit {TrainConfig.logvar_limit:g})")
    return "Try " + (", ".join(tries[:-1]) + " or " + tries[-1] if len(tries) > 1 else tries[0])


def _optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam at ``config.lr``; under ``--cuda-graphs`` a fused, capturable one (step count and learning rate on the
    device, so that a captured step can be replayed with each step's rate)."""
    if not config.cuda_graphs:
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    lr = torch.tensor(config.lr, dtype=torch.float32, device=device)
    return torch.optim.Adam(model.parameters(), lr=lr, capturable=True, fused=True)


def _learning_rate_on_device(optimizer: torch.optim.Optimizer, config: TrainConfig, device: torch.device) -> None:
    """Under ``--cuda-graphs``, the learning rate of a restored optimizer as a float32 tensor on ``device`` (a
    checkpoint may hold it on another device); the schedule sets its value each step."""
    if config.cuda_graphs:
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def _finish_run(
    model: TrainableModel,
    data: ImageData,
    config: TrainConfig,
    paths: dict,
    step: int,
    metric_names: tuple[str, ...],
    progress: Progress,
    tensorboard: TensorBoardLog | None,
) -> dict:
    """Evaluate on the held-out images, write the figures, eval.json and the final TensorBoard entries, and print
    the results."""
    generator = eval_generator(config.seed, next(model.parameters()).device)
    options = evaluation_options(config)
    corruption = parse_corruption(config.denoise)
    n_images = len(data.test)
    results = evaluate_held_out(
        model,
        data.test,
        batch_size=config.batch_size,
        generator=generator,
        corruption=corruption,
        options=options,
        progress=progress.bars,
    )
    labels = data.subset("test").labels
    metric_plots = model.metric_plots()
    # loss.png draws the loss and the per-image metrics in the model's units; the figures the model asks for
    # draw the rest (a hierarchical VAE's KL per layer), and the gradient norm is in no unit of an image.
    in_plots = {name for panels in metric_plots.values() for panel in panels for name in panel.metrics}
    curve_names = tuple(name for name in metric_names if name not in in_plots and name != "grad_norm")
    with progress.bar(total=len(MODEL_FIGURES) + 1 + len(metric_plots), desc="figures", unit="file") as bar:
        save_model_figures(
            paths, model, data.test, generator, corruption=corruption, labels=labels, written=lambda key: bar.update()
        )
        records = read_metrics(paths["metrics"])
        save_loss_curve(paths["loss_curve"], records, curve_names, model.units)
        bar.update()
        save_metric_plots(os.path.dirname(paths["checkpoint"]), metric_plots, records)
        bar.update(len(metric_plots))
    write_evaluation(paths["eval"], results, step=step, n_images=n_images, options=options, corruption=corruption)
    if tensorboard is not None:
        tensorboard.add_images(model, step)
        tensorboard.add_evaluation(results, step)
        tensorboard.close()
    print(format_held_out(model, results, n_images=n_images, corruption=corruption, options=options))
    print(f"run folder: {os.path.dirname(paths['checkpoint'])}")
    return results
