"""DiffusionNFT's exact conditional minimiser on one Gaussian (``model=gmm`` with one component), computed from
scratch (closed forms and one-dimensional quadrature; nothing of algorithms/diffusion_nft.py).

Setting: training samples x_1 ~ N(m_1, P_1) (the old policy's samples: the base N(μ, Σ), or its Euler-ODE samples,
which are Gaussian too, ``euler_gaussian``); x_t = t x_1 + (1 − t) ε; u = x_1 − ε = (x_1 − x_t)/(1 − t); an
optimality map r(x_1) = ½ + ½·clip(cᵀx_1 / Z, −1, 1); any old field v_old(x_t) (the loss's, e.g. the base velocity).

At fixed (x_t, t) the DiffusionNFT loss E[r‖v⁺ − u‖² + (1 − r)‖v⁻ − u‖² | x_t], v± = v_old ± β(v − v_old), is a
quadratic in v with the stationary point
    β (v* − v_old) = 2 E[r u | x_t] − E[u | x_t] − (2α − 1) v_old,      α = E[r | x_t];
when v_old = E[u | x_t] (v_old is the exact velocity of the samples) this is the paper's theorem
    v* = v_old + (2/β)·α·(v⁺_r − v_old),   v⁺_r = E[r u | x_t] / α  (the velocity of the r-tilted samples).

Conditional moments: (x_1, x_t) is jointly Gaussian, x_1 | x_t ~ N(m, S). With z = cᵀx_1 ~ N(m_z, s²) given x_t,
x_1 = m + S c (z − m_z)/s² + w with w independent of z and E w = 0, hence
    E[r | x_t] = E[r(z)],   E[r x_1 | x_t] = m E[r(z)] + S c E[r(z)(z − m_z)] / s²,
two one-dimensional integrals done by the trapezoidal rule on a fine grid.
"""
from __future__ import annotations

import math

import torch


def euler_gaussian(mu: torch.Tensor, cov: torch.Tensor, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of x_N from the Euler ODE of the exact velocity of N(μ, Σ) on the grid ``ts`` from
    x_0 ~ N(0, I). That velocity is affine in x, v(x, t) = μ + (tΣ − (1 − t)I) C(t)⁻¹ (x − tμ) with
    C(t) = t²Σ + (1 − t)²I, so each step maps (mean, covariance) linearly: x ↦ (I + hM)x + h a."""
    mu, cov = mu.double(), cov.double()
    d = mu.numel()
    eye = torch.eye(d, dtype=torch.float64)
    m, P = torch.zeros(d, dtype=torch.float64), eye.clone()
    for k in range(len(ts) - 1):
        t, h = float(ts[k]), float(ts[k + 1] - ts[k])
        M = (t * cov - (1 - t) * eye) @ torch.linalg.inv(t ** 2 * cov + (1 - t) ** 2 * eye)
        a = mu - t * (M @ mu)
        F = eye + h * M
        m, P = F @ m + h * a, F @ P @ F.T
    return m, P


def posterior(m1: torch.Tensor, P1: torch.Tensor, x_t: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x_1 | x_t ~ N(m, S) for x_1 ~ N(m1, P1), x_t = t x_1 + (1 − t) ε: m [B, d], S [d, d]."""
    d = m1.numel()
    eye = torch.eye(d, dtype=torch.float64)
    C = t ** 2 * P1 + (1 - t) ** 2 * eye
    K = t * P1 @ torch.linalg.inv(C)                        # Cov(x_1, x_t) Var(x_t)⁻¹
    m = m1 + (x_t.double() - t * m1) @ K.T
    S = P1 - t * K @ P1
    return m, S


def optimality_map(z: torch.Tensor, Z: float) -> torch.Tensor:
    return 0.5 + 0.5 * torch.clamp(z / Z, -1.0, 1.0)


def _gauss_moments(mz: torch.Tensor, s: float, Z: float, n: int = 40001) -> tuple[torch.Tensor, torch.Tensor]:
    """E[r(z)] and E[r(z)(z − m_z)] for z ~ N(m_z, s²), per entry of m_z [B] (trapezoid on m_z ± 12 s)."""
    w = torch.linspace(-12.0, 12.0, n, dtype=torch.float64)
    dens = torch.exp(-0.5 * w ** 2) / math.sqrt(2 * math.pi)
    r = optimality_map(mz.unsqueeze(1) + s * w.unsqueeze(0), Z)          # [B, n]
    dw = float(w[1] - w[0])
    er = torch.trapezoid(r * dens, dx=dw, dim=1)
    erz = torch.trapezoid(r * dens * (s * w), dx=dw, dim=1)
    return er, erz


def conditional_minimiser(m1: torch.Tensor, P1: torch.Tensor, c: torch.Tensor, Z: float, beta: float,
                          x_t: torch.Tensor, t: float, v_old: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss's stationary point at (x_t [B, d], t < 1) and its parts (module docstring): ``v_star`` (general
    v_old), ``v_theorem`` (the paper's form), ``alpha``, ``Eu`` = E[u | x_t], ``Eru`` = E[r u | x_t], ``v_tilted``
    = v⁺_r, and ``v_pos`` = v_old + β (v_star − v_old), the implicit positive policy at the minimiser."""
    c, v_old = c.double(), v_old.double()
    m, S = posterior(m1.double(), P1.double(), x_t, t)
    Sc = S @ c
    s2 = float(c @ Sc)
    er, erz = _gauss_moments(m @ c, math.sqrt(s2), Z)
    erx = m * er.unsqueeze(1) + erz.unsqueeze(1) * Sc.unsqueeze(0) / s2   # E[r x_1 | x_t]
    x_t = x_t.double()
    Eu = (m - x_t) / (1 - t)
    Eru = (erx - er.unsqueeze(1) * x_t) / (1 - t)
    alpha = er.unsqueeze(1)
    v_star = v_old + (2 * Eru - Eu - (2 * alpha - 1) * v_old) / beta
    v_tilted = Eru / alpha
    return {"v_star": v_star, "v_theorem": v_old + (2 / beta) * alpha * (v_tilted - v_old), "alpha": er,
            "Eu": Eu, "Eru": Eru, "v_tilted": v_tilted, "v_pos": v_old + beta * (v_star - v_old)}
