"""CUDA graphs: the in-kernel noise of ``reparameterize_kl`` with its Philox state drawn on the device.

Under the CPU interpreter: the kernels read the state from memory, two calls draw different noise, the backward
regenerates the forward's noise (every order of gradient matches the reference on that noise), and the eager path
is untouched (no extra launch). On a GPU (skipped without one): graph replays draw fresh noise, replay gradients
match eager ones on the same noise, and graph training reaches the eager run's loss.
"""
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastvae.functional import reparameterize_kl
from fastvae.ops import rng
from fastvae.ops.reparameterize_kl import reparameterize_kl_reference
from tests.utils import assert_close, gradients_up_to_third, no_host_sync, pick

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def states(monkeypatch):
    """Every Philox state drawn on the device, in order."""
    drawn = []
    original = rng.device_philox_state

    def recorded(generator, device):
        drawn.append(original(generator, device))
        return drawn[-1]

    monkeypatch.setattr("fastvae.ops.reparameterize_kl.device_philox_state", recorded)
    return drawn


def noise_of(state, shape, event_dims=1):
    from fastvae.kernels.reparameterize_kl import draw_noise

    return draw_noise(torch.Size(shape), state.device, 0, 0, event_dims, philox_state=state)


def inputs(shape, device):
    mu, logvar = torch.randn(shape, device=device), 0.5 * torch.randn(shape, device=device)
    return mu.requires_grad_(), logvar.requires_grad_()


def test_kernels_take_the_state_from_memory(device, states):
    from fastvae.kernels.reparameterize_kl import draw_noise

    shape = (pick(device, 3, 300), pick(device, 9, 257))
    zeros = torch.zeros(shape, device=device)
    with rng.philox_state_on_device():
        z, _ = reparameterize_kl(zeros, zeros, backend="triton")  # z = 0 + e^0 * eps = eps, exactly
    (state,) = states
    assert state.dtype == torch.int64 and state.shape == (2,) and state.device == zeros.device
    key, first_counter = state.tolist()  # the test reads the state; the op never does
    assert 0 <= key < rng.DEVICE_STATE_BOUND and 0 <= first_counter < rng.DEVICE_STATE_BOUND
    # The kernel read the values in memory: they give the noise that scalar arguments of the same values give.
    assert torch.equal(z, draw_noise(torch.Size(shape), device, key, first_counter))
    assert torch.equal(z, noise_of(state, shape))
    state[1] += 1  # other values in memory, other noise: the kernel reads them at launch
    assert torch.equal(noise_of(state, shape), draw_noise(torch.Size(shape), device, key, first_counter + 1))


def test_two_calls_draw_different_noise_and_manual_seed_repeats_them(device):
    shape = (4, pick(device, 6, 100))
    zeros = torch.zeros(shape, device=device)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        with rng.philox_state_on_device():
            runs.append([reparameterize_kl(zeros, zeros, backend="triton")[0] for _ in range(2)])
    (first, second), (again, _) = runs
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


@pytest.mark.parametrize("prior", [None, "conditional"])
def test_backward_regenerates_the_forwards_noise(device, states, prior):
    """Gradients of every order through the device-state path match the reference on the noise it drew."""
    shape = (3, 2, pick(device, 5, 300))
    mu, logvar = inputs(shape, device)
    prior_mu = torch.randn(shape, device=device, requires_grad=True) if prior else None
    weights = torch.randn(shape, device=device)
    wrt = [t for t in (mu, logvar, prior_mu) if t is not None]
    with rng.philox_state_on_device(), no_host_sync():
        z, kl = reparameterize_kl(mu, logvar, prior_mu=prior_mu, event_dims=2, backend="triton")
        loss = (z * weights).sum() + kl.sum()
        first = torch.autograd.grad(loss, wrt, retain_graph=True)  # a kept graph: a new gradient
        owned = torch.autograd.grad(loss, wrt, retain_graph=True)
    (state,) = states
    eps = noise_of(state, shape, event_dims=2)
    z_ref, kl_ref = reparameterize_kl_reference(mu, logvar, eps, prior_mu=prior_mu, event_dims=2)
    assert_close(z, z_ref)
    assert_close(kl, kl_ref)
    loss_ref = (z_ref * weights).sum() + kl_ref.sum()
    for got in (first, owned):
        for g, w in zip(got, torch.autograd.grad(loss_ref, wrt, retain_graph=True)):
            assert_close(g, w)
    directions = [torch.randn(t.shape, device=device) for t in wrt]
    got = gradients_up_to_third(loss, wrt, None, directions)  # create_graph: the noise drawn into a tensor
    want = gradients_up_to_third(loss_ref, wrt, None, directions)
    for got_order, want_order in zip(got, want):
        for g, w in zip(got_order, want_order):
            assert_close(g, w)


def top_level_calls(fn) -> list[str]:
    """The ops ``fn()`` calls at the top level (the fused op, and whatever is launched beside it), by the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fn()
    return [event.name for event in profile.events() if event.cpu_parent is None]


@pytest.fixture
def forward_launches(monkeypatch):
    """The ``philox_state`` argument of every launch of the forward kernel."""
    from fastvae.kernels import reparameterize_kl as kernels

    launches = []
    original = kernels.reparameterize_kl_forward

    def spy(*args, **kwargs):
        launches.append(kwargs.get("philox_state"))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "reparameterize_kl_forward", spy)
    return launches


def test_outside_capture_the_eager_path_launches_nothing_extra(device, forward_launches, monkeypatch):
    """Counted: outside capture the op is the one call (its kernel, and nothing beside it); the device path adds
    one ``randint`` (a tiny kernel on a GPU: 16 bytes written, and 16 read by each program of the op's kernels)."""
    # The host reads a CUDA generator's state without any ATen call; on the CPU a key would be drawn instead.
    monkeypatch.setattr("fastvae.ops.reparameterize_kl.philox_seed_offset", lambda generator, device, n: (7, 0))
    mu, logvar = inputs((4, pick(device, 6, 100)), device)
    reparameterize_kl(mu, logvar, backend="triton")  # the kernels compiled (on a GPU) before counting
    forward_launches.clear()
    eager = top_level_calls(lambda: reparameterize_kl(mu, logvar, backend="triton"))
    with rng.philox_state_on_device():
        device_state = top_level_calls(lambda: reparameterize_kl(mu, logvar, backend="triton"))
    assert eager == ["fastvae::reparameterize_kl"]
    assert device_state == ["aten::randint", "fastvae::reparameterize_kl"]
    assert len(forward_launches) == 2 and forward_launches[0] is None and forward_launches[1] is not None


def test_the_host_read_is_refused_under_capture(monkeypatch):
    """The host path itself refuses capture: a state read there would be frozen into the graph."""
    monkeypatch.setattr(rng, "_capturing", lambda device: True)
    with pytest.raises(RuntimeError, match="CUDA graph"):
        rng.philox_seed_offset(None, torch.device("cpu"), 1)
    assert rng.needs_device_state(torch.device("cpu"))


# ---- on a GPU -------------------------------------------------------------------------------------------------


def _capture(fn):
    """``fn()`` warmed up on a side stream, then captured; returns the graph and what the capture returned."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), rng.philox_state_on_device():
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@needs_cuda
def test_graph_replays_draw_fresh_noise_cuda(states):
    zeros = torch.zeros(256, 1000, device="cuda")
    graph, (z, _) = _capture(lambda: reparameterize_kl(zeros, zeros, backend="triton"))
    state = states[-1]  # the capture's: its memory is rewritten by every replay
    draws = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        draws.append(z.clone())
        assert torch.equal(z, noise_of(state, z.shape))
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    assert abs(draws[0].mean().item()) < 0.01 and abs(draws[0].std().item() - 1) < 0.01


@needs_cuda
def test_replay_gradients_match_eager_gradients_on_the_same_noise_cuda(states):
    shape = (512, 64)
    mu, logvar = inputs(shape, "cuda")
    weights = torch.randn(shape, device="cuda")

    def step():
        mu.grad = logvar.grad = None
        z, kl = reparameterize_kl(mu, logvar, logvar_limit=5.0, backend="triton")
        ((z * weights).sum() + kl.mean()).backward()
        return mu.grad, logvar.grad

    graph, (grad_mu, grad_logvar) = _capture(step)
    state = states[-1]
    for _ in range(2):
        graph.replay()
        eps = noise_of(state, shape)
        leaves = [t.detach().requires_grad_() for t in (mu, logvar)]
        z, kl = reparameterize_kl_reference(*leaves, eps, logvar_limit=5.0)
        want = torch.autograd.grad((z * weights).sum() + kl.mean(), leaves)
        assert_close(grad_mu, want[0])
        assert_close(grad_logvar, want[1])


@needs_cuda
def test_graph_training_reaches_the_eager_loss_cuda(tmp_path):
    """A few hundred steps of ``fastvae train --cuda-graphs`` end where the eager run ends."""
    from fastvae.training.config import TrainConfig
    from fastvae.training.loop import train
    from fastvae.training.metrics import read_metrics

    finals = {}
    for graphs in (False, True):
        out = tmp_path / f"graphs-{graphs}"
        config = TrainConfig(data="digits", model="mlp", latent_dim=8, hidden=(64,), batch_size=64, steps=300,
                             eval_k=2, out=str(out), quiet=True, device="cuda", cuda_graphs=graphs)
        train(config)
        records = read_metrics(str(out / "metrics.jsonl"))
        assert len(records) == 300
        finals[graphs] = sum(r["loss"] for r in records[-50:]) / 50
    assert abs(finals[True] - finals[False]) < 0.05 * abs(finals[False]), finals


# ---- fastvae train --cuda-graphs ----------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_train_option_without_cuda_is_a_one_line_error(tmp_path):
    from tests.test_cli import TINY, assert_one_line_error, run

    status, _, stderr = run("train", *TINY, "--steps", "2", "--cuda-graphs", "--out", tmp_path / "run")
    assert_one_line_error(status, stderr, "--cuda-graphs needs a CUDA GPU")
    assert not (tmp_path / "run").exists()


def test_cuda_graphs_is_kept_on_resume():
    from fastvae.training.config import FIXED_ON_RESUME

    assert "cuda_graphs" in FIXED_ON_RESUME


class _ReadAddresses(TorchDispatchMode):
    """Records, in order, the storages that the block's ops read and that no earlier op of the block wrote: what a
    captured CUDA graph reads from the addresses it was captured with (inputs, parameters, the learning rate)."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, int]] = []
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in self._seen:
                self.reads.append((str(func), t.untyped_storage().data_ptr()))
                self._seen.add(t.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel():
                self._seen.add(t.untyped_storage().data_ptr())
        return out


def _replay_by_rerunning(step):
    """A stand-in for :func:`capture_cuda_graph` on the CPU: each replay runs ``step()`` again and writes its values
    into the one tensor the capture returned (as a graph's replay rewrites its outputs); the capture runs nothing.

    A graph reads the memory it was captured reading, whatever Python later binds to the names: so every replay
    must read the same storages as the first (the capture's own). A step whose inputs were rebound to new tensors,
    rather than copied into the captured ones, reads other memory, and the replay fails here; on a GPU it would
    train on the captured batch forever."""
    values, captured = torch.empty(0), []

    def replay():
        with _ReadAddresses() as read:
            out = step()
        captured.append(captured[0] if captured else read.reads)
        assert read.reads == captured[0], "a replay read other memory than the capture: a rebound static input"
        values.resize_(out.shape).copy_(out)

    return replay, values


def test_graphed_step_feeds_each_steps_inputs_to_the_replays():
    """The trainer's side of a graphed step, on the CPU: warm-up calls, then replays that read each step's inputs
    from the static buffers and return a copy of their values; the training is the eager one, bit for bit."""
    from fastvae.models import mlp_vae
    from fastvae.training.cuda_graph import GraphedStep

    def trainer():
        torch.manual_seed(0)
        model = mlp_vae((1, 4, 4), latent_dim=2, hidden=(8,), backend="triton")
        optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))  # a tensor, as under graphs

        def step(x, eps, kl_weight):
            out = model(x, eps=eps, kl_weight=kl_weight)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            return torch.stack([out.loss.detach(), out.recon.mean(), out.kl.detach().mean()])

        return model, step

    batches = [{"x": torch.rand(6, 1, 4, 4).round(), "eps": torch.randn(6, 2), "kl_weight": torch.tensor(i / 8)}
               for i in range(8)]
    (eager_model, eager_step), (graphed_model, step) = trainer(), trainer()
    graphed = GraphedStep(step, torch.device("cpu"), warmup=2, capture=_replay_by_rerunning)
    for batch in batches:
        want = eager_step(**batch)
        got = graphed(batch)
        assert torch.equal(got, want)
    assert graphed.replay is not None and got.data_ptr() != graphed.values.data_ptr()  # a copy per step
    for p, q in zip(eager_model.parameters(), graphed_model.parameters()):
        assert torch.equal(p, q)


def test_graphed_training_copies_every_changing_input_into_the_captured_buffers(tmp_path, monkeypatch):
    """The trainer's side on the CPU, with every input of the step changing each step: the batch, its clean target
    (--denoise), the noise (--noise global), the KL weight (--kl-warmup) and the learning rate (--lr-schedule
    cosine, filled into the capturable optimizer's tensor). The replays read the captured memory (see
    :func:`_replay_by_rerunning`) and the run logs, step by step, what the eager run logs."""
    from fastvae.training import loop
    from fastvae.training.config import TrainConfig
    from fastvae.training.cuda_graph import GraphedStep
    from fastvae.training.metrics import read_metrics

    monkeypatch.setattr(loop, "check_cuda_graphs", lambda config: None)  # it needs a GPU; the stand-in does not
    monkeypatch.setattr(loop, "GraphedStep", functools.partial(GraphedStep, capture=_replay_by_rerunning))
    runs = {}
    for graphs in (False, True):
        config = TrainConfig(data="digits", num_images=120, model="mlp", latent_dim=3, hidden=(8,), batch_size=12,
                             steps=8, kl_warmup=6, lr_schedule="cosine", noise="global", denoise="mask:0.3", eval_k=2,
                             log_every=1, out=str(tmp_path / f"graphs-{graphs}"), quiet=True, device="cpu",
                             cuda_graphs=graphs)
        loop.train(config)
        runs[graphs] = read_metrics(config.out + "/metrics.jsonl")
    assert [r["step"] for r in runs[True]] == list(range(1, 9))
    for eager, graphed in zip(runs[False], runs[True]):
        assert graphed["lr"] == eager["lr"] and graphed["kl_weight"] == eager["kl_weight"]
        assert graphed["loss"] == pytest.approx(eager["loss"], rel=1e-6), (eager, graphed)
