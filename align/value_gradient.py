"""The gradient-HJB of VGG-Flow (paper Eqs. 10–12, App. C.1), by finite differences with stop-gradiented directions.

With g = ∇_x V and β = 1/λ, the value gradient satisfies
    ∂_t g + J_gᵀ (v_base − β g) + J_{v_base}ᵀ g = 0,        g(x, 1) = −∇r(x).
J_g is a Hessian (symmetric) and J_{v_base} is symmetric for exact marginal fields, so the transposed
products are computed as directional derivatives (JVPs) by finite differences. Directions are detached,
so no second-order backprop ever happens; gradients reach φ only through the g evaluations.
"""
from __future__ import annotations

from typing import Callable

import torch

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rms(d: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square of a direction, shaped to broadcast."""
    r = d.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
    return r.reshape(-1, *([1] * (d.dim() - 1)))


def directional_derivative(f: Field, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, eps: float,
                           scheme: str = "central", f_x: torch.Tensor | None = None) -> torch.Tensor:
    """J_f(x, t)·d by a finite difference along the detached direction d.

    The step is ε·d/rms(d) (ε is per-coordinate, whatever the scale of d) and the result is rescaled by
    rms(d), so it is exact for linear f. ``forward`` reuses f_x = f(x, t) when given.
    """
    d = d.detach()
    s = _rms(d)
    step = eps * d / s
    if scheme == "central":
        return (f(x + step, t) - f(x - step, t)) * (s / (2 * eps))
    if scheme == "forward":
        f_x = f(x, t) if f_x is None else f_x
        return (f(x + step, t) - f_x) * (s / eps)
    raise ValueError(f"unknown finite-difference scheme {scheme!r}; valid choices: central, forward")


def time_derivative(f: Field, x: torch.Tensor, t: torch.Tensor, delta: float, scheme: str = "central",
                    f_x: torch.Tensor | None = None) -> torch.Tensor:
    """∂_t f(x, t) at fixed x (the partial derivative; transport is in the J_g term)."""
    if scheme == "central":
        return (f(x, t + delta) - f(x, t - delta)) / (2 * delta)
    if scheme == "forward":
        f_x = f(x, t) if f_x is None else f_x
        return (f(x, t + delta) - f_x) / delta
    raise ValueError(f"unknown finite-difference scheme {scheme!r}; valid choices: central, forward")


def consistency_residual(g: Field, v_base: Field, x: torch.Tensor, t: torch.Tensor, beta: float,
                         eps: float, delta: float, scheme: str = "central",
                         g_x: torch.Tensor | None = None, v_base_x: torch.Tensor | None = None,
                         time_scale: float = 1.0) -> torch.Tensor:
    """R = ∂_t g + J_gᵀ(v_base − β g) + J_{v_base}ᵀ g at (x, t), all by finite differences.

    ``g_x``/``v_base_x`` are g(x, t) and v_base(x, t) when already computed. ``time_scale`` multiplies
    ∂_t g (1 in the paper; the preview code's τ = 1000σ units correspond to 1e−3).
    """
    g_x = g(x, t) if g_x is None else g_x
    v_base_x = v_base(x, t) if v_base_x is None else v_base_x
    d_t = time_derivative(g, x, t, delta, scheme, f_x=g_x)
    direction = (v_base_x - beta * g_x).detach()
    d_x = directional_derivative(g, x, t, direction, eps, scheme, f_x=g_x)
    d_b = directional_derivative(v_base, x, t, g_x.detach(), eps, scheme, f_x=v_base_x)
    return time_scale * d_t + d_x + d_b
