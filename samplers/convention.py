"""The one piece of flow math every algorithm shares: the one-step data prediction."""
from __future__ import annotations

import torch


def one_step_prediction(x: torch.Tensor, t: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
    """x̂_1 = x_t + (1 − t)·v(x_t, t): where a straight Euler step from t lands at t = 1."""
    return x + _bcast(1.0 - _as_tensor(t, x), x) * v


def _as_tensor(t, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(t, dtype=like.dtype, device=like.device)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample times [B] (or a scalar) shaped to broadcast against x [B, ...]."""
    if t.dim() == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))
