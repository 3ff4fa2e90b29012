"""ReFL on flow matching (reference §4; VGG-Flow paper §5.1 baseline).

For each trajectory:
    k ~ Uniform{k_lo, …, k_hi − 1}                      (truncation step; {15..19} on the 20-step grid)
    x_k  = Euler ODE of the current v_θ from x_0 ~ N(0, I), without grad
    x̂_1 = sg(x_k) + (1 − t_k)·v_θ(sg(x_k), t_k)       (one-step prediction; grad through θ only)
    L(θ) = mean_b ℓ(r(decode(x̂_1)))                    ℓ = −ReLU(r) by default (algorithms/common/objectives.py)

The range ``truncation: [lo, hi)`` is written on a ``truncation_grid_steps``-step grid (20, the paper's).
On an N-step grid it keeps the same fraction of the step index: k ∈ {k : lo/G ≤ k/N < hi/G}, i.e.
k_lo = ⌈lo·N/G⌉, k_hi = ⌈hi·N/G⌉ (a fraction of steps, not of time: on the sd3 grid t_k is not k/N).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

import torch
from omegaconf import MISSING

from algorithms.common.objective_config import ObjectiveConfig
from align.core.interfaces import Algorithm
from algorithms.common.objectives import reward_loss
from align.core.registry import register_algorithm
from samplers import Trajectory, euler_integrate, one_step_prediction


@dataclass
class ReFLConfig(ObjectiveConfig):
    """``algo=refl``."""
    name: str = "refl"
    lr: float = MISSING             # paper: 1e-4 for every reward (AdamW, wd 1e-2, grad clip 1); preset: the paper's
    # k ~ Uniform{lo, ..., hi-1}, half-open [lo, hi), drawn per trajectory; [15, 20) = {15..19} on the paper's
    # 20-step grid (t_k ∈ {.552, ..., .991} on the sd3 grid); on other grids the same fraction of steps (above).
    truncation: List[int] = field(default_factory=lambda: [15, 20])
    truncation_grid_steps: int = 20  # G, the grid `truncation` is written on

    def validate(self) -> None:
        if len(self.truncation) != 2:
            raise ValueError(f"algo.truncation must be two integers [lo, hi), got {list(self.truncation)}")

    def validate_steps(self, n_steps: int) -> None:
        truncation_range(self.truncation, self.truncation_grid_steps, n_steps)


def truncation_range(truncation: Any, ref_steps: int, n_steps: int) -> tuple[int, int]:
    """[k_lo, k_hi) on the N-step grid for ``truncation`` = [lo, hi) on the ``ref_steps``-step grid."""
    try:
        lo, hi = truncation
    except (TypeError, ValueError):
        raise ValueError(f"algo.truncation must be two integers [lo, hi), got {truncation!r}") from None
    if not 0 <= lo < hi <= ref_steps:
        raise ValueError(f"algo.truncation=[{lo}, {hi}) must satisfy 0 <= lo < hi <= "
                         f"algo.truncation_grid_steps={ref_steps} (k = {ref_steps} would be the sample itself)")
    k_lo, k_hi = -(-lo * n_steps // ref_steps), -(-hi * n_steps // ref_steps)
    if k_lo >= k_hi:
        raise ValueError(f"algo.truncation=[{lo}, {hi}) of a {ref_steps}-step grid contains no step of the "
                         f"{n_steps}-step grid (sampler.steps); raise sampler.steps or widen algo.truncation")
    return k_lo, k_hi


@register_algorithm("refl", config=ReFLConfig)
class ReFL(Algorithm):
    """Backpropagate the reward of a one-step prediction from a late state (see the module docstring)."""

    def __init__(self, cfg: Any, model, reward, ts: torch.Tensor):
        super().__init__(cfg, model, reward, ts)       # self.cfg: an instance of its config dataclass
        cfg = self.cfg
        self.k_lo, self.k_hi = truncation_range(cfg.truncation, cfg.truncation_grid_steps, len(ts) - 1)

    def draw_truncation(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """k [n], one per trajectory, uniform on {k_lo, …, k_hi − 1}."""
        return torch.randint(self.k_lo, self.k_hi, (n,), generator=generator)

    def rollout(self, x0: torch.Tensor, prompts: list[str], cond: Any, generator: torch.Generator) -> Trajectory:
        # The whole no-grad ODE is run (not only up to max k) so the trainer can log r(x_1).
        k = self.draw_truncation(x0.shape[0], generator)
        xs = euler_integrate(lambda x, t: self.model.velocity(x, t, cond), x0, self.ts)
        return Trajectory(xs=xs, ts=self.ts, cond=cond, prompts=prompts, extras={"k": k})

    def loss(self, traj: Trajectory, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        k = traj.extras["k"]
        B = traj.xs.shape[1]
        x_k = traj.xs[k.to(traj.xs.device), torch.arange(B, device=traj.xs.device)].detach()
        t_k = traj.ts[k].to(x_k)
        x1_hat = one_step_prediction(x_k, t_k, self.model.velocity(x_k, t_k, traj.cond))
        loss, logs = reward_loss(self.model, self.reward, x1_hat, traj.prompts, self.cfg)
        logs["k_mean"] = k.float().mean().item()
        return loss, logs
