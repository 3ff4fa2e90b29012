"""DRaFT on flow matching (reference §4; VGG-Flow paper §5.1 baseline, Fig. 17 "DRaFT-LV").

Grid t_0 = 0 < … < t_N = 1, Euler steps x_{j+1} = x_j + (t_{j+1} − t_j)·v_θ(x_j, t_j).

DRaFT-K (``variant: k``):
    x_{N−K} = Euler ODE of v_θ from x_0, without grad
    x_N     = the last K Euler steps from sg(x_{N−K}), with grad through θ and through the x-chain
    L(θ)    = mean_b ℓ(r(decode(x_N)))
  ``k_random: true`` draws K ~ Uniform{1..k} once per trajectory (never per step).

DRaFT-LV (``variant: lv``, K = 1 with lower variance; the DRaFT paper's estimator, Clark et al., ICLR 2024):
    x_N     = Euler ODE of v_θ from x_0, without grad;   σ = 1 − t_{N−1}
    x̃^(i)  = (1 − σ)·sg(x_N) + σ·ε_i,  ε_i ~ N(0, I),  i = 1..n
    x̂^(i)  = x̃^(i) + (1 − t_{N−1})·v_θ(x̃^(i), t_{N−1})            (grad through θ)
    L(θ)    = (1/n) Σ_i mean_b ℓ(r(decode(x̂^(i))))        (``lv_reduce: mean``, default)
            =       Σ_i mean_b ℓ(r(decode(x̂^(i))))        (``lv_reduce: sum``)
  Mean or sum over the n copies: the DRaFT paper's own pseudo-code (Algorithm 2) could not be retrieved to check
  it (the recollection is that it accumulates, i.e. sums, the n per-copy reward gradients; reference §4 [MEM]).
  The default stays ``mean``; ``sum`` is the same gradient times n. Under AdamW the two differ only through
  Adam's ε, the weight decay's relative weight and the grad-norm clip.
  ``lv_include_last: true`` is RuoyuWang-2077/FlowBP's form (``flowbp/trainers/sd35/draft_lv.py``): the un-noised
  last step x̂^(0) = x_{N−1} + (1 − t_{N−1})·v_θ(x_{N−1}, t_{N−1}) (DRaFT-1, with grad) is an (n + 1)-th row
  beside the n re-noised ones, and the mean runs over the n + 1 (one more v_θ and reward gradient per sample).

CFG: v_θ is the guided field of the model; under grad its unconditional branch is detached from θ but not
from x (align/models/flow_transformer.py), so DRaFT-K's x-chain carries w J_cond + (1 − w) J_uncond.

ℓ = −ReLU(r) by default (algorithms/common/objectives.py).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import MISSING

from algorithms.common.objective_config import ObjectiveConfig
from align.core.batching import index_cond, per_sample
from align.core.interfaces import Algorithm
from algorithms.common.objectives import reward_loss
from align.core.registry import register_algorithm
from samplers import Trajectory, euler_integrate, one_step_prediction

Variant = enum.StrEnum("Variant", "lv k")
LvReduce = enum.StrEnum("LvReduce", "mean sum")


@dataclass
class DRaFTConfig(ObjectiveConfig):
    """``algo=draft``."""
    name: str = "draft"
    lr: float = MISSING             # paper: 1e-4 for every reward (AdamW, wd 1e-2, grad clip 1); preset: the paper's
    # lv (the paper's Fig. 17 "DRaFT-LV"): re-noise the final sample n times to t_{N-1}, one step with grad;
    # k: no grad for the first N − K steps, the last K Euler steps with grad through θ and the x-chain.
    variant: Variant = Variant.lv
    n: int = 2                      # lv: re-noised copies per sample (DRaFT: 2)
    # lv: mean | sum of the n copies' losses (sum = n × the mean's gradient; the DRaFT paper's Algorithm 2 was not
    # checked, see above)
    lv_reduce: LvReduce = LvReduce.mean
    lv_include_last: bool = False   # lv: also the un-noised last step from x_{N−1} as a row (FlowBP's form)
    k: int = 1                      # k: steps with grad (DRaFT recommends 1; the VGG paper does not report K)
    k_random: bool = False          # k: true draws K ~ Uniform{1..k} once per trajectory

    def validate(self) -> None:
        if self.variant == "lv" and self.n < 1:
            raise ValueError(f"algo.n={self.n} must be >= 1 (re-noised copies per sample)")


@register_algorithm("draft", config=DRaFTConfig)
class DRaFT(Algorithm):
    """Backpropagate the reward through the last K sampler steps (see the module docstring)."""

    def __init__(self, cfg: Any, model, reward, ts: torch.Tensor):
        super().__init__(cfg, model, reward, ts)       # self.cfg: an instance of its config dataclass
        cfg = self.cfg
        N = len(ts) - 1
        if cfg.variant == "k" and not 1 <= cfg.k <= N:
            raise ValueError(f"algo.k={cfg.k} must be between 1 and sampler.steps={N}")

    def draw_k(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """K [n]: the configured k, or K ~ Uniform{1..k} per trajectory when ``k_random``."""
        if self.cfg.k_random:
            return torch.randint(1, self.cfg.k + 1, (n,), generator=generator)
        return torch.full((n,), self.cfg.k, dtype=torch.long)

    # ---- rollout ------------------------------------------------------------------------------------
    def rollout(self, x0: torch.Tensor, prompts: list[str], cond: Any, generator: torch.Generator) -> Trajectory:
        if self.cfg.variant == "lv":
            return super().rollout(x0, prompts, cond, generator)
        # DRaFT-K: the last K steps are taken here, with grad, so x_N carries the graph into loss().
        def v(x, t):
            return self.model.velocity(x, t, cond)

        N, K = len(self.ts) - 1, self.draw_k(x0.shape[0], generator)
        start = (N - K).to(x0.device)                         # first step with grad, per trajectory
        s0 = int(start.min())
        early = euler_integrate(v, x0.detach(), self.ts, 0, s0)
        states, x = list(early), early[-1]
        for j in range(s0, N):
            x_next = euler_integrate(v, x, self.ts, j, j + 1, grad=True, record=False)
            # Trajectories whose window starts later stay on the no-grad path.
            waiting = per_sample(j + 1 <= start, x)
            x = torch.where(waiting, x_next.detach(), x_next)
            states.append(x)
        return Trajectory(xs=torch.stack(states), ts=self.ts, cond=cond, prompts=prompts, extras={"K": K})

    # ---- loss ---------------------------------------------------------------------------------------
    def loss(self, traj: Trajectory, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        if self.cfg.variant == "k":
            loss, logs = reward_loss(self.model, self.reward, traj.x1, traj.prompts, self.cfg)
            logs["K_mean"] = traj.extras["K"].float().mean().item()
            return loss, logs
        return self.lv_loss(traj, generator)

    def lv_loss(self, traj: Trajectory, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        n, (B, *shape) = self.cfg.n, traj.x1.shape
        x_N = traj.x1.detach()
        t_last = float(traj.ts[-2])
        sigma = 1.0 - t_last
        eps = torch.randn((n, B, *shape), generator=generator, dtype=torch.float32).to(x_N)
        x_tilde = ((1.0 - sigma) * x_N.unsqueeze(0) + sigma * eps).flatten(0, 1)   # [n·B, ...], copy-major
        rows = torch.arange(B).repeat(n)
        cond = index_cond(traj.cond, rows)
        copies = n
        if self.cfg.lv_include_last:           # FlowBP: x_{N−1}'s own last step (DRaFT-1) as the copy i = 0
            x_tilde = torch.cat([traj.xs[-2].detach().to(x_tilde), x_tilde])
            rows, copies = torch.cat([torch.arange(B), rows]), n + 1
            cond = index_cond(traj.cond, rows)
        t = torch.full((copies * B,), t_last, dtype=x_N.dtype, device=x_N.device)
        x_hat = one_step_prediction(x_tilde, t, self.model.velocity(x_tilde, t, cond))
        # The mean over all rows is (1/copies) Σ_i of the per-copy batch means; ``sum`` multiplies it by the copies.
        loss, logs = reward_loss(self.model, self.reward, x_hat, [traj.prompts[i] for i in rows.tolist()], self.cfg)
        if self.cfg.lv_reduce == "sum":
            loss = loss * copies
        logs["renoise_sigma"] = sigma
        return loss, logs
