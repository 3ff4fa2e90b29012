"""Exact references on ``model=gmm`` (reference §6): the tilted target and the deterministic control optimum.

* Tilt (AM's target): p*(x) ∝ p_base(x) exp(β r(x)) for linear and quadratic r is again a GMM (§6.2).
* Deterministic optimum (what VGG-Flow and VGG-Flow-PMP converge to, §6.3): per particle,
  min_u (1/2β) ∫₀¹ ‖u‖² dt − r(x_1) with ẋ = v_base(x, t) + u, solved by shooting on a fine grid:
  a_N = −∇r(x_N), a_k = a_{k+1} + h J_{v_base}(x_k)ᵀ a_{k+1}, u_k = −β a_{k+1}, damped fixed point.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from align.models.gmm import gmm_velocity

GMM = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (weights π [K], means μ [K, d], covariances Σ [K, d, d])


def tilt_linear(pi: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor, c: torch.Tensor, beta: float) -> GMM:
    """p ∝ p_base · exp(β cᵀx): π' ∝ π exp(β cᵀμ + ½β² cᵀΣc), μ' = μ + βΣc, Σ' = Σ."""
    pi, mu, cov, c = pi.double(), mu.double(), cov.double(), c.double()
    sc = cov @ c                                                   # [K, d]
    logw = torch.log(pi) + beta * (mu @ c) + 0.5 * beta ** 2 * (sc @ c)
    return torch.softmax(logw, 0), mu + beta * sc, cov.clone()


def tilt_quadratic(pi: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor, m: torch.Tensor, Q: torch.Tensor,
                   beta: float) -> GMM:
    """p ∝ p_base · exp(−½β (x − m)ᵀQ(x − m)) (reference §6.2)."""
    pi, mu, cov, m, Q = pi.double(), mu.double(), cov.double(), m.double(), Q.double()
    prec = torch.linalg.inv(cov)
    cov2 = torch.linalg.inv(prec + beta * Q)
    mu2 = (cov2 @ ((prec @ mu.unsqueeze(-1)).squeeze(-1) + beta * (Q @ m)).unsqueeze(-1)).squeeze(-1)
    quad2 = (mu2.unsqueeze(1) @ torch.linalg.solve(cov2, mu2.unsqueeze(-1))).reshape(-1)
    quad1 = (mu.unsqueeze(1) @ (prec @ mu.unsqueeze(-1))).reshape(-1)
    logw = (torch.log(pi) + 0.5 * torch.logdet(cov2) - 0.5 * torch.logdet(cov) + 0.5 * quad2 - 0.5 * quad1
            - 0.5 * beta * (m @ Q @ m))
    return torch.softmax(logw, 0), mu2, cov2


def gmm_moments(pi: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of a Gaussian mixture."""
    mean = pi @ mu
    dev = mu - mean
    second = (pi.reshape(-1, 1, 1) * (cov + dev.unsqueeze(-1) * dev.unsqueeze(-2))).sum(0)
    return mean, second


def deterministic_optimum(x0: torch.Tensor, pi: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor,
                          grad_r: Callable[[torch.Tensor], torch.Tensor], beta: float, n_steps: int = 400,
                          damping: float = 0.5, tol: float = 1e-7, max_iter: int = 500) -> torch.Tensor:
    """x_1 of the per-particle optimum of the relaxed problem (reference §6.3), from starting points x0 [n, d]."""
    log_pi = torch.log(pi.double() / pi.double().sum())
    mu, cov = mu.double(), cov.double()
    x0 = x0.double()
    ts = torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64)
    h = 1.0 / n_steps
    u = torch.zeros(n_steps, *x0.shape, dtype=torch.float64)

    def v_base(x: torch.Tensor, k: int) -> torch.Tensor:
        return gmm_velocity(x, ts[k].expand(x.shape[0]), log_pi, mu, cov)

    for _ in range(max_iter):
        xs = [x0]
        for k in range(n_steps):
            xs.append(xs[-1] + h * (v_base(xs[-1], k) + u[k]))
        a = -grad_r(xs[-1])
        u_new = torch.empty_like(u)
        for k in reversed(range(n_steps)):
            u_new[k] = -beta * a
            x = xs[k].detach().requires_grad_(True)
            (vjp,) = torch.autograd.grad(v_base(x, k), x, grad_outputs=a)
            a = a + h * vjp
        change = (u_new - u).abs().max().item()
        if not torch.isfinite(u_new).all():
            raise RuntimeError("deterministic_optimum diverged; lower the damping (the problem may be non-convex)")
        u = (1 - damping) * u + damping * u_new
        if change < tol:
            break
    else:
        warnings.warn(f"deterministic_optimum did not converge in {max_iter} iterations (last change {change:.2e}); "
                      "for non-convex problems (mixtures) use a direct minimiser of the discrete cost",
                      RuntimeWarning, stacklevel=2)
    x = x0
    for k in range(n_steps):
        x = x + h * (v_base(x, k) + u[k])
    return x


def linear_shift_single_gaussian(cov: torch.Tensor, c: torch.Tensor, beta: float, n_quad: int = 4001) -> torch.Tensor:
    """Closed form for one Gaussian with r = cᵀx: the optimum shifts every particle by β ∫₀¹ Φ(1,s)Φ(1,s)ᵀ ds c,
    Φ(1,s) = C_1^{1/2} C_s^{-1/2}, C_s = s²Σ + (1 − s)² I (all functions of Σ, so they commute)."""
    evals, evecs = torch.linalg.eigh(cov.double())
    s = torch.linspace(0.0, 1.0, n_quad, dtype=torch.float64).unsqueeze(1)
    phi2 = evals / (s ** 2 * evals + (1 - s) ** 2)                  # eigenvalues of Φ Φᵀ = C_1 C_s⁻¹
    integral = torch.trapezoid(phi2, s.squeeze(1), dim=0)
    return beta * evecs @ (integral * (evecs.T @ c.double()))
