"""Flow-GRPO's fixed point in closed form, for one Gaussian N(μ, Σ) and a linear reward r = cᵀx.

The base velocity is affine, v_base(x, t) = A_t x + b_t with A_t = (tΣ − (1 − t)I) C_t⁻¹, C_t = t²Σ + (1 − t)²I,
b_t = μ − tA_t μ (reference §6.1), so the reference SDE chain on a grid t_0 = 0 < … < t_N = 1,
    x_{k+1} = M_k x_k + m_k + s_k ε_k,   M_k = I + Δt_k [(1 + c_k t_k) A_{t_k} − c_k I],  m_k = Δt_k (1 + c_k t_k) b_{t_k},
    c_k = g_k²/(2(1 − t_k)),  g_k = a √((1 − t_k)/t_k) (t_0 = 0 replaced by t_1),  s_k = g_k √Δt_k,
is linear-Gaussian. With x_0 fixed, the path-KL-regularised optimum max E[λ r(x_N)] − KL(p(path | x_0) ‖
p_ref(path | x_0)) tilts the path law by exp(λ cᵀ x_N). Its value function is linear, V_k(x) = λ c_kᵀ x + const with
c_N = c and c_k = M_kᵀ c_{k+1}, so each optimal step is the reference step shifted by the constant
    δ_k = s_k² λ c_{k+1},
and x_N | x_0 is shifted by Σ_k Φ_{k+1} δ_k = λ Cov_ref(x_N | x_0) c, Φ_{k+1} = M_{N−1} ⋯ M_{k+1}, where
Cov_ref(x_N | x_0) follows Σ_{k+1} = M_k Σ_k M_kᵀ + s_k² I from Σ_0 = 0.
Flow-GRPO with the group-mean baseline and no std normalisation has λ = (1 − 1/G)/β (algorithms/flow_grpo.py);
with the leave-one-out baseline λ = 1/β.

Independent of samplers/flow_sde.py (matrices from the formulas above, no model, no autograd): the tests compare
the two.
"""
from __future__ import annotations

import math

import torch


def gaussian_affine_velocity(mu: torch.Tensor, cov: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_t, b_t) of v_base(x, t) = A_t x + b_t for the flow to N(μ, Σ) (float64)."""
    mu, cov = mu.double(), cov.double()
    eye = torch.eye(len(mu), dtype=torch.float64)
    C = t * t * cov + (1 - t) ** 2 * eye
    A = (t * cov - (1 - t) * eye) @ torch.linalg.inv(C)
    return A, mu - t * (A @ mu)


def reference_chain(mu: torch.Tensor, cov: torch.Tensor, ts: torch.Tensor, a: float):
    """The reference SDE chain's steps: lists of M_k [d, d], m_k [d] and the floats s_k, k = 0..N−1."""
    eye = torch.eye(len(mu), dtype=torch.float64)
    Ms, ms, ss = [], [], []
    for k in range(len(ts) - 1):
        t, dt = float(ts[k]), float(ts[k + 1] - ts[k])
        g2 = a * a * (1 - t) / (float(ts[k + 1]) if t == 0 else t)
        ck = g2 / (2 * (1 - t))
        A, b = gaussian_affine_velocity(mu, cov, t)
        Ms.append(eye + dt * ((1 + ck * t) * A - ck * eye))
        ms.append(dt * (1 + ck * t) * b)
        ss.append(math.sqrt(g2 * dt))
    return Ms, ms, ss


def conditional_cov(Ms: list[torch.Tensor], ss: list[float]) -> torch.Tensor:
    """Cov_ref(x_N | x_0): Σ_{k+1} = M_k Σ_k M_kᵀ + s_k² I from Σ_0 = 0."""
    d = Ms[0].shape[0]
    S = torch.zeros(d, d, dtype=torch.float64)
    for M, s in zip(Ms, ss):
        S = M @ S @ M.T + s * s * torch.eye(d, dtype=torch.float64)
    return S


def optimal_step_shifts(Ms: list[torch.Tensor], ss: list[float], c: torch.Tensor, lam: float) -> torch.Tensor:
    """δ_k = s_k² λ c_{k+1}, c_N = c, c_k = M_kᵀ c_{k+1}: [N, d]."""
    ck = c.double()
    out = []
    for M, s in zip(reversed(Ms), reversed(ss)):
        out.append(s * s * lam * ck)
        ck = M.T @ ck
    return torch.stack(out[::-1])


def terminal_shift(Ms: list[torch.Tensor], shifts: torch.Tensor) -> torch.Tensor:
    """x_N's shift Σ_k Φ_{k+1} δ_k from per-step shifts δ_k [N, d]."""
    out = torch.zeros(shifts.shape[1], dtype=torch.float64)
    for M, d in zip(Ms, shifts):
        out = M @ out + d
    return out


def tilt_shift(mu: torch.Tensor, cov: torch.Tensor, ts: torch.Tensor, a: float, c: torch.Tensor,
               lam: float) -> torch.Tensor:
    """λ Cov_ref(x_N | x_0) c: the optimum's mean shift of x_N given x_0 (the same for every x_0)."""
    Ms, _, ss = reference_chain(mu, cov, ts, a)
    return lam * conditional_cov(Ms, ss) @ c.double()
