"""algo=flow_grpo: its loss's gradient is the policy-gradient estimator, the clip and the KL act as they should, groups
are normalised, bad settings are refused up front, and it trains and resumes through the shared trainer."""
import math
import os

import pytest
import torch

from algorithms.flow_grpo import FlowGRPO, group_advantages, ppo_clipped_loss
from align.setup.assemble import build_trainer
from align.setup.compose import compose_config
from align.models.gmm import GaussianMixtureFlow
from align.core.run_dir import read_metrics
from align.setup.overrides import ConfigProblem
from helpers.crash_resume import crash_then_resume
from rewards.analytic import LinearReward
from samplers import uniform_grid

A = 0.7


def _setup(**cfg):
    torch.manual_seed(0)
    model = GaussianMixtureFlow(weights=[0.5, 0.5], means=[[-1.5, 0.0], [1.5, 0.0]],
                                covs=[[[0.25, 0.0], [0.0, 0.25]]] * 2, hidden=16, depth=2)
    with torch.no_grad():                       # a residual that is not zero, so every parameter has a gradient
        model.residual.out.weight.normal_(0.0, 0.3)
        model.residual.out.bias.normal_(0.0, 0.3)
    reward = LinearReward([1.0, 0.5])
    algo = FlowGRPO({"lr": 1e-3, "train_steps": 5, "group_size": 4, "beta": 0.0, **cfg}, model, reward,
                    uniform_grid(20))
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    traj = algo.rollout(x0, [""] * 8, None, torch.Generator().manual_seed(2))
    return model, reward, algo, traj


def _hand_log_p(model, xs, ts, k, reduce):
    """log p_θ(x_{k+1} | x_k) [B], written out: μ = x + Δt (v + g²/(2(1−t)) (t v − x)), g = a √((1−t)/t), t_0 → t_1."""
    t, dt = float(ts[k]), float(ts[k + 1] - ts[k])
    g2 = A * A * (1 - t) / (float(ts[k + 1]) if t == 0 else t)
    x, y = xs[k], xs[k + 1]
    v = model.velocity(x, torch.full((len(x),), t))
    mu = x + dt * (v + g2 / (2 * (1 - t)) * (t * v - x))
    var = g2 * dt
    lp = -(y - mu) ** 2 / (2 * var) - 0.5 * math.log(2 * math.pi * var)
    return lp.mean(1) if reduce == "mean" else lp.sum(1)


def _hand_advantages(r, G=4):
    out = []
    for grp in r.reshape(-1, G):
        m, s = grp.mean(), ((grp - grp.mean()) ** 2).mean().sqrt()
        out.append(((grp - m) / (s + 1e-4)).clamp(-5, 5))
    return torch.cat(out)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_on_policy_gradient_is_the_policy_gradient_estimator(reduce):
    model, reward, algo, traj = _setup(reduce=reduce)
    params = model.trainable_parameters()
    loss, logs = algo.loss(traj, torch.Generator().manual_seed(3))
    assert logs["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and logs["clip_frac"] == 0.0
    got = torch.autograd.grad(loss, params)
    # −(1/(B·N)) Σ_i A_i Σ_k ∇ log p_θ(path_i), A from the rewards of x_N by hand (ratio 1 on-policy)
    adv = _hand_advantages(reward(traj.xs[-1]))
    N = traj.n_steps
    surrogate = -sum((adv * _hand_log_p(model, traj.xs, traj.ts, k, reduce)).sum() for k in range(N)) / (8 * N)
    want = torch.autograd.grad(surrogate, params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)     # fp32 MLP; the two differ in summation order only


def test_clipped_rows_give_no_gradient_once_theta_moved():
    model, reward, algo, traj = _setup(clip_range=0.02, reduce="sum")
    with torch.no_grad():                                    # θ moves after the rollout: ρ ≠ 1
        model.residual.out.weight.add_(torch.randn_like(model.residual.out.weight), alpha=0.2)
    params = model.trainable_parameters()
    loss, logs = algo.loss(traj, torch.Generator().manual_seed(3))
    got = torch.autograd.grad(loss, params)
    adv = _hand_advantages(reward(traj.xs[-1]))
    N, rows, n_clipped = traj.n_steps, [], 0
    for k in range(N):
        lp = _hand_log_p(model, traj.xs, traj.ts, k, "sum")
        ratio = torch.exp(lp - traj.extras["log_probs"][k])
        # the clipped branch is the max (flat in θ) when A > 0 and ρ > 1 + ε, or A < 0 and ρ < 1 − ε
        clipped = ((adv > 0) & (ratio > 1.02)) | ((adv < 0) & (ratio < 0.98))
        n_clipped += int(clipped.sum())
        rows.append((-adv * ratio * (~clipped)).sum())
    assert 0 < n_clipped < 8 * N and 0 < logs["clip_frac"] < 1
    want = torch.autograd.grad(sum(rows) / (8 * N), params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)


def test_ppo_clip_gradient_signs():
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -1.0])
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.0, 1.0], requires_grad=True)
    ppo_clipped_loss(adv, ratio, 0.2).sum().backward()
    # A > 0: clipped above 1 + ε (no gradient), not below; A < 0: clipped below 1 − ε, not above
    assert ratio.grad.tolist() == [0.0, -1.0, 1.0, 0.0, -1.0, 1.0]


def test_group_normalisation_and_baselines():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    adv = group_advantages(r, 4, normalize_std=True, eps=0.0)
    s1, s2 = math.sqrt((4 + 1 + 0 + 9) / 4), math.sqrt((1 + 1 + 1 + 9) / 4)
    want = [(-2) / s1, (-1) / s1, 0.0, 3 / s1, -1 / s2, -1 / s2, -1 / s2, 3 / s2]
    assert torch.allclose(adv, torch.tensor(want), atol=1e-6)
    assert torch.allclose(group_advantages(r, 4, normalize_std=False), torch.tensor([-2., -1, 0, 3, -1, -1, -1, 3]))
    loo = [r[i] - torch.cat([r[(i // 4) * 4:i], r[i + 1:(i // 4 + 1) * 4]]).mean() for i in range(8)]
    assert torch.allclose(group_advantages(r, 4, False, "leave_one_out"), torch.stack(loo), atol=1e-6)
    # one std for the whole update (std_over=batch)
    assert torch.allclose(group_advantages(r, 4, True, std=torch.tensor(2.0), eps=0.0),
                          torch.tensor([-2., -1, 0, 3, -1, -1, -1, 3]) / 2)


def test_kl_gradient_vanishes_at_the_base_and_not_elsewhere():
    model, reward, algo, traj = _setup(beta=1.0)
    traj.extras["advantages"] = torch.zeros(8)                 # the KL term alone
    with torch.no_grad():
        model.residual.out.weight.zero_()
        model.residual.out.bias.zero_()                        # v_θ = v_base exactly
    params = model.trainable_parameters()
    loss, logs = algo.loss(traj, torch.Generator())
    assert logs["kl"] == 0.0
    assert all(g.abs().max() == 0 for g in torch.autograd.grad(loss, params))
    with torch.no_grad():
        model.residual.out.bias.fill_(0.1)
    loss, logs = algo.loss(traj, torch.Generator())
    assert logs["kl"] > 0 and torch.autograd.grad(loss, params)[-1].abs().max() > 0


GMM = ["model=gmm", "reward=linear", "algo=flow_grpo", "train.batch_size=8"]
BAD = [
    (["algo.group_size=3"], "algo.group_size=3 must divide the update's 8 rows (train.batch_size, per process)"),
    (["algo.group_size=16", "train.grad_accum=4"], "algo.group_size=16 must divide the update's 8 rows"),
    (["algo.group_size=1"], "algo.group_size must be >= 2"),
    (["algo.noise_level=0"], "algo.noise_level must be finite and > 0"),
    (["algo.noise_level=-0.7"], "algo.noise_level must be finite and > 0"),
    (["algo.timestep_fraction=0"], "algo.timestep_fraction must be in (0, 1]"),
    (["algo.timestep_fraction=1.5"], "algo.timestep_fraction must be in (0, 1]"),
    (["algo.beta=-1"], "algo.beta must be finite and >= 0"),
    (["algo.clip_range=0"], "algo.clip_range must be finite and > 0"),
    (["algo.adv_clip_max=0"], "algo.adv_clip_max must be finite and > 0, or null"),
    (["algo.old_policy_every=0"], "algo.old_policy_every must be >= 1"),
    (["algo.train_steps=0"], "algo.train_steps must be >= 1"),
    (["algo.train_grid=model"], "algo.train_grid=model trains on the sampler's 20 steps"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_settings_are_refused_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ConfigProblem) as err:          # compose_config checks every section (align.core.schema.check)
        compose_config(GMM + overrides, run_dir=str(tmp_path / "run"))
    assert message in str(err.value)
    assert not os.path.exists(tmp_path / "run")


def test_bad_choice_is_refused_with_the_valid_ones(tmp_path, capsys):
    from align.run import main as run_main
    with pytest.raises(SystemExit) as exit_:
        run_main(GMM + ["algo.kl=exact", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "algo.kl" in err and "paper" in err and "code" in err, err
    assert not os.path.exists(tmp_path / "run")


FAST = GMM + ["train.steps=2", "train.progress=false", "eval.every=0", "eval.n_samples=16", "eval.final_samples=4"]


@pytest.mark.parametrize("extra", [[], ["algo.std_over=batch", "train.grad_accum=2", "algo.old_policy_every=2",
                                        "algo.timestep_fraction=0.5", "algo.timestep_selection=random",
                                        "algo.kl=code", "algo.train_grid=sd3"]])
def test_trains_two_steps_on_gmm(tmp_path, extra):
    run_dir = str(tmp_path / "run")
    trainer = build_trainer(compose_config(FAST + extra, run_dir=run_dir), run_dir)
    assert trainer.algo.group_size == 4 and not trainer.algo.uses_reward_gradient
    trainer.train()
    rows = read_metrics(run_dir)
    assert rows[-1]["step"] == 2 and {"policy_loss", "ratio_mean", "clip_frac", "kl", "adv_mean"} <= set(rows[1])
    assert all(math.isfinite(r["loss"]) for r in rows[1:])
    # the second update of an old_policy_every=2 cycle samples with θ_old: ρ ≠ 1 there
    if "algo.old_policy_every=2" in extra:
        assert rows[1]["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and rows[2]["ratio_mean"] != 1.0


def test_trains_two_steps_on_digits(tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = compose_config(["algo=flow_grpo", "model=digits", "train.steps=2", "train.batch_size=4", "sampler.steps=4",
                          "algo.train_steps=3", "train.progress=false", "eval.every=0", "eval.n_samples=8",
                          "eval.group_size=4", "eval.final_samples=2"], run_dir=run_dir)
    trainer = build_trainer(cfg, run_dir)
    before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    trainer.train()
    rows = read_metrics(run_dir)
    assert rows[-1]["step"] == 2 and all(math.isfinite(r["loss"]) for r in rows[1:])
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(trainer.model.trainable_parameters(), before))
    assert moved > 0


def test_trains_two_steps_on_tiny_sd3(tmp_path_factory, tmp_path):
    from omegaconf import open_dict

    from helpers.tiny_sd3 import RESOLUTION, build_tiny_sd3, tiny_reward_registered

    sd3_dir = build_tiny_sd3(str(tmp_path_factory.mktemp("sd3")), t5=False)
    run_dir = str(tmp_path / "run")
    overrides = ["algo=flow_grpo", "model=sd3", "reward=aesthetic", f"model.pretrained={sd3_dir}",
                 "model.dtype=float32", f"model.resolution={RESOLUTION}", "model.decoder=vae", "model.t5=false",
                 "model.features.kind=pixels", "prompts=hpdv2", "sampler.steps=4", "algo.train_steps=3",
                 "algo.group_size=2", "train.steps=2", "train.batch_size=2", "train.progress=false", "eval.every=0",
                 "eval.n_samples=4", "eval.group_size=2", "eval.final_samples=2", "device=cpu"]
    with tiny_reward_registered() as name:
        cfg = compose_config(overrides, run_dir=run_dir)
        with open_dict(cfg):
            cfg.reward = {"name": name}
        trainer = build_trainer(cfg, run_dir)
        before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
        trainer.train()
    rows = read_metrics(run_dir)
    assert rows[-1]["step"] == 2 and all(math.isfinite(r["loss"]) for r in rows[1:])
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(trainer.model.trainable_parameters(), before))
    assert moved > 0


def _rows(run_dir):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(run_dir)]


def test_interrupted_and_resumed_run_writes_the_same_rows(tmp_path, monkeypatch):
    # old_policy_every=3 with checkpoints every 2 updates: the resume lands inside a θ_old cycle, so θ_old and the
    # update count must come back from the checkpoint
    fast = GMM + ["train.steps=6", "train.checkpoint_every=2", "eval.every=3", "eval.n_samples=16",
                  "eval.final_samples=8", "train.progress=false", "algo.old_policy_every=3"]
    full = str(tmp_path / "full")
    build_trainer(compose_config(fast, run_dir=full), full).train()
    part = str(tmp_path / "part")
    assert crash_then_resume(monkeypatch, fast, part) == [2, 4]   # dies in update 5, after step 4's checkpoint
    assert _rows(part) == _rows(full)
    rows = _rows(full)       # updates 2, 3, 5, 6 sample with θ_old: ρ ≠ 1 and the clip (ε = 1e-4) acts
    assert rows[1]["clip_frac"] == 0 and all(rows[s]["clip_frac"] > 0 for s in (2, 3, 5, 6)), rows
    a, b = (torch.load(os.path.join(d, "samples_final.pt")) for d in (full, part))
    assert torch.equal(a["x1"], b["x1"])
