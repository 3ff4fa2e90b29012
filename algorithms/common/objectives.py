"""The reward objective of the direct-backpropagation baselines (ReFL, DRaFT; reference §4).

Per-sample loss to minimise, from the reward r = r(decode(x̂)):
    relu  (paper default, "for stable training"):  ℓ = −ReLU(r)
    hinge:                                          ℓ = ReLU(c − r),  c = ``hinge_c``
    raw:                                            ℓ = −r
"""
from __future__ import annotations

from typing import Any

import torch

from align.core.interfaces import FlowModel, Reward

OBJECTIVES = ("relu", "hinge", "raw")


def objective_loss(r: torch.Tensor, objective: str, hinge_c: float = 0.0) -> torch.Tensor:
    """ℓ(r) per sample [B] (see the module docstring)."""
    if objective == "relu":
        return -torch.relu(r)
    if objective == "hinge":
        return torch.relu(hinge_c - r)
    if objective == "raw":
        return -r
    raise ValueError(f"unknown objective {objective!r}; valid choices: {', '.join(OBJECTIVES)}")


def reward_loss(model: FlowModel, reward: Reward, x: torch.Tensor, prompts: list[str], cfg: Any
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """mean_b ℓ(r(decode(x_b))), differentiable through x, with ``cfg`` an ``ObjectiveConfig`` (objective, hinge_c;
    algorithms/common/objective_config.py); logs the reward and the objective's active fraction."""
    r = reward(model.decode(x).float(), prompts).float()
    loss = objective_loss(r, cfg.objective, cfg.hinge_c)
    active = (r > 0) if cfg.objective == "relu" else (r < cfg.hinge_c)
    logs = {"reward_pred": r.mean().item()}
    if cfg.objective != "raw":
        logs["objective_active"] = active.float().mean().item()
    return loss.mean(), logs
