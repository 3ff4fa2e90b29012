"""VGG-Flow-PMP: the discrete costate is the exact gradient of the cost-to-go, and training reaches the
deterministic optimum of the relaxed problem (reference §2, §6.3)."""
from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from omegaconf import OmegaConf

from align.core.interfaces import Reward
from align.models.digits import DigitsFlow
from align.models.gmm import GaussianMixtureFlow
from algorithms.common.subsampling import binned_time_indices
from algorithms.vggflow_pmp import VGGFlowPMP
from rewards.analytic import QuadraticReward
from helpers.kept_v_base import check_kept_v_base
from samplers import Trajectory, euler_integrate, sd3_grid

BETA = 0.7


def _setup(adjoint: str = "full", target: str = "next"):
    """A float64 two-component GMM with a random, clearly nonzero residual; a quadratic reward; 8 SD3 steps."""
    torch.manual_seed(0)
    model = GaussianMixtureFlow(weights=[0.3, 0.7], means=[[-1.0, 0.5], [1.2, -0.3]],
                                covs=[[[0.3, 0.1], [0.1, 0.2]], [[0.5, -0.2], [-0.2, 0.4]]],
                                hidden=16, depth=2).double()
    with torch.no_grad():
        model.residual.out.weight.normal_(0.0, 0.5)
        model.residual.out.bias.normal_(0.0, 0.3)
    reward = QuadraticReward(center=[0.5, 1.0], precision=[[1.0, 0.3], [0.3, 0.6]])
    ts = sd3_grid(8)                                              # non-uniform Δt_k
    cfg = OmegaConf.create({"name": "vggflow_pmp", "lr": 1e-4, "beta": BETA, "adjoint": adjoint,
                            "target": target, "subsample_bins": 4})
    return VGGFlowPMP(cfg, model, reward, ts), model, reward, ts


def _x0(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _autograd_costate(ts, xs, k, step, running, reward) -> torch.Tensor:
    """∂/∂x_k of Σ_{j≥k} Δt_j running(x_j, t_j) − r(x_N), unrolling x_{j+1} = x_j + Δt_j step(x_j, t_j)."""
    x = xs[k].clone().requires_grad_(True)
    y, cost = x, torch.zeros((), dtype=x.dtype)
    for j in range(k, len(ts) - 1):
        t = torch.full((y.shape[0],), float(ts[j]), dtype=y.dtype)
        dt = float(ts[j + 1] - ts[j])
        cost = cost + dt * running(y, t)
        y = y + dt * step(y, t)
    assert torch.allclose(y, xs[-1], atol=1e-12)                  # the unroll retraces the recorded trajectory
    cost = cost - reward(y, None).sum()
    (g,) = torch.autograd.grad(cost, x)
    return g


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    # ∇r is taken in float32 (algorithms.common.reward_grad), everything else in float64.
    assert torch.allclose(a.double(), b, rtol=1e-5, atol=1e-6 * b.abs().max().item()), (a - b).abs().max()


def test_full_costate_is_the_gradient_of_the_cost_to_go():
    algo, model, reward, ts = _setup("full")
    traj = algo.rollout(_x0(), [""] * 6, None, torch.Generator())
    a = algo.costate(traj)
    lam = 1.0 / BETA

    def running(y, t):
        return 0.5 * lam * (model.velocity(y, t) - model.base_velocity(y, t)).pow(2).sum()

    for k in range(traj.n_steps + 1):
        _close(a[k], _autograd_costate(ts, traj.xs, k, model.velocity, running, reward))


def test_lean_costate_is_the_reward_gradient_through_the_base_flow():
    algo, model, reward, ts = _setup("lean")
    zero = lambda y, t: torch.zeros((), dtype=y.dtype)  # noqa: E731
    # (i) along a base-only trajectory: the gradient of −r(x_N) through the base Euler map.
    xs = euler_integrate(model.base_velocity, _x0(), ts)
    a = algo.costate(Trajectory(xs=xs, ts=ts, prompts=[""] * 6))
    for k in range(len(ts)):
        _close(a[k], _autograd_costate(ts, xs, k, model.base_velocity, zero, reward))
    # (ii) along the finetuned trajectory: the same, with the residual ṽ_θ frozen as a per-state offset.
    traj = algo.rollout(_x0(), [""] * 6, None, torch.Generator())
    a = algo.costate(traj)

    def frozen_step(y, t):
        return model.base_velocity(y, t) + (model.velocity(y.detach(), t) - model.base_velocity(y.detach(), t))

    for k in range(len(ts)):
        _close(a[k], _autograd_costate(ts, traj.xs, k, frozen_step, zero, reward))
    # The residual is large enough here that the full adjoint differs (so the tests above are not vacuous).
    full = VGGFlowPMP(OmegaConf.merge(algo.cfg, {"adjoint": "full"}), model, reward, ts).costate(traj)
    assert (full[0] - a[0]).norm() > 0.1 * a[0].norm()


@pytest.mark.parametrize("adjoint,target", [("full", "next"), ("lean", "same")])
def test_loss_runs_and_trains_theta_only(adjoint, target):
    algo, model, reward, ts = _setup(adjoint, target)
    traj = algo.rollout(_x0(), [""] * 6, None, torch.Generator())
    loss, logs = algo.loss(traj, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss > 0 and "loss_match" in logs
    loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert not list(algo.parameters())                            # no networks of its own


# ---- the loss takes v_base from the sweep instead of evaluating it again ---------------------------------------------
class _Contrast(Reward):
    """A smooth nonlinear image score (tests only)."""

    name, domain = "pmp_test_contrast", ""

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -(images.float() - 0.3).pow(2).flatten(1).mean(1)


def _digits_setup(target: str):
    """The pretrained digits model (CFG, w = 2) in float64 with perturbed LoRA weights, 3 prompts, 4 SD3 steps,
    2 bins."""
    torch.manual_seed(0)
    model = DigitsFlow().double()
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg = OmegaConf.create({"name": "vggflow_pmp", "lr": 1e-4, "beta": BETA, "adjoint": "full", "target": target,
                            "subsample_bins": 2})
    prompts = ["three", "seven", "one"]
    algo = VGGFlowPMP(cfg, model, _Contrast(), sd3_grid(4))
    x0 = model.sample_noise(len(prompts), torch.Generator().manual_seed(3)).double()
    cond = {n: c.double() for n, c in model.encode(prompts).items()}
    return algo, algo.rollout(x0, prompts, cond, torch.Generator())


def _reference_loss(algo, traj, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The matching loss with v_base evaluated afresh (no grad) at every loss state, and the loss states [B, M]."""
    model, next_ = algo.model, algo.cfg.target == "next"
    a = algo.costate(traj, stop=int(next_))
    B, N = traj.xs.shape[1], traj.n_steps
    idx = binned_time_indices(N, algo.cfg.subsample_bins, B, torch.Generator().manual_seed(seed), min_index=0)
    k, sample = idx.flatten(), torch.arange(B).repeat_interleave(idx.shape[1])
    x, t = traj.xs[k, sample], traj.ts[k].to(traj.xs)
    cond = None if traj.cond is None else {n: c[sample] for n, c in traj.cond.items()}
    with torch.no_grad():
        v_base = model.base_velocity(x, t, cond)
    target = v_base - BETA * a[k + int(next_), sample].to(x.dtype)
    return (model.velocity(x, t, cond) - target).pow(2).mean(), idx


@pytest.mark.parametrize("domain,adjoint,target", [("gmm", "full", "next"), ("gmm", "lean", "same"),
                                                   ("digits", "full", "next")])
def test_loss_takes_v_base_from_the_sweep(domain, adjoint, target):
    if domain == "gmm":
        algo, _, _, _ = _setup(adjoint, target)
        traj = algo.rollout(_x0(), [""] * 6, None, torch.Generator())
    else:
        algo, traj = _digits_setup(target)
    base_rows, idx = check_kept_v_base(algo, traj, _reference_loss)
    # v_base rows (outside v_θ): the sweep's (N − first)·B, plus only the loss states below its stop (x_0)
    if domain == "digits":
        B, N, first = traj.xs.shape[1], traj.n_steps, int(target == "next")
        below = int((idx < first).sum())
        assert 0 < below < idx.numel()
        assert base_rows == (N - first) * B + below


def test_full_sweep_holds_theta_constant_so_cfg_needs_no_recomputation():
    """With θ held constant during the sweep, each step runs the transformer 4 times (v_θ and v_base, conditional
    and unconditional), not 5: the θ-detached unconditional branch of v_θ is not recomputed in the backward. The
    costate itself is checked against autograd through the CFG chain in tests/test_cfg_jacobians.py."""
    algo, traj = _digits_setup("next")
    model, B, N = algo.model, traj.xs.shape[1], traj.n_steps
    with mock.patch.object(model, "transformer_u", wraps=model.transformer_u) as net:
        a = algo.costate(traj, stop=1)
    assert sum(call.args[0].shape[0] for call in net.call_args_list) == 4 * B * (N - 1)
    assert torch.isfinite(a[1:]).all()
    assert all(p.requires_grad and p.grad is None for p in model.trainable_parameters())


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from align.setup.registration import prepare_compose

    prepare_compose()                  # every typed config in Hydra's ConfigStore and the resolvers, before composing
    conf = os.path.join(os.path.dirname(__file__), "..", "align", "conf")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base=None):
        return compose(config_name="config", overrides=overrides)


def test_config_composes_with_the_domain_beta():
    cfg = _compose(["algo=vggflow_pmp"])
    from align.setup.paper_settings import TABLE

    assert cfg.algo.beta == TABLE[("digits", "*", "vggflow_pmp")]["beta"].value
    assert cfg.algo.adjoint == "full" and cfg.algo.target == "next"


# ---- training reaches the deterministic optimum (reference §6.3) ------------------------------------------
MU, COV, C = [0.5, -0.3], [[1.0, 0.4], [0.4, 0.5]], [1.0, 0.5]


@pytest.mark.slow
def test_pmp_training_reaches_the_deterministic_optimum(tmp_path):
    """One 2-D Gaussian (non-isotropic), r = cᵀx, β = 1, 20 uniform steps, driven through the Trainer.

    For this case the optimum is a deterministic translation of the base flow map (§6.3), and it is NOT the
    tilt: β ∫Φ(1,s)Φ(1,s)ᵀds c = (1.72, 0.91) against βΣc = (1.20, 0.65).
    """
    from experiments.exact import continuous as exact
    from align.setup.assemble import build_trainer

    cfg = _compose(["algo=vggflow_pmp", "model=gmm", "reward=linear", "model.weights=[1.0]", f"model.means=[{MU}]",
                    f"model.covs=[{COV}]", f"reward.direction={C}", "train.steps=200", "train.lr=3e-3",
                    "eval.every=0", "eval.n_samples=64", "eval.final_samples=20000", "eval.batch_size=20000",
                    "train.progress=false", "train.log_every=50", "train.checkpoint_every=100000", f"run_dir={tmp_path}"])
    trainer = build_trainer(cfg, str(tmp_path))
    trainer.train()
    n_steps, beta = int(cfg.sampler.steps), float(cfg.algo.beta)
    pi, mu, cov, c = torch.ones(1), torch.tensor([MU]), torch.tensor([COV]), torch.tensor(C, dtype=torch.float64)

    def optimum(x0: torch.Tensor, steps: int) -> torch.Tensor:
        return exact.deterministic_optimum(x0, pi, mu, cov, lambda x: c.expand_as(x), beta, n_steps=steps)

    # (i) Per particle, from the same x_0: the learned flow map against the shooting optimum of the same Euler
    #     grid. Nothing random is compared, so only the training error is left (measured: 2e-3 mean distance).
    x0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x1 = euler_integrate(lambda x, t: trainer.model.velocity(x, t), x0, trainer.ts, record=False).double()
    assert (x1 - optimum(x0, n_steps)).norm(dim=1).mean() < 0.02

    # (ii) The user-facing samples against the continuous-time optimum: here a translation of the exact base flow
    #      map x_1 = μ + Σ^{1/2} x_0 by δ = β ∫Φ(1,s)Φ(1,s)ᵀds c (exact.linear_shift_single_gaussian, which the
    #      shooting reproduces), so mean μ + δ and covariance Σ. Tolerance = Monte-Carlo (4σ for 20000 samples:
    #      0.027 on the mean, ≤ 0.03 on a covariance entry) + the 20-step discretization gap, computed as the
    #      same-grid shooting optimum's moments (affine in x_0, read off exactly from 3 particles) minus the
    #      continuous ones (≈ 0.10 on the mean, 0.11 on the covariance) + 0.01 training error (bound (i)).
    x1 = torch.load(os.path.join(tmp_path, "samples_final.pt"))["x1"].double()
    mean_fine = mu[0].double() + exact.linear_shift_single_gaussian(cov[0], c, beta)
    cov_fine = cov[0].double()
    y = optimum(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), n_steps)
    M = (y[1:] - y[0]).T
    mean_grid, cov_grid = y[0], M @ M.T
    mc_mean, mc_cov = 4 * (torch.diagonal(cov_fine) / len(x1)).sqrt(), 4 * (2.0 / len(x1)) ** 0.5 * cov_fine.abs().max()
    assert ((x1.mean(0) - mean_fine).abs() <= mc_mean + (mean_grid - mean_fine).abs() + 0.01).all()
    assert ((torch.cov(x1.T) - cov_fine).abs() <= mc_cov + (cov_grid - cov_fine).abs() + 0.01).all()
    # ... and it is told apart from the tilt's mean μ + βΣc at this precision.
    tilt_mean = mu[0].double() + beta * cov[0].double() @ c
    assert (x1.mean(0) - tilt_mean).norm() > 0.3
