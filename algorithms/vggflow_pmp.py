"""VGG-Flow-PMP (Liu et al., NeurIPS 2025, §6 and App. A.1): value-gradient matching onto Pontryagin's costate.

Relaxed control problem (Eq. 6), β = 1/λ, on the N-step Euler grid:
    J(θ) = Σ_k Δt_k (λ/2) ‖ṽ_θ(x_k, t_k)‖² − r(x_N),   x_{k+1} = x_k + Δt_k v_θ(x_k, t_k),   v_θ = v_base + ṽ_θ.
Hamiltonian H(x, v, a) = (λ/2)‖v − v_base(x, t)‖² + aᵀv; costate ȧ = −∇_x H (Eq. 20, read as intended).
Algorithm (no value network):
  1. roll out the ODE with the current v_θ, no grad;
  2. sweep the costate backward, exactly for the Euler scheme (reference §2):
       a_N = −∇r(decode(x_N)),   a_k = a_{k+1} + Δt_k ∇_x[ a_{k+1}·v_θ(x, t_k) + (λ/2)‖v_θ − v_base‖² ]_{x = x_k}
     (``adjoint: lean`` keeps only a_{k+1}·v_base: the adjoint that holds at the optimum, Prop. 3);
  3. match: L(θ) = ‖ṽ_θ(x_k, t_k) + β sg(a_{k+1})‖² on sub-sampled states. Pairing x_k with a_{k+1} is the
     discrete optimality condition ∂J/∂ṽ_k = Δt_k (λ ṽ_k + a_{k+1}) = 0 (``target: same`` uses a_k).
The fixed point is the optimum of the problem discretised on the grid the rollout and the sweep run on
(``algo.train_grid``): ``model``, the sampler's grid, or ``uniform``, t_k = k/N (N = ``algo.train_steps``, default
the sampler's number of steps, the same cost), the learned v_θ(x, t) then sampled on the model's grid, as Adjoint
Matching does (docs/vggflow.md#where-the-residual-is-enforced-and-pmps-training-grid: which lands closer).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import MISSING

from algorithms.common.adjoint import Sweep, costate_sweep, kept_at
from align.core.batching import index_cond
from align.core.interfaces import Algorithm
from align.core.registry import register_algorithm
from algorithms.common.reward_grad import per_sample_norms, reward_grad_at_x1
from align.core.schema import positive, require
from algorithms.common.subsampling import binned_time_indices, gather_states, per_sample_mse
from samplers import Trajectory, euler_integrate, training_grid

Adjoint = enum.StrEnum("Adjoint", "full lean")
TrainGrid = enum.StrEnum("TrainGrid", "model uniform")
Target = enum.StrEnum("Target", "next same")


@dataclass
class VGGFlowPMPConfig:
    """``algo=vggflow_pmp``."""
    name: str = "vggflow_pmp"
    lr: float = MISSING             # paper: 1e-4 (aesthetic), 5e-5 (HPSv2, PickScore); preset: the paper's
    # β = 1/λ of the relaxed control problem, VGG-Flow's value (inferred; the matching target is ṽ = −β a).
    beta: float = MISSING
    # full: ∇_x[a·v_θ + (λ/2)‖v_θ − v_base‖²] (paper Eq. 20) | lean: ∇_x[a·v_base] (Prop. 3)
    adjoint: Adjoint = Adjoint.full
    target: Target = Target.next    # next: x_k ↔ a_{k+1}, the exact discrete optimality condition | same: x_k ↔ a_k
    subsample_bins: int = 5         # one state per bin of the N transitions + the last grid state (§1.7)
    # The grid the ODE rollout, the costate sweep and the matching run on (the model samples on its own grid):
    # model: the sampler's | uniform: t_k = k/N, N = train_steps (null: sampler.steps)
    train_grid: TrainGrid = TrainGrid.model
    train_steps: Optional[int] = None

    def validate(self) -> None:
        require(positive(self.beta), "algo.beta", self.beta, "finite and > 0")
        require(self.train_steps is None or self.train_steps >= 1, "algo.train_steps", self.train_steps, ">= 1")

    def validate_steps(self, n_steps: int) -> None:
        require(1 <= self.subsample_bins <= n_steps, "algo.subsample_bins", self.subsample_bins,
                f"in [1, sampler.steps={n_steps}]")


@register_algorithm("vggflow_pmp", config=VGGFlowPMPConfig)
class VGGFlowPMP(Algorithm):
    """Match ṽ_θ = v_θ − v_base to −β a_{k+1}, the costate of the relaxed control problem (module docstring)."""

    def __init__(self, cfg: Any, model, reward, ts: torch.Tensor):
        super().__init__(cfg, model, reward, ts)       # self.cfg: an instance of its config dataclass
        self.beta = self.cfg.beta
        self.train_ts = training_grid(self.cfg.train_grid, ts, self.cfg.train_steps)
        if self.cfg.train_steps is not None:            # the bins split the training grid's steps
            require(1 <= self.cfg.subsample_bins <= self.cfg.train_steps, "algo.subsample_bins",
                    self.cfg.subsample_bins, f"in [1, algo.train_steps={self.cfg.train_steps}]")

    def rollout(self, x0: torch.Tensor, prompts: list[str], cond: Any, generator: torch.Generator) -> Trajectory:
        """The Euler ODE of the current v_θ on the training grid, no grad, every state recorded."""
        xs = euler_integrate(lambda x, t: self.model.velocity(x, t, cond), x0, self.train_ts)
        return Trajectory(xs=xs, ts=self.train_ts, cond=cond, prompts=prompts)

    # ---- the Hamiltonian of step k (summed over the batch), keeping v_base(x_k, t_k) for the loss -----------
    def hamiltonian(self, cond: Any):
        model, lam = self.model, 1.0 / self.beta

        def full(k: int, x: torch.Tensor, t: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            v, v_base = model.velocity(x, t, cond), model.base_velocity(x, t, cond)
            return (a * v).sum() + 0.5 * lam * (v - v_base).pow(2).sum(), v_base

        def lean(k: int, x: torch.Tensor, t: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            v_base = model.base_velocity(x, t, cond)
            return (a * v_base).sum(), v_base

        return full if self.cfg.adjoint == "full" else lean

    def sweep(self, traj: Trajectory, stop: int = 0) -> Sweep:
        """The costate a_k for k = N..stop along the trajectory [N+1, B, ...] (float32 or wider; NaN below stop),
        and v_base(x_k, t_k) for k = N−1..stop (``Sweep.kept``)."""
        grad_r = reward_grad_at_x1(self.model, self.reward, traj)
        return costate_sweep(traj.xs, traj.ts, -grad_r, self.hamiltonian(traj.cond), stop=stop,
                             params=self.model.trainable_parameters())

    def costate(self, traj: Trajectory, stop: int = 0) -> torch.Tensor:
        """a_k for k = N..stop along the trajectory [N+1, B, ...] (float32 or wider; NaN below stop)."""
        return self.sweep(traj, stop).costates

    # ---- one update ---------------------------------------------------------------------------------------
    def loss(self, traj: Trajectory, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        model, N, B = self.model, traj.n_steps, traj.xs.shape[1]
        first = 1 if self.cfg.target == "next" else 0   # a_0 is a target only with target: same
        swept = self.sweep(traj, stop=first)
        a = swept.costates

        # States: x_{N−1} (its target a_N = −∇r is exact and carries the reward directly) plus one per bin
        # (§1.7). Unlike VGG-Flow, x_0 is allowed: its costate target is as exact as any other, and the ODE
        # sampler does use v_θ at t_0 = 0.
        idx = binned_time_indices(N, self.cfg.subsample_bins, B, generator, include_last=True, min_index=0)
        x, t, cond, _, k, sample = gather_states(traj, idx)
        target_k = k + 1 if self.cfg.target == "next" else k
        a_k = a[target_k, sample].to(x.dtype)

        v_theta = model.velocity(x, t, cond)                                       # grad → θ
        # v_base from the sweep; only states below its stop (x_0 with target: next) are evaluated here
        v_base = kept_at(swept.kept, k, sample, first, lambda r: model.base_velocity(x[r], t[r], index_cond(cond, r)))
        loss = per_sample_mse(v_theta, (v_base - self.beta * a_k).detach()).mean()
        logs = {"loss_match": loss.item(), "costate_norm_1": per_sample_norms(a[-1]).mean().item(),
                "costate_norm_start": per_sample_norms(a[first]).mean().item(),
                "resid_norm": per_sample_norms((v_theta - v_base).detach()).mean().item()}
        return loss, logs
