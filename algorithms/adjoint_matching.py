"""Adjoint Matching (Domingo-Enrich et al., 2024) for flow matching, as the VGG-Flow paper's baseline (reference §3).

Target: p*(x) ∝ p_base(x) exp(β r(x)), reached by stochastic optimal control of the memoryless SDE
    dX = b(X, t) dt + σ(t) dB,   b = 2 v_θ(X, t) − X/(t + h),   σ(t) = √(2 (1 − t + h)/(t + h)),
whose base version (v_θ = v_base) has the flow's marginals and independent endpoints for h → 0.
Algorithm 1 (lean adjoint), on the *training* grid t_0 < … < t_N (``algo.train_grid``, below):
  1. roll out the SDE with the current v_θ, no grad (the last step is a noiseless base Euler step);
  2. lean adjoint, one VJP through v_base per step:
       ã_N = −β ∇r(decode(X_N)),   ã_k = ã_{k+1} + Δt_k ∇_x[ã_{k+1}·b_base(x, t_k)]_{x = X_k};
  3. L(θ) = Σ_{k∈K} w_k ‖ (2/σ_k)(v_θ − v_base)(X_k, t_k) + σ_k ã_{k+1} ‖²  (X, ã detached), K a subset of times,
     w_k = Δt_k / mean Δt (the time integral of AM's loss, discretised as the reference code's δ·‖u + σã‖²;
     ``algo.time_weight``), averaged over the samples that survive the per-sample loss clip (``algo.loss_clip``).
     On the default uniform training grid every w_k is 1.
Pairing X_k with ã_{k+1} is the discrete optimality condition of the step k → k+1 (reference §3, pairing note).
Samples for evaluation come from the ODE with v_θ on the *model's* grid (the trainer's evaluator), as in AM.

Training grid (``algo.train_grid``). The discrete fixed point ṽ_k = −(σ_k²/2) ã_{k+1} is the optimum of the
discretised SDE, not of the ODE that produces the samples; on a strongly non-uniform grid the two part ways.
Exact check (one Gaussian N(μ, Σ), Σ = diag(.25, 2), r = cᵀx, c = (1, 1); ã is then deterministic, so the fixed
point is a per-step constant; read out with the 20-step Euler ODE on SD3's shifted grid and compared with the
tilt's mean shift βΣc, reference §6.2; experiments/exact/discrete.py): training on the sd3 20-step grid itself misses
the shift by 9.8 % in norm (−14 % / −10 % per component); training on the uniform 20-step grid and sampling on
the sd3 grid misses it by 0.8 % (≤ 1.3 % per component), at the same cost per update (N − 1 velocity calls in
the rollout, N − 1 base VJPs, |K| v_θ calls in the loss, whose v_base the VJPs kept). Hence the default
``uniform``: the SDE rollout, the lean adjoint and the loss all run on t_k = k/N (N = ``algo.train_steps``, default
the sampler's number of steps), and the learned v_θ(x, t), a function of continuous t, is sampled on the model's
grid. On a uniform model grid this is exactly the model grid (nothing changes there). ``model`` keeps the former
behaviour (train on the sampler's grid). The returned ``Trajectory`` carries the training grid in ``ts``; its x1
is an SDE sample on that grid (the trainer only logs its reward).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from omegaconf import MISSING

from algorithms.common.adjoint import Sweep, costate_sweep, kept_at
from align.core.batching import index_cond, per_sample
from align.core.interfaces import Algorithm
from align.core.registry import register_algorithm
from algorithms.common.reward_grad import per_sample_norms, reward_grad_at_x1
from align.core.schema import positive, require
from algorithms.common.subsampling import gather_states
from samplers import (Trajectory, memoryless_drift, memoryless_noise_level, memoryless_sde_integrate,
                      training_grid)

TrainGrid = enum.StrEnum("TrainGrid", "uniform model")
TimeWeight = enum.StrEnum("TimeWeight", "dt uniform")


@dataclass
class LossTimes:
    """The states the loss uses, as fractions of the training grid's N (AM, N = 40: last 10 + 10 random)."""
    last: float = 0.25              # the last ⌈last·N⌉ states
    random: float = 0.25            # plus ⌈random·N⌉ distinct states drawn per trajectory from the earlier ones


@dataclass
class AdjointMatchingConfig:
    """``algo=adjoint_matching``."""
    name: str = "adjoint_matching"
    lr: float = MISSING             # the VGG paper's setting for AM: 1e-4 (AM itself: 2e-5, Adam β₁ = .95); preset
    # Reward multiplier λ_AM: the target is p_base·exp(β r). Not VGG-Flow's β; the two are tuned separately.
    # SD3 (VGG paper, reference §3): 5e3 aesthetic, 3e5 HPSv2, 1e4 PickScore; preset: align/setup/paper_settings.py.
    beta: float = MISSING
    # The grid the SDE rollout, the lean adjoint and the loss run on (the model still samples on its own grid):
    # uniform: t_k = k/N, N = train_steps (see above) | model: the sampler's grid, the former behaviour.
    train_grid: TrainGrid = TrainGrid.uniform
    train_steps: Optional[int] = None  # steps of the uniform training grid; null: sampler.steps (same cost per update)
    h: Optional[float] = None       # offset of the memoryless schedule; null: half the first step (default_offset)
    loss_times: LossTimes = field(default_factory=LossTimes)
    # Each loss time's weight: dt (Δt_k / mean Δt: AM's ∫ dt discretised, as the reference code's δ·‖u + σã‖²; 1 on a
    # uniform training grid) | uniform (every time alike: on a non-uniform grid, e.g. train_grid=model on SD3's,
    # the late wide steps count as much as the early narrow ones)
    time_weight: TimeWeight = TimeWeight.dt
    # Per-sample loss clip (LCT): drop samples whose loss, in AM's units (Σ over loss times and elements), exceeds
    # loss_clip·β², and average over the kept samples. AM uses 1.6 on images; null disables (the default until tuned).
    loss_clip: Optional[float] = None

    def validate(self) -> None:
        require(positive(self.beta), "algo.beta", self.beta, "finite and > 0")
        if self.h is not None and self.h <= 0:
            raise ValueError(f"algo.h must be > 0 (or null for Δt_0/2), got {self.h}")

def time_weights(ts: torch.Tensor, kind: str) -> torch.Tensor:
    """w_k, k = 0..N−1, of the loss at time t_k (``algo.time_weight``): Δt_k / mean Δt (``dt``), or 1 (``uniform``).
    In float64 from the float64 grid, so that on a uniform grid ``dt`` is 1 to rounding (1.0 exactly in fp32)."""
    dt = (ts[1:] - ts[:-1]).double()
    return dt / dt.mean() if kind == "dt" else torch.ones_like(dt)


def default_offset(ts: torch.Tensor) -> float:
    """h = Δt_0 / 2, Δt_0 = t_1 − t_0 of the training grid.

    Since v(x, 0) = E[x_1] − x, the first SDE step maps x_0 ↦ (1 − Δt_0/h − 2Δt_0) x_0 + …: AM's h = Δt_0 zeroes
    x_0, and h < Δt_0/2 amplifies it (|1 − Δt_0/h| > 1); Δt_0/2 is the smallest offset that does neither (the
    bias of the offset schedule grows with h). Exact check on one Gaussian with r = cᵀx, lean-adjoint optimum
    sampled with the ODE, relative error of the tilt's mean shift on N = 10/20/40 uniform steps: 1.1/0.05/0.2 %
    at h = Δt_0/2, 4.1/2.6/1.5 % at h = Δt_0, 9.6/6.3/3.6 % at h = 2Δt_0. The price: X_1 carries the extra
    noise variance Δt_0 σ(0)² ≈ 4 (about 2 at h = Δt_0), which the contracting drift forgets within a few steps:
    on the uniform 20-step grid the uncontrolled SDE's variance is ×5.9 the base marginal's at k = 1, ×1.9 at
    k = 2, ×1.5 at k = 3 (×2.3 / 1.6 / 1.4 at h = Δt_0), on that Gaussian with the largest ratio over axes.
    """
    return 0.5 * float(ts[1] - ts[0])


def loss_time_indices(n_steps: int, last: float, random: float, batch: int,
                      generator: torch.Generator) -> torch.Tensor:
    """Per trajectory: the last ⌈last·N⌉ states of {0, …, N−1} plus ⌈random·N⌉ distinct states drawn from the
    earlier ones (AM, N = 40: the last 10 plus 10 of the first 30). Returns a LongTensor [batch, M]."""
    if not (0 < last <= 1 and 0 <= random <= 1):
        raise ValueError(f"algo.loss_times.last must be in (0, 1] and .random in [0, 1], got {last}, {random}")
    n_last = min(n_steps, max(1, math.ceil(last * n_steps - 1e-9)))
    n_rest = n_steps - n_last
    n_rand = min(n_rest, math.ceil(random * n_steps - 1e-9))
    tail = torch.arange(n_rest, n_steps).expand(batch, n_last)
    if n_rand == 0:
        return tail.clone()
    picks = torch.rand(batch, n_rest, generator=generator).argsort(dim=1)[:, :n_rand]
    return torch.cat([tail, picks], dim=1)


@register_algorithm("adjoint_matching", config=AdjointMatchingConfig)
class AdjointMatching(Algorithm):
    """Regress (2/σ_k)(v_θ − v_base) onto −σ_k ã_{k+1}, ã the lean adjoint of the memoryless SDE."""

    def __init__(self, cfg: Any, model, reward, ts: torch.Tensor):
        super().__init__(cfg, model, reward, ts)       # self.cfg: an instance of its config dataclass
        cfg = self.cfg
        self.beta = cfg.beta
        self.train_ts = training_grid(cfg.train_grid, ts, cfg.train_steps)
        self.h = default_offset(self.train_ts) if cfg.h is None else cfg.h
        self.last, self.random = cfg.loss_times.last, cfg.loss_times.random
        loss_time_indices(len(self.train_ts) - 1, self.last, self.random, 1, torch.Generator())  # validate early

    def rollout(self, x0: torch.Tensor, prompts: list[str], cond: Any, generator: torch.Generator) -> Trajectory:
        """The memoryless SDE with the current v_θ on the training grid, noise from ``generator``, all states
        recorded; the trajectory's ``ts`` is the training grid (not necessarily the sampler's ``self.ts``)."""
        xs = memoryless_sde_integrate(lambda x, t: self.model.velocity(x, t, cond),
                                      lambda x, t: self.model.base_velocity(x, t, cond), x0, self.train_ts, self.h,
                                      generator)
        return Trajectory(xs=xs, ts=self.train_ts, cond=cond, prompts=prompts)

    # ---- the lean adjoint --------------------------------------------------------------------------------
    def sweep(self, traj: Trajectory, stop: int = 1) -> Sweep:
        """The lean adjoint ã_k for k = N..stop [N+1, B, ...] on the trajectory's (training) grid: the exact discrete
        adjoint of the base chain the SDE rollout runs, so the last (noiseless base Euler) step uses v_base itself,
        not b_base; and v_base(X_k, t_k) for k = N−1..stop (``Sweep.kept``)."""
        model, cond, n, h = self.model, traj.cond, traj.n_steps, self.h

        def hamiltonian(k: int, x: torch.Tensor, t: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            v = model.base_velocity(x, t, cond)
            drift = v if k == n - 1 else memoryless_drift(v, x, float(traj.ts[k]), h)
            return (a * drift).sum(), v

        grad_r = reward_grad_at_x1(model, self.reward, traj)
        return costate_sweep(traj.xs, traj.ts, -self.beta * grad_r, hamiltonian, stop=stop,
                             params=model.trainable_parameters())

    # ---- one update ---------------------------------------------------------------------------------------
    def loss(self, traj: Trajectory, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        model, N, B = self.model, traj.n_steps, traj.xs.shape[1]
        stop = 1                                        # ã_0 pairs with no loss state
        swept = self.sweep(traj, stop)
        a = swept.costates

        # Loss states K ⊂ {0, …, N−1}. X_{N−1} is included although the SDE's last step uses v_base: the ODE
        # that produces the final samples uses v_θ there, and its target −(σ²/2)ã_N is as well defined.
        idx = loss_time_indices(N, self.last, self.random, B, generator)            # [B, M]
        M = idx.shape[1]
        x, t, cond, _, k, sample = gather_states(traj, idx)
        a_next = a[k + 1, sample].to(x.dtype)
        sigma = per_sample(memoryless_noise_level(traj.ts[k], self.h).to(x), x)

        v_theta = model.velocity(x, t, cond)                                        # grad → θ
        # v_base from the sweep; only X_0 (below its stop) is evaluated here
        v_base = kept_at(swept.kept, k, sample, stop, lambda r: model.base_velocity(x[r], t[r], index_cond(cond, r)))
        sq = ((2.0 / sigma) * (v_theta - v_base) + sigma * a_next.detach()).pow(2).flatten(1)   # [B·M, D]
        w = time_weights(traj.ts, self.cfg.time_weight)[k].to(sq.dtype)                  # [B·M]

        # Per-sample loss clipping (LCT), in AM's units: Σ over loss times (weighted) and elements, threshold
        # loss_clip·β². A dropped sample leaves the batch: the mean runs over the kept samples only (dropping does
        # not shrink the step of the others); if every sample is dropped the loss is 0 (its gradient 0, no NaN).
        am_loss = (sq.detach().sum(1) * w).reshape(B, M).sum(1)
        keep = torch.ones(B, dtype=torch.bool, device=x.device)
        if self.cfg.loss_clip is not None:
            keep = am_loss <= self.cfg.loss_clip * self.beta ** 2
        kept_rows = keep.repeat_interleave(M)
        per_row = sq.mean(1) * w * kept_rows.to(sq.dtype)
        loss = per_row.sum() / max(int(kept_rows.sum()), 1)
        logs = {"loss_am": am_loss.mean().item(), "clipped_frac": 1.0 - keep.float().mean().item(),
                "adjoint_norm_1": per_sample_norms(a[-1]).mean().item(),
                "adjoint_norm_1st": per_sample_norms(a[1]).mean().item()}
        return loss, logs
