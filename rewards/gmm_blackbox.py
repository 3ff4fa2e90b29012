"""A black-box reward for ``model=gmm``: ``gmm_region``, a step in the direction c.

    r(x) = scale · 1[cᵀx > threshold]

Its gradient is zero everywhere but on the hyperplane cᵀx = threshold, where it does not exist, so only the
algorithms that need no reward gradient can use it (``differentiable = False``). Its mean over samples is the
probability mass beyond the hyperplane; the tilted target p(x) exp(r(x)/β) reweights the two half-spaces by
1 and exp(scale/β), a closed form on the Gaussian mixture (each component's mass beyond the plane is a normal CDF).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Sequence

import torch

from align.core.interfaces import Reward
from align.core.registry import register_reward


@dataclass
class GMMRegionConfig:
    """``reward=gmm_region`` (model=gmm): r(x) = scale · 1[cᵀx > threshold], a step (not differentiable)."""
    name: str = "gmm_region"
    direction: List[float] = field(default_factory=lambda: [1.0, 0.0])   # c
    threshold: float = 0.0          # the step's offset along c (0: the half-space of the default right mode)
    scale: float = 1.0              # the reward inside the region (0 outside)


@register_reward("gmm_region", config=GMMRegionConfig)
class GMMRegion(Reward):
    """r(x) = s · 1[cᵀx > threshold] with c = ``reward.direction``, s = ``reward.scale``."""

    name, domain, differentiable = "gmm_region", "gmm", False

    def __init__(self, direction: Sequence[float], threshold: float = 0.0, scale: float = 1.0, **_: Any):
        super().__init__()
        self.register_buffer("c", torch.as_tensor(direction, dtype=torch.float32).flatten())
        self.threshold, self.scale = float(threshold), float(scale)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        if images.dim() != 2 or images.shape[1] != self.c.numel():
            raise ValueError(f"reward.direction has {self.c.numel()} entries but the model's samples have shape "
                             f"{tuple(images.shape[1:])}")
        z = images.to(torch.promote_types(images.dtype, self.c.dtype))
        return self.scale * (z @ self.c.to(z.dtype) > self.threshold).to(z.dtype)
