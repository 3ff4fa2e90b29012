"""Discrete fixed points of Adjoint Matching and VGG-Flow-PMP in closed form, for one Gaussian and r = cᵀx.

Base N(μ, Σ): v_base(x, t) = μ + A_t (x − tμ), A_t = (tΣ − (1 − t)I) C_t⁻¹, C_t = t²Σ + (1 − t)²I (reference §6.1).
Every Euler map is then affine with an x-independent Jacobian, so the lean adjoint (AM) and the costate (PMP) are
deterministic and x-independent, and each algorithm's discrete fixed point is a per-step constant residual ṽ_k.
The sampler (the trainer's evaluator) is the Euler ODE x_{k+1} = x_k + Δt_k (v_base + ṽ_k) on the model's grid;
the Euler map of an affine field keeps the mean t_kμ exactly, so the mean shift it produces,
    shift = Σ_k Φ_{N,k+1} Δt_k ṽ_k,   Φ_{N,j} = Π_{i ≥ j} (I + Δt_i A_{t_i}),
is the whole effect of the control and compares directly with
* the tilt's mean shift βΣc (AM's target, reference §6.2), and
* the continuous-time deterministic optimum's shift β ∫₀¹ Φ(1,s)Φ(1,s)ᵀ ds c (PMP's target, §6.3;
  ``experiments.exact.continuous.linear_shift_single_gaussian``).

This module re-derives the algorithms' discrete recursions with matrices (no autograd, no model), as an
independent check of ``algorithms/adjoint_matching.py`` and ``algorithms/vggflow_pmp.py``.

AM on a training grid s_0 < … < s_M (SDE rollout, lean adjoint and loss there), Euler–Maruyama of the memoryless
SDE with offset h, last step a noiseless base Euler step:
    ã_M = −βc,  ã_{M−1} = (I + Δs A)ᵀ ã_M,  ã_j = (I + Δs_j (2A_{s_j} − I/(s_j + h)))ᵀ ã_{j+1},
    fixed point ṽ(s_j) = −(σ_j²/2) ã_{j+1},  σ_j² = 2(1 − s_j + h)/(s_j + h).
When the sampler's times are not training times, ṽ is read off by linear interpolation in t (extrapolated
linearly beyond the last training time s_{M−1}): a stand-in for the network's own interpolation in t.
PMP on the sampler's grid: a_N = −c, a_k = (I + Δt_k A_{t_k})ᵀ a_{k+1}, ṽ_k = −β a_{k+1}.
"""
from __future__ import annotations

import torch


def _affine_jacobian(cov: torch.Tensor, t: float) -> torch.Tensor:
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=torch.float64)
    C = t * t * cov + (1 - t) ** 2 * eye
    return torch.linalg.solve(C, t * cov - (1 - t) * eye).T      # (tΣ − (1−t)I) C⁻¹ (the factors commute)


def am_fixed_point(cov: torch.Tensor, c: torch.Tensor, beta: float, train_ts: torch.Tensor,
                   h: float) -> torch.Tensor:
    """AM's discrete fixed point ṽ(s_j), j = 0..M−1, on the training grid: [M, d]."""
    cov, c = cov.double(), c.double()
    eye = torch.eye(len(c), dtype=torch.float64)
    m = len(train_ts) - 1
    a = -beta * c
    out = torch.empty(m, len(c), dtype=torch.float64)
    for j in range(m - 1, -1, -1):
        s, ds = float(train_ts[j]), float(train_ts[j + 1] - train_ts[j])
        out[j] = -((1 - s + h) / (s + h)) * a                      # −(σ_j²/2) ã_{j+1}
        A = _affine_jacobian(cov, s)
        J = A if j == m - 1 else 2 * A - eye / (s + h)
        a = (eye + ds * J).T @ a
    return out


def interpolate_in_t(grid: torch.Tensor, values: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """values [M, d] at grid[:M] read off at ts (piecewise linear in t, linear extrapolation at both ends)."""
    g = grid[: len(values)].double()
    out = []
    for t in ts.tolist():
        j = int(torch.searchsorted(g, torch.tensor(t, dtype=torch.float64), right=True)) - 1
        j = min(max(j, 0), len(g) - 2)
        w = (t - float(g[j])) / float(g[j + 1] - g[j])
        out.append((1 - w) * values[j] + w * values[j + 1])
    return torch.stack(out)


def ode_mean_shift(cov: torch.Tensor, residual: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Σ_k Φ_{N,k+1} Δt_k ṽ_k for the Euler ODE with v_base + ṽ_k on the grid ts (residual [N, d])."""
    shift = torch.zeros(residual.shape[1], dtype=torch.float64)
    for k in range(len(ts) - 1):
        dt = float(ts[k + 1] - ts[k])
        shift = shift + dt * (_affine_jacobian(cov.double(), float(ts[k])) @ shift + residual[k])
    return shift


def am_mean_shift(cov: torch.Tensor, c: torch.Tensor, beta: float, train_ts: torch.Tensor, h: float,
                  sample_ts: torch.Tensor) -> torch.Tensor:
    """Mean shift of the ODE on ``sample_ts`` driven by AM's fixed point trained on ``train_ts``."""
    v = am_fixed_point(cov, c, beta, train_ts, h)
    same = len(train_ts) == len(sample_ts) and torch.allclose(train_ts.double(), sample_ts.double())
    if not same:
        v = interpolate_in_t(train_ts, v, sample_ts[:-1])
    return ode_mean_shift(cov, v, sample_ts)


def pmp_mean_shift(cov: torch.Tensor, c: torch.Tensor, beta: float, ts: torch.Tensor) -> torch.Tensor:
    """Mean (= per-particle) shift of PMP's discrete fixed point ṽ_k = −β a_{k+1} on the grid ts."""
    cov, c = cov.double(), c.double()
    eye = torch.eye(len(c), dtype=torch.float64)
    n = len(ts) - 1
    a = -c
    v = torch.empty(n, len(c), dtype=torch.float64)
    for k in range(n - 1, -1, -1):
        v[k] = -beta * a
        a = (eye + float(ts[k + 1] - ts[k]) * _affine_jacobian(cov, float(ts[k]))).T @ a
    return ode_mean_shift(cov, v, ts)


def uncontrolled_sde_variance_ratio(cov: torch.Tensor, train_ts: torch.Tensor, h: float, k_max: int = 3) -> list[float]:
    """Var(X_k) of AM's uncontrolled memoryless SDE (Euler–Maruyama, x_0 ~ N(0, I)) over the base marginal's C_{t_k},
    largest ratio over the eigen-directions of Σ, for k = 1..k_max."""
    cov = cov.double()
    d = cov.shape[-1]
    eye = torch.eye(d, dtype=torch.float64)
    S = eye.clone()
    out = []
    for k in range(k_max):
        t, dt = float(train_ts[k]), float(train_ts[k + 1] - train_ts[k])
        M = eye + dt * (2 * _affine_jacobian(cov, t) - eye / (t + h))
        S = M @ S @ M.T + dt * 2 * (1 - t + h) / (t + h) * eye
        tn = float(train_ts[k + 1])
        C = tn * tn * cov + (1 - tn) ** 2 * eye
        evals, evecs = torch.linalg.eigh(C)
        out.append(float(((evecs.T @ S @ evecs).diagonal() / evals).max()))
    return out
