"""Euler ODE sampler that records its trajectory and can run any stretch of the grid, with or without grad."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Trajectory:
    """States x_k at grid times t_k, k = start..end.

    xs: [K+1, B, ...] (detached unless integrated with grad; x_0 = xs[0] is the rollout's noise), ts: [K+1]
    float64 grid times, cond: the model's conditioning for this batch, prompts: the B prompts, extras: what an
    algorithm's rollout keeps for its loss (e.g. VGG-Flow's v_θ(x_k, t_k) as ``extras["vs"]``). reward_x1:
    r(decode(x_1)) [B] (fp32, detached) once an algorithm has computed it; the trainer logs it instead of scoring
    x_1 a second time.
    """

    xs: torch.Tensor
    ts: torch.Tensor
    cond: Any = None
    prompts: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    reward_x1: torch.Tensor | None = None

    @property
    def x1(self) -> torch.Tensor:
        return self.xs[-1]

    @property
    def n_steps(self) -> int:
        return self.xs.shape[0] - 1


def euler_integrate(
    velocity: VelocityFn,
    x: torch.Tensor,
    ts: torch.Tensor,
    start: int = 0,
    end: int | None = None,
    grad: bool = False,
    record: bool = True,
) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) with x_{k+1} = x_k + (t_{k+1} − t_k)·v(x_k, t_k) from grid index start to end.

    ``velocity(x, t)`` receives t as a [B] tensor in x's dtype. Returns [end−start+1, B, ...] when
    ``record`` (the states at every visited grid point, x included), else only the last state.
    With ``grad=False`` the integration runs under ``torch.no_grad``.
    """
    end = len(ts) - 1 if end is None else end
    if not 0 <= start <= end < len(ts):
        raise ValueError(f"bad stretch [{start}, {end}] for a grid of {len(ts) - 1} steps")
    grad = grad and torch.is_grad_enabled()
    x = x if grad else x.detach()
    states = [x]
    with torch.set_grad_enabled(grad):
        for k in range(start, end):
            t = torch.full((x.shape[0],), float(ts[k]), dtype=x.dtype, device=x.device)
            x = x + float(ts[k + 1] - ts[k]) * velocity(x, t)
            if record:
                states.append(x)
    return torch.stack(states) if record else x
