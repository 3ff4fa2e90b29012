"""Analytic rewards for ``model=gmm``: exact tilts and optimal controls exist for these (reference §6)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Sequence

import torch

from align.core.interfaces import Reward
from align.core.registry import register_reward


@dataclass
class LinearConfig:
    """``reward=linear`` (model=gmm): r(x) = scale · cᵀx; the tilted target and the control optimum are known in
    closed form."""
    name: str = "linear"
    direction: List[float] = field(default_factory=lambda: [1.0, 0.0])   # c
    scale: float = 1.0              # r × scale (with β ÷ scale every algorithm trains the same model)


@register_reward("linear", config=LinearConfig)
class LinearReward(Reward):
    """r(x) = s·cᵀx with c = ``reward.direction`` and s = ``reward.scale``."""

    name, domain = "linear", "gmm"

    def __init__(self, direction: Sequence[float], scale: float = 1.0, **_: Any):
        super().__init__()
        self.register_buffer("c", torch.as_tensor(direction, dtype=torch.float32).flatten())
        self.scale = float(scale)

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        _check_dim(images, self.c.numel(), "reward.direction")
        z = images.to(torch.promote_types(images.dtype, self.c.dtype))
        return self.scale * (z @ self.c.to(z.dtype))


@dataclass
class QuadraticConfig:
    """``reward=quadratic`` (model=gmm): r(x) = −scale · ½ (x − m)ᵀ Q (x − m)."""
    name: str = "quadratic"
    center: List[float] = field(default_factory=lambda: [1.0, 1.0])                    # m
    precision: List[List[float]] = field(default_factory=lambda: [[1.0, 0.0], [0.0, 1.0]])  # Q
    scale: float = 1.0              # r × scale (with β ÷ scale every algorithm trains the same model)


@register_reward("quadratic", config=QuadraticConfig)
class QuadraticReward(Reward):
    """r(x) = −½ s (x − m)ᵀ Q (x − m) with m = ``reward.center``, Q = ``reward.precision`` (symmetric PSD) and
    s = ``reward.scale``."""

    name, domain = "quadratic", "gmm"

    def __init__(self, center: Sequence[float], precision: Sequence[Sequence[float]], scale: float = 1.0,
                 **_: Any):
        super().__init__()
        self.scale = float(scale)
        m = torch.as_tensor(center, dtype=torch.float32).flatten()
        Q = torch.as_tensor(precision, dtype=torch.float32)
        if Q.shape != (m.numel(), m.numel()):
            raise ValueError(f"reward.precision must be {m.numel()}x{m.numel()} to match reward.center, "
                             f"got shape {tuple(Q.shape)}")
        if not torch.allclose(Q, Q.T):
            raise ValueError("reward.precision must be symmetric")
        self.register_buffer("m", m)
        self.register_buffer("Q", Q)

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        _check_dim(images, self.m.numel(), "reward.center")
        z = images.to(torch.promote_types(images.dtype, self.m.dtype)) - self.m       # fp32, or fp64 if either is
        return -0.5 * self.scale * ((z @ self.Q.to(z.dtype)) * z).sum(-1)


def _check_dim(x: torch.Tensor, d: int, key: str) -> None:
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"{key} has {d} entries but the model's samples have shape {tuple(x.shape[1:])}")
