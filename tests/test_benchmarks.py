"""The benchmark suite's own machinery, run tiny on the CPU (the fused kernels through Triton's interpreter).

These check that every implementation and pass of the suite runs and is reported; they time nothing.
"""
import json
import math

import pytest
import torch

from benchmarks.__main__ import main as run_benchmarks
from benchmarks.noise import measure_noise
from benchmarks.ops import PASSES, loss_case, measure_case, reparameterize_case, vq_case
from benchmarks.report import check_targets, derive, markdown


@pytest.fixture
def tiny_cases():
    return [
        reparameterize_case(6, 40, torch.float32, eps_given=False),
        loss_case("gaussian", 3, (2, 5, 5), torch.bfloat16),
        vq_case(64, 40, 8, torch.float32),
    ]


def test_every_implementation_and_pass_runs(device, tiny_cases):
    torch._dynamo.reset()
    records = []
    for case in tiny_cases:
        records += measure_case(case, device, impls=("eager", "compile", "fastvae"), count_kernels=False)
    assert len(records) == len(tiny_cases) * 3 * len(PASSES)
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in records)
    derive(records, bandwidth_gbs=100.0)
    fused = [r for r in records if r["impl"] == "fastvae" and r["pass"] == "forward+backward"]
    assert all(r["speedup_vs_eager"] > 0 and r["speedup_vs_compile"] > 0 for r in fused)
    text = markdown({"device": "test"}, 100.0, records, check_targets(records), [])
    assert "reparameterize_kl (eps drawn)" in text and "gaussian (logvar per feature)" in text
    assert "vector_quantize (K=40, vs cdist)" in text


def test_floor_bytes_count_each_tensor_once():
    case = reparameterize_case(8, 16, torch.float32, eps_given=True)
    n = 8 * 16 * 4
    assert case.floor_bytes["forward"] == 4 * n + 8 * 4  # mu, logvar, eps -> z, per-row kl
    assert case.floor_bytes["backward"] == 6 * n  # grad_z, mu, logvar, eps -> grad_mu, grad_logvar
    drawn = reparameterize_case(8, 16, torch.bfloat16, eps_given=False)
    assert drawn.floor_bytes["forward+backward"] == 8 * (8 * 16 * 2) + 8 * 4


def test_targets_report_misses_with_their_gap():
    base = {"suite": "op", "op": "mse", "variant": "", "shape": [1 << 24], "elements": 1 << 24, "dtype": "float32",
            "pass": "forward+backward", "floor_bytes": 3 * 4 << 24}
    records = [dict(base, impl="eager", ms=4.0), dict(base, impl="compile", ms=2.0), dict(base, impl="fastvae", ms=1.6)]
    targets = {t["target"]: t for t in check_targets(derive(records, bandwidth_gbs=3000.0))}
    vs_compile = targets["mse forward+backward >= 1.4x faster than compile"]
    assert not vs_compile["met"] and "1.25x" in vs_compile["measured"] and "short by 1.12x" in vs_compile["measured"]
    assert targets["mse forward+backward >= 2.0x faster than eager"]["met"]


def test_noise_kernels_draw_normals(device):
    records = measure_noise(device, exponents=(12,))
    assert {r["impl"] for r in records} == {"tl.randn", "tl.randn4x", "torch.randn"}


def test_randn4x_benchmark_kernel_is_standard_normal(device):
    import triton

    from benchmarks.noise import BLOCK, _randn4x_kernel

    n = 10_000
    out = torch.full((n + 64,), float("nan"), device=device)
    _randn4x_kernel[(triton.cdiv(n, BLOCK),)](out, n, 1234, BLOCK=BLOCK)
    values = out[:n].double()
    assert torch.isnan(out[n:]).all()  # nothing written past n
    assert abs(values.mean()) < 0.05 and abs(values.std() - 1) < 0.05


def test_runner_smoke_mode_writes_results(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_benchmarks(["--ops", "reparameterize_kl,l1", "--dtypes", "float32", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert "smoke run" in payload["notes"][0]
    assert {r["op"] for r in payload["records"] if r["suite"] == "op"} == {"reparameterize_kl", "l1"}
    from benchmarks.train_step import MODELS

    assert {r["op"] for r in payload["records"] if r["suite"] == "train"} == set(MODELS)
    assert (tmp_path / "results.md").exists() and (tmp_path / "reparameterize_kl.png").exists()


def test_every_train_step_implementation_runs(device):
    from benchmarks.train_step import IMPLS, TrainCase, measure_train_case

    torch._dynamo.reset()
    records = measure_train_case(TrainCase("mlp", 8, "fp32"), device, impls=IMPLS)
    assert [r["impl"] for r in records] == list(IMPLS)
    assert all(r["samples_per_s"] > 0 and math.isfinite(r["ms"]) for r in records)


def test_launch_bound_implementations_without_a_gpu_are_recorded_as_skipped():
    """CUDA graphs (reduce-overhead, the captured fastvae step) need a GPU: the case says so and goes on."""
    from benchmarks.report import derive, markdown
    from benchmarks.train_step import LAUNCH_BOUND_IMPLS, TrainCase, measure_train_case

    case = TrainCase("mlp", 4, "fp32", "launch-bound")
    assert case.impls == LAUNCH_BOUND_IMPLS
    records = measure_train_case(case, torch.device("cpu"), impls=("eager", "compile reduce-overhead",
                                                                   "fastvae+cuda-graphs"))
    assert [r["impl"] for r in records] == ["eager", "compile reduce-overhead", "fastvae+cuda-graphs"]
    assert records[0]["ms"] > 0 and all("GPU" in r["skipped"] for r in records[1:])
    text = markdown({"device": "test"}, 100.0, derive(records, 100.0), [], [])
    assert "could not run" in text and "fastvae+cuda-graphs: CUDA graphs need a GPU" in text


# ---- the plan: order of importance, a time budget ---------------------------------------------------------------


def _items(estimates, fail_at=None):
    from benchmarks.plan import Item

    ran = []

    def run(i):
        if i == fail_at:
            raise RuntimeError("out of memory, say")
        ran.append(i)
        return [{"case": i}]

    return [Item("headline", f"case {i}", s, lambda i=i: run(i)) for i, s in enumerate(estimates)], ran


def test_budget_skips_what_does_not_fit_and_records_it():
    from benchmarks.plan import run_within

    items, ran = _items([1.0, 100.0, 1.0])
    records = run_within(items, budget_s=10.0, log=lambda *_: None)
    assert ran == [0, 2] and records == [{"case": 0}, {"case": 2}]
    assert [i.status for i in items] == ["done", "skipped", "done"]
    assert "budget" in items[1].detail and items[1].record()["status"] == "skipped"


def test_a_failing_case_is_recorded_and_the_run_goes_on():
    from benchmarks.plan import run_within

    items, ran = _items([1.0, 1.0, 1.0], fail_at=1)
    run_within(items, budget_s=None, log=lambda *_: None)
    assert ran == [0, 2] and items[1].status == "failed" and "out of memory" in items[1].detail


def test_plan_runs_headline_ratios_first_then_training_then_sweeps():
    from benchmarks.__main__ import build_plan, parse_args
    from benchmarks.plan import TIERS

    items = build_plan(parse_args([]), torch.device("cuda"), on_gpu=True)
    tiers = [i.tier for i in items]
    assert tiers == sorted(tiers, key=TIERS.index) and set(tiers) == set(TIERS)
    headline = [i.name for i in items if i.tier == "headline"]
    for op in ("reparameterize_kl (eps drawn)", "reparameterize_kl (eps given)", "mse", "bce", "gaussian", "l1",
               "reparameterize_kl (logvar_limit=10", "reparameterize_kl (feature maps, conditional prior)",
               "reparameterize_kl (feature maps, shared prior)", "discretized_logistic_mixture_nll"):
        for dtype in ("float32", "bfloat16"):
            assert any(n.startswith(op) and n.endswith(dtype) for n in headline), (op, dtype)
    assert all(i.estimate_s > 0 for i in items)
    launch_bound = [i.name for i in items if i.tier == "launch-bound target"]
    assert launch_bound == ["mlp step (launch-bound), batch 128, fp32", "mlp step (launch-bound), batch 128, bf16"]


def test_dry_run_prints_and_writes_the_plan(tmp_path, capsys):
    assert run_benchmarks(["--dry-run", "--budget-s", "300", "--out", str(tmp_path)]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())["plan"]
    assert {p["status"] for p in plan} == {"would run", "skipped"}
    assert "cases fit a budget of 300 s" in capsys.readouterr().out


def test_smoke_run_within_a_budget_records_the_skipped_cases(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["--ops", "l1", "--dtypes", "float32", "--skip", "train", "--budget-s", "21", "--out", str(tmp_path)]
    assert run_benchmarks(args) == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    statuses = [p["status"] for p in payload["plan"]]
    assert payload["complete"] and "skipped" in statuses
    assert "## Plan" in (tmp_path / "results.md").read_text()
@pytest.mark.parametrize("mode", [[], ["--static"], ["--dry-run"]])
def test_an_output_folder_that_cannot_be_written_fails_before_anything_runs(tmp_path, monkeypatch, capsys, mode):
    import benchmarks.__main__ as runner

    monkeypatch.setattr(runner, "run_within", lambda *a, **k: pytest.fail("ran a case into a folder it cannot write"))
    monkeypatch.setattr(runner, "main_static", lambda *a, **k: pytest.fail("ran the audit"))
    (tmp_path / "file").write_text("")
    for out, message in (
        ("/proc/results", "cannot create the folder /proc/results: No such file or directory"),
        (tmp_path / "file" / "r", f"cannot create the folder {tmp_path / 'file' / 'r'}: Not a directory"),
        ("/proc", "cannot write into /proc: No such file or directory"),  # it exists, but takes no file
    ):
        assert run_benchmarks([*mode, "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"python -m benchmarks: error: {message}\n"


def test_the_canonical_vae_baseline_runs_a_few_steps(capsys):
    """The baseline of fastvae train's defaults (README), at 5 steps and 2 importance samples."""
    from benchmarks.canonical_vae import main as canonical_vae

    elbo, log_likelihood = canonical_vae(["--steps", "5", "--k", "2", "--seed", "1"])
    out = capsys.readouterr().out
    assert "5 steps" in out and f"held-out ELBO: {elbo:.2f} nats/image (500 images)" in out
    assert f"(importance-sampled, k=2): {log_likelihood:.2f}" in out
    # Barely trained: far below the -112 of 2,100 steps, yet a finite bound, and the 2-sample bound is the tighter.
    assert -600 < elbo < -150 and elbo - 5 < log_likelihood < 0
