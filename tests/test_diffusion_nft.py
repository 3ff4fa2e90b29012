"""algo=diffusion_nft: the loss and its gradient against hand computations, the old-policy schedule, θ_old really
being the sampling policy, no reward gradient, bad input refused up front, training on gmm, digits and the tiny SD3,
and exact resume (θ_old included)."""
import copy
import os

import pytest
import torch

from algorithms.diffusion_nft import DiffusionNFT, eta_schedule
from align.setup.assemble import build_trainer
from align.setup.compose import compose_config
from align.run import main as run_main
from align.core.run_dir import read_metrics
from helpers.crash_resume import crash_then_resume
from samplers import Trajectory, euler_integrate

GMM = ["algo=diffusion_nft", "model=gmm", "reward=linear", "train.batch_size=8", "train.progress=false",
       "eval.every=0", "eval.n_samples=16", "eval.final_samples=4"]


def _trainer(tmp_path, extra=(), name="run"):
    run_dir = str(tmp_path / name)
    return build_trainer(compose_config(GMM + list(extra), run_dir=run_dir), run_dir), run_dir


def _perturb(params, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


class _Recorder:
    """Wraps model.velocity: records (x, t, output) of each call; the output under grad keeps its gradient."""

    def __init__(self, model):
        self.calls, self.model, self.inner = [], model, model.velocity

    def __call__(self, x, t, cond=None):
        out = self.inner(x, t, cond)
        if out.requires_grad:
            out.retain_grad()
        self.calls.append((x.detach().clone(), t.detach().clone(), out))
        return out


def _loss_with_calls(trainer, monkeypatch, x1, r_raw):
    """The algorithm's loss on x_1 with these raw rewards (through prepare), and the recorded velocity calls."""
    algo = trainer.algo
    traj = Trajectory(xs=x1.unsqueeze(0), ts=algo.collect_ts[-1:], cond=None, prompts=[""] * len(x1),
                      reward_x1=r_raw)
    algo.prepare([traj], torch.Generator(), lambda x: x)
    rec = _Recorder(trainer.model)
    monkeypatch.setattr(trainer.model, "velocity", rec)
    loss, logs = algo.loss(traj, torch.Generator().manual_seed(3))
    monkeypatch.undo()
    return loss, logs, traj.extras["optimality"], rec.calls


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_loss_and_its_gradient_against_hand_computations(tmp_path, monkeypatch, beta):
    """Uniform weighting. Value: with Δ = v_θ − v_old and a = v_old − u (u = x_1 − ε), r‖v⁺ − u‖² + (1 − r)‖v⁻ − u‖²
    = ‖a‖² + β²‖Δ‖² + 2(2r − 1)β aᵀΔ (the expanded square, per element, then averaged). Gradient w.r.t. v_θ's
    output (autograd through the trainer's real loss): 2β[(2r − 1)a + βΔ] / (R·D) for R rows of D elements."""
    trainer, _ = _trainer(tmp_path, [f"algo.beta={beta}", "algo.weighting=uniform", "algo.n_times=3",
                                     "algo.normaliser=group_std", "algo.group_size=2"])
    algo = trainer.algo
    _perturb(trainer.model.trainable_parameters())            # θ ≠ θ_old (which is the start)
    x1 = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    r_raw = torch.tensor([0.0, 1.0, 5.0, 2.0])
    loss, logs, r, calls = _loss_with_calls(trainer, monkeypatch, x1, r_raw)
    (x_old, t_old, v_old), (x_th, t_th, v_theta) = calls
    assert torch.equal(x_old, x_th) and torch.equal(t_old, t_th) and not v_old.requires_grad
    # group_std: groups (0, 1) and (5, 2), each ±1 std → A = ±1/(1 + 1e-4), r = ½ ± ½·A/5
    assert torch.allclose(r, torch.tensor([0.4, 0.6, 0.6, 0.4]), atol=1e-4)
    rows = torch.arange(4).repeat_interleave(3)
    t = t_th.reshape(-1, 1)
    eps = (x_th - t * x1[rows]) / (1 - t)                      # the noise, recovered from x_t = t x_1 + (1 − t) ε
    u = x1[rows] - eps
    a, delta, rr = v_old - u, (v_theta - v_old).detach(), r[rows].reshape(-1, 1)
    value = (a.pow(2) + beta ** 2 * delta.pow(2) + 2 * (2 * rr - 1) * beta * a * delta).mean()
    assert torch.allclose(loss, value, rtol=1e-5, atol=1e-6)
    loss.backward()
    R, D = v_theta.shape
    expect = 2 * beta * ((2 * rr - 1) * a + beta * delta) / (R * D)
    assert torch.allclose(v_theta.grad, expect, rtol=1e-5, atol=1e-8)
    assert logs["old_deviation"] > 0


def test_adaptive_weighting_and_the_codes_scale_against_hand_computations(tmp_path, monkeypatch):
    """Adaptive: ℓ(v) = ‖x̂_1 − x_1‖²/D / sg(‖x̂_1 − x_1‖₁/D) with x̂_1 = x_t + (1 − t)v, which in velocity terms is
    (1 − t)·mean(e²)/mean|e| for e = v − u (computed here that way); ``loss_scale=code`` multiplies by adv_clip/β."""
    trainer, _ = _trainer(tmp_path, ["algo.beta=0.5", "algo.n_times=4", "algo.loss_scale=code"])
    _perturb(trainer.model.trainable_parameters())
    x1 = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    r_raw = torch.linspace(-1, 1, 8)
    loss, _, r, calls = _loss_with_calls(trainer, monkeypatch, x1, r_raw)
    (_, _, v_old), (x_t, t, v_theta) = calls
    rows = torch.arange(8).repeat_interleave(4)
    tt = t.reshape(-1, 1)
    u = x1[rows] - (x_t - tt * x1[rows]) / (1 - tt)
    vp, vn = 0.5 * v_old + 0.5 * v_theta.detach(), 1.5 * v_old - 0.5 * v_theta.detach()

    def ell(v):
        e = v - u
        return (1 - t) * e.pow(2).mean(1) / e.abs().mean(1)

    rr = r[rows]
    value = (rr * ell(vp) + (1 - rr) * ell(vn)).mean() * 5.0 / 0.5
    assert torch.allclose(loss, value, rtol=1e-4)


def test_the_soft_update_follows_the_schedule(tmp_path):
    """θ_old ← η_i θ_old + (1 − η_i) θ after each step taken, η_i = min(rate·max(i − flat, 0), η_max):
    rate 0.1, flat 1, max 0.25 gives η = 0, 0.1, 0.2, 0.25, 0.25 (by hand)."""
    assert [eta_schedule(i, 0.1, 0.25, 1) for i in range(1, 6)] == [0.0, 0.1, 0.2, 0.25, 0.25]
    assert [eta_schedule(i, 1e-3, 0.5, 0) for i in (1, 2, 500, 501, 10_000)] == [1e-3, 2e-3, 0.5, 0.5, 0.5]
    trainer, _ = _trainer(tmp_path, ["algo.eta_rate=0.1", "algo.eta_flat=1", "algo.eta_max=0.25", "train.lr=1e-2"])
    algo = trainer.algo
    for i, eta in enumerate([0.0, 0.1, 0.2, 0.25, 0.25], start=1):
        old = [b.clone() for b in algo.old_parameters()]
        trainer.update()
        theta = [p.detach() for p in trainer.model.trainable_parameters()]
        assert int(algo.steps_taken) == i
        for b, o, p in zip(algo.old_parameters(), old, theta):
            assert torch.allclose(b, eta * o + (1 - eta) * p, atol=1e-7)
    assert any((b - p).abs().max() > 1e-4 for b, p in zip(algo.old_parameters(), theta))


def test_the_old_policy_is_theta_old(tmp_path):
    """v_old is the model with θ_old (a copy of the model with those values loaded gives the same field), it
    differs from v_θ after a step with η > 0, and equals it bitwise with η = 0 (on-policy); θ is restored bitwise
    after each use; the rollout's samples are the Euler ODE of θ_old."""
    trainer, _ = _trainer(tmp_path, ["algo.eta_rate=1", "algo.eta_max=0.5", "train.lr=1e-2"])
    algo, model = trainer.algo, trainer.model
    trainer.update()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    t = torch.full((16,), 0.4)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, b in zip(twin.trainable_parameters(), algo.old_parameters()):
            p.copy_(b)
    theta = [p.detach().clone() for p in model.trainable_parameters()]
    with algo.old_policy():
        v_old = model.velocity(x, t)
    assert all(torch.equal(p, q) for p, q in zip(model.trainable_parameters(), theta))
    assert torch.equal(v_old, twin.velocity(x, t))
    assert (v_old - model.velocity(x, t)).abs().max() > 1e-4
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    traj = algo.rollout(x0, [""] * 8, None, torch.Generator())
    assert torch.equal(traj.x1, euler_integrate(lambda z, s: twin.velocity(z, s), x0, algo.collect_ts)[-1])

    on_policy, _ = _trainer(tmp_path, ["algo.eta_max=0", "train.lr=1e-2"], name="on")
    on_policy.update()
    with on_policy.algo.old_policy():
        v_old = on_policy.model.velocity(x, t)
    assert torch.equal(v_old, on_policy.model.velocity(x, t))


def test_no_reward_gradient_is_ever_requested(tmp_path, monkeypatch):
    """The reward only ever sees inputs without grad, the algorithm says so, and a black-box reward is accepted."""
    from rewards.analytic import LinearReward

    monkeypatch.setattr(LinearReward, "differentiable", False)     # built as a black box: nothing refuses it
    trainer, _ = _trainer(tmp_path, ["train.steps=2"])
    assert DiffusionNFT.uses_reward_gradient is False
    seen = []
    inner = trainer.reward.forward

    def spy(images, prompts=None):
        seen.append((images.requires_grad, torch.is_grad_enabled()))
        return inner(images, prompts)

    trainer.reward.forward = spy
    trainer.train()
    assert seen and not any(req for req, _ in seen)
    assert len(read_metrics(trainer.run_dir)) == 3


BAD = [
    (["algo.group_size=3"], ["algo.group_size=3 must divide the 8 rows of an update"]),
    (["algo.group_size=16", "train.grad_accum=8"], ["algo.group_size=16 must divide the 8 rows of an update"]),
    (["algo.group_size=1"], ["algo.group_size must be >= 2", "normaliser=fixed", "1"]),
    (["algo.beta=0"], ["algo.beta must be finite and > 0", "0"]),
    (["algo.eta_max=1.5"], ["algo.eta_max must be in [0, 1]", "1.5"]),
    (["algo.adv_clip=-1"], ["algo.adv_clip must be finite and > 0", "-1"]),
    (["algo.n_times=30", "sampler.steps=20"], ["algo.n_times=30", "20 steps"]),
    (["algo.collect_steps=5"], ["algo.collect_steps=5 needs algo.collect_grid=uniform"]),
    (["algo.normaliser=batch"], ["algo.normaliser", "batch", "global_std"]),
    (["algo.kl_coef=-0.1"], ["algo.kl_coef must be finite and >= 0"]),
]


@pytest.mark.parametrize("overrides,needles", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_is_refused_before_any_work(tmp_path, capsys, overrides, needles):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        run_main(["algo=diffusion_nft", "model=gmm", "reward=linear", "train.batch_size=8", *overrides,
                  f"run_dir={run_dir}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("align: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(n in err for n in needles), err
    assert not run_dir.exists()


def _two_steps(run_dir, overrides):
    trainer = build_trainer(compose_config(overrides, run_dir=run_dir), run_dir)
    before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    trainer.train()
    rows = read_metrics(run_dir)
    assert rows[-1]["step"] == 2 and "eval/reward" in rows[-1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows[1:])
    assert {"optimality_mean", "old_deviation", "eta", "policy_loss"} <= set(rows[1])
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(trainer.model.trainable_parameters(), before))
    assert moved > 0
    return trainer, rows


def test_trains_two_steps_on_gmm_and_digits(tmp_path):
    _two_steps(str(tmp_path / "gmm"), GMM + ["train.steps=2", "algo.kl_coef=1e-4"])
    _, rows = _two_steps(str(tmp_path / "digits"), [
        "algo=diffusion_nft", "model=digits", "train.steps=2", "train.batch_size=4", "algo.group_size=2",
        "sampler.steps=4", "train.progress=false", "eval.every=0", "eval.n_samples=8", "eval.group_size=2",
        "eval.final_samples=2"])
    assert "kl" not in rows[1]                              # kl_coef = 0: no base evaluation


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    from helpers.tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3")), t5=False)


def test_trains_two_steps_on_the_tiny_sd3(sd3_dir, tmp_path):
    from omegaconf import open_dict

    from helpers.tiny_sd3 import RESOLUTION, tiny_reward_registered

    run_dir = str(tmp_path / "run")
    overrides = ["algo=diffusion_nft", "model=sd3", "reward=aesthetic", f"model.pretrained={sd3_dir}",
                 "model.dtype=float32", f"model.resolution={RESOLUTION}", "model.decoder=vae", "model.t5=false",
                 "model.features.kind=pixels", "prompts=hpdv2", "sampler.steps=4", "train.steps=2",
                 "train.batch_size=2", "algo.group_size=2", "algo.kl_coef=1e-4", "train.progress=false",
                 "eval.every=0", "eval.n_samples=4", "eval.group_size=2", "eval.final_samples=2", "device=cpu"]
    with tiny_reward_registered() as name:
        cfg = compose_config(overrides, run_dir=run_dir)
        with open_dict(cfg):
            cfg.reward = {"name": name}
        trainer = build_trainer(cfg, run_dir)
        before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
        trainer.train()
    rows = read_metrics(run_dir)
    assert rows[-1]["step"] == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows[1:])
    assert "kl" in rows[1]
    assert sum((p.detach() - b).abs().sum().item()
               for p, b in zip(trainer.model.trainable_parameters(), before)) > 0
    # θ_old (LoRA values) moved with the soft update, and lives in the checkpoint
    state = torch.load(os.path.join(run_dir, "checkpoints", "step_0000002", "state.pt"), weights_only=False)
    old = [v for k, v in state["algo"].items() if k.startswith("theta_old_")]
    assert len(old) == len(trainer.model.trainable_parameters()) and int(state["algo"]["steps_taken"]) == 2


FAST = GMM + ["train.steps=6", "train.checkpoint_every=2", "eval.every=3", "eval.n_samples=32",
              "eval.final_samples=16", "algo.eta_rate=0.1"]


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(run_dir)]


def test_an_interrupted_and_resumed_run_is_exact(tmp_path, monkeypatch):
    """Rows, final samples and θ_old identical to an uninterrupted run (η_i = 0.1 i, so θ_old ≠ θ throughout)."""
    full = str(tmp_path / "full")
    build_trainer(compose_config(FAST, run_dir=full), full).train()
    part = str(tmp_path / "part")
    assert crash_then_resume(monkeypatch, FAST, part) == [2, 4]   # dies in update 5, after step 4's checkpoint
    assert _rows(part) == _rows(full)
    a, b = (torch.load(os.path.join(d, "samples_final.pt")) for d in (full, part))
    assert torch.equal(a["x1"], b["x1"])
    sa, sb = (torch.load(os.path.join(d, "checkpoints", "step_0000006", "state.pt"), weights_only=False)["algo"]
              for d in (full, part))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(k.startswith("theta_old_") for k in sa)
