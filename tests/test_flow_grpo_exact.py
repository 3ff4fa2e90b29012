"""Flow-GRPO converges to the path-KL-regularised optimum on one Gaussian with a linear reward.

Setting: model=gmm with one component N(μ, Σ), μ = (0.5, −0.5), Σ = diag(0.25, 2); r = cᵀx, c = (1, 1); the
10-step uniform training grid, a = 0.7; normalize_std off (it would rescale r by a batch statistic and move the
fixed point), no advantage clip, on-policy (ρ ≡ 1). β = 1, G = 4, group-mean baseline, so the loss's gradient is
that of E[r] − β/(1 − 1/G)·KL(path): the optimum tilts p_ref(path | x_0) by exp(λ r), λ = (1 − 1/G)/β = 0.75
(algorithms/flow_grpo.py). Its closed form (experiments/exact/flow_grpo.py, matrices from the Gaussian's velocity
formula, independent of samplers/flow_sde.py, whose step tests/test_flow_sde.py checks): every step's mean moves by
the constant δ_k = s_k² λ c_{k+1}, and x_N | x_0 by λ Cov_ref(x_N | x_0) c = (0.164, 1.227).

Read-out: the trained v_θ's SDE chain and the base's, from the same x_0 and the same noise (paired, so Monte-Carlo
noise of the read-out cancels but for the learned field's x-dependence): mean of x_N^θ − x_N^base over 4000 paths.
Tolerance: the learned field fluctuates around the fixed point with the policy-gradient noise of 400 AdamW updates
of 128 rows (lr 1e-3; no weight decay: AdamW's 1e-2 pulls the residual MLP to 0 and biased the shift 10-20 % low).
Seeds 0, 1, 2 of this setting missed the target by 4.6 %, 3.2 % and 4.5 % of its norm, without a common sign (at
lr 2e-3 up to 12.6 %); the tolerance is 10 % of the norm, about twice the worst. The shift without the (1 − 1/G)
factor (λ = 1/β) lies 25 % of the norm away, so a learned shift within 10 % of the target is at least 15 % from it.
Per-step shifts within 0.05, 15 % of the largest δ_k (0.345): measured ≤ 0.029 (seed 0), the first two steps
8-11 % short and later ones slightly long, the residual MLP smoothing over t between neighbouring steps.
"""
import os

import pytest
import torch

from align.setup.assemble import build_trainer
from align.setup.compose import compose_config
from experiments.exact.flow_grpo import optimal_step_shifts, reference_chain, tilt_shift
from samplers import flow_sde_integrate, flow_sde_noise_level, flow_sde_step_mean

MU, COV = torch.tensor([0.5, -0.5]), torch.diag(torch.tensor([0.25, 2.0]))
C = torch.tensor([1.0, 1.0], dtype=torch.float64)
G, BETA, A = 4, 1.0, 0.7
SETTING = ["model=gmm", "model.weights=[1.0]", "model.means=[[0.5,-0.5]]", "model.covs=[[[0.25,0.0],[0.0,2.0]]]",
           "model.hidden=64", "reward=linear", "reward.direction=[1.0,1.0]", "algo=flow_grpo", f"algo.beta={BETA}",
           f"algo.group_size={G}", f"algo.noise_level={A}", "algo.normalize_std=false", "algo.adv_clip_max=null",
           "algo.train_steps=10", "sampler.steps=10", "train.steps=400", "train.batch_size=128", "train.lr=1e-3",
           "train.weight_decay=0", "train.progress=false", "train.checkpoint_every=1000", "eval.every=0",
           "eval.n_samples=16", "eval.final_samples=4"]


def _paired_shifts(model, ts):
    """x_N's mean shift and its spread over paths, and the mean per-step shifts along the trained chain."""
    x0 = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        th = flow_sde_integrate(lambda x, t: model.velocity(x, t), x0, ts, A, torch.Generator().manual_seed(2))
        rf = flow_sde_integrate(lambda x, t: model.base_velocity(x, t), x0, ts, A, torch.Generator().manual_seed(2))
        diff = (th.xs[-1] - rf.xs[-1]).double()
        steps = []
        for k in range(len(ts) - 1):
            x, t, dt = th.xs[k], float(ts[k]), float(ts[k + 1] - ts[k])
            tb, g = torch.full((len(x),), t), flow_sde_noise_level(ts, k, A)
            steps.append((flow_sde_step_mean(x, model.velocity(x, tb), t, dt, g)
                          - flow_sde_step_mean(x, model.base_velocity(x, tb), t, dt, g)).double().mean(0))
    return diff.mean(0), diff.std(0), torch.stack(steps)


@pytest.mark.slow
def test_flow_grpo_reaches_the_tilted_chain(tmp_path):
    run_dir = str(tmp_path / "run")
    trainer = build_trainer(compose_config(SETTING, run_dir=run_dir), run_dir)
    trainer.train()
    ts = trainer.algo.train_ts
    lam = (1 - 1 / G) / BETA
    Ms, _, ss = reference_chain(MU, COV, ts, A)
    target = tilt_shift(MU, COV, ts, A, C, lam)
    naive = tilt_shift(MU, COV, ts, A, C, 1 / BETA)          # the tilt by exp(r/β), without the (1 − 1/G)
    shift, spread, steps = _paired_shifts(trainer.model, ts)
    err = (shift - target).norm() / target.norm()
    print(f"x_N shift {shift.tolist()} vs target {target.tolist()} (rel. err {err:.3f}), naive {naive.tolist()}")
    assert err < 0.10
    assert (shift - naive).norm() / target.norm() > 0.15
    # the optimal control is constant in x: the paired differences barely spread (0.005, 0.03 measured)
    assert spread.max() < 0.1 * target.norm()
    deltas = optimal_step_shifts(Ms, ss, C, lam)
    print("per-step shifts", steps.T.tolist(), "targets", deltas.T.tolist())
    assert (steps - deltas).abs().max() < 0.05
    assert os.path.isfile(os.path.join(run_dir, "samples_final.pt"))
