"""``fastvae train --tensorboard``: the event files, read back with tensorboard's own readers."""

import glob
import os
import sys
from collections import Counter

import pytest
import torch

from fastvae.training import builders, loop
from fastvae.training.rundir import FILES
from tests.test_cli import TINY, assert_one_line_error, metrics, run, weights
from tests.test_training import Toy

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402


def accumulated(run_dir) -> EventAccumulator:
    """The run's events as TensorBoard shows them (every event file of the folder, purged steps dropped)."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalar_steps(events: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in events.Scalars(tag)]


def image_steps(events: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in events.Images(tag)]


def raw_steps(run_dir, tag: str) -> Counter:
    """How often each step of ``tag`` occurs in the event files themselves, before any purging."""
    steps = Counter()
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        for event in EventFileLoader(path).Load():
            if any(value.tag == tag for value in event.summary.value):
                steps[event.step] += 1
    return steps


def test_every_metric_the_model_reports_lr_rate_images_and_held_out_results(tmp_path, monkeypatch):
    """A model the engine does not know (metrics recon, kl and half; logged value temperature) gets every one."""
    monkeypatch.setitem(builders.MODELS, "toy", lambda config, image_shape, **common: Toy(image_shape))
    out = tmp_path / "r"
    status, _, stderr = run(
        "train", "--model", "toy", "--data", "digits", "--num-images", 100, "--batch-size", 10, "--steps", 7,
        "--log-every", 3, "--eval-k", 2, "--tensorboard", "--tensorboard-image-every", 3, "--out", out, "--quiet",
    )  # fmt: skip
    assert status == 0, stderr
    assert len(glob.glob(str(out / "events.out.tfevents.*"))) == 1
    events = accumulated(out)
    train_tags = ["loss", "recon", "kl", "half", "temperature", "lr", "samples_per_s"]
    assert sorted(events.Tags()["scalars"]) == sorted([f"train/{name}" for name in train_tags] + ["held_out/error"])
    records = metrics(out)
    for name in train_tags:
        logged = events.Scalars(f"train/{name}")
        assert [e.step for e in logged] == list(range(1, 8)), name
        assert [e.value for e in logged] == pytest.approx([r[name] for r in records], rel=1e-6), name
    assert sorted(events.Tags()["images"]) == ["images/reconstructions", "images/samples"]
    assert image_steps(events, "images/samples") == [3, 6, 7]  # every 3 steps, and at the end
    reconstructions = events.Images("images/reconstructions")
    assert [e.step for e in reconstructions] == [3, 6, 7]
    # The 10 held-out 8x8 digits, each row of them over its reconstructions: 20 tiles in rows of 8, each tile
    # enlarged to 32x32 with a 2-pixel border.
    assert (reconstructions[0].height, reconstructions[0].width) == (3 * 34 + 2, 8 * 34 + 2)
    (held_out,) = events.Scalars("held_out/error")
    assert held_out.step == 7 and held_out.value == pytest.approx(read_eval(out)["error"], rel=1e-6)


def read_eval(out) -> dict:
    import json

    with open(out / FILES["eval"]) as f:
        return json.load(f)


def test_a_resumed_run_appends_without_duplicate_steps_and_trains_the_same(tmp_path, monkeypatch):
    """Interrupted after logging steps past its checkpoint, then resumed: each step appears once in TensorBoard,
    and the weights are those of a run never interrupted (and never logged: TensorBoard draws no training noise)."""
    common = [*TINY, "--steps", 24, "--log-every", 5, "--checkpoint-every", 7, "--kl-warmup", 10, "--quiet"]
    logging = ["--tensorboard", "--tensorboard-image-every", 5]
    assert run("train", *common, "--out", tmp_path / "straight")[0] == 0

    original_step = loop._Run._train_step

    def interrupted_step(self):
        if self.step == 17:  # after the checkpoint at 14, metrics and images logged up to 15
            raise KeyboardInterrupt
        original_step(self)

    monkeypatch.setattr(loop._Run, "_train_step", interrupted_step)
    out = tmp_path / "resumed"
    assert run("train", *common, *logging, "--out", out)[0] == 130
    assert max(scalar_steps(accumulated(out), "train/loss")) == 15  # flushed when interrupted
    monkeypatch.setattr(loop._Run, "_train_step", original_step)
    status, _, stderr = run("train", "--out", out, "--resume", *logging, "--quiet")
    assert status == 0, stderr

    straight, resumed = weights(tmp_path / "straight"), weights(out)
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert len(glob.glob(str(out / "events.out.tfevents.*"))) == 2
    # The files hold steps 15 and image step 15 twice (logged, interrupted, logged again) ...
    assert raw_steps(out, "train/loss")[15] == 2 and raw_steps(out, "images/samples")[15] == 2
    # ... and TensorBoard, which drops the events a resumed run purges, sees every step once.
    events = accumulated(out)
    for tag in ("train/loss", "train/lr", "train/kl_weight", "train/recon"):
        assert scalar_steps(events, tag) == list(range(1, 25)), tag
    assert image_steps(events, "images/samples") == [5, 10, 15, 20, 24]
    assert scalar_steps(events, "held_out/elbo") == [24]
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs == pytest.approx([r["lr"] for r in metrics(tmp_path / "straight")], rel=1e-6)


def test_a_run_stopped_before_its_first_checkpoint_is_taken_over_with_its_events(tmp_path, monkeypatch):
    original_step = loop._Run._train_step

    def interrupted_step(self):
        if self.step == 4:
            raise KeyboardInterrupt
        original_step(self)

    monkeypatch.setattr(loop._Run, "_train_step", interrupted_step)
    out = tmp_path / "r"
    common = [*TINY, "--steps", 6, "--log-every", 2, "--tensorboard", "--out", out, "--quiet"]
    assert run("train", *common)[0] == 130
    assert len(glob.glob(str(out / "events.out.tfevents.*"))) == 1 and not (out / FILES["checkpoint"]).exists()
    monkeypatch.setattr(loop._Run, "_train_step", original_step)
    status, _, stderr = run("train", *common)
    assert status == 0, stderr
    assert len(glob.glob(str(out / "events.out.tfevents.*"))) == 1  # the stopped run's events were removed
    assert scalar_steps(accumulated(out), "train/loss") == list(range(1, 7))


def test_tensorboard_without_the_package_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import torch.utils.tensorboard fails
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.chdir(tmp_path)
    status, _, stderr = run("train", *TINY, "--steps", 2, "--tensorboard")
    assert_one_line_error(
        status, stderr, "needs the tensorboard package: pip install tensorboard", 'pip install -e ".[tensorboard]"'
    )
    assert os.listdir(tmp_path) == []
    assert run("train", *TINY, "--steps", 2, "--out", tmp_path / "r", "--quiet")[0] == 0  # fine without the flag
