"""The training engine speaks to models through TrainableModel only: a model it has never heard of trains too."""

import contextlib
import io
import json
import math
from types import SimpleNamespace

import pytest
import torch

from fastvae.cli import main
from fastvae.models import StepInputs, TrainableModel
from fastvae.training import builders
from fastvae.training.rundir import FILES


class Toy(TrainableModel):
    """A linear map trained on the squared error, with metrics, per-step inputs and noise of its own."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)
        self.net = torch.nn.Linear(math.prod(shape), math.prod(shape))
        self.noise_shapes = []

    def forward(self, x, *, scale, offset=None):
        x_hat = self.net(x.flatten(1)).view_as(x)
        if offset is not None:
            self.noise_shapes.append(tuple(offset.shape))
            x_hat = x_hat + offset
        error = (x_hat - x).square().flatten(1).sum(1)
        # loss.png plots recon and kl; the engine itself logs whatever the model reports.
        metrics = {"recon": error, "kl": torch.zeros_like(error), "half": error / 2}
        return SimpleNamespace(loss=scale * error.mean(), metrics=metrics)

    def step_inputs(self, step):
        return StepInputs({"scale": torch.tensor(1.0)}, {"temperature": step / 4})

    def noise_inputs(self, batch_size, *, generator, device):
        return {"offset": 0.0 * torch.randn((batch_size, *self.shape), generator=generator, device=device)}

    def evaluate(self, x, *, generator, k):
        return {"error": self(x, scale=torch.tensor(1.0)).metrics["recon"] * k}

    def format_evaluation(self, results, *, n_images, k):
        return f"toy error x{k}: {results['error']:.4f} over {n_images} images"

    def reconstruct(self, x):
        return self.net(x.flatten(1)).view_as(x)

    def sample(self, n, *, generator=None):
        return torch.rand((n, *self.shape), generator=generator, device=self.net.weight.device)

    def interpolate(self, a, b, points):
        t = torch.linspace(0, 1, points).view(1, points, *[1] * len(self.shape))
        return a[:, None] + t * (b - a)[:, None]


def test_a_model_unknown_to_the_engine_trains_logs_and_evaluates(tmp_path, monkeypatch):
    built = []

    def build_toy(config, image_shape, **common):
        built.append(Toy(image_shape))
        return built[-1]

    monkeypatch.setitem(builders.MODELS, "toy", build_toy)
    out, err = io.StringIO(), io.StringIO()
    argv = ["train", "--model", "toy", "--data", "digits", "--num-images", "100", "--batch-size", "10"]
    argv += ["--steps", "6", "--log-every", "4", "--eval-k", "3", "--noise", "global", "--out", str(tmp_path / "r")]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(argv) == 0
    assert err.getvalue().startswith("training the toy Toy on digits")
    assert built[0].noise_shapes == [(10, 1, 8, 8)] * 6  # the global batch's noise, this rank's slice
    records = [json.loads(line) for line in open(tmp_path / "r" / FILES["metrics"])]
    assert [list(r) for r in records] == [
        ["step", "epoch", "temperature", "lr", "loss", "recon", "kl", "half", "samples_per_s"]
    ] * 6
    assert [r["temperature"] for r in records] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    assert all(r["half"] == r["recon"] / 2 and r["loss"] == pytest.approx(r["recon"]) for r in records)
    results = json.load(open(tmp_path / "r" / FILES["eval"]))
    assert list(results) == ["step", "held_out_images", "k", "error"] and results["k"] == 3
    assert f"toy error x3: {results['error']:.4f} over 10 images" in out.getvalue()
    assert set(FILES.values()) <= {path.name for path in (tmp_path / "r").iterdir()}
