"""Flow-GRPO's SDE (Liu et al. 2025, arXiv 2505.05470): the reverse-time SDE with the flow's marginals, in the
paper's convention here (t = 0 noise, t = 1 data, dx/dt = v).

With σ = 1 − t (SD3's), x_t = t x_1 + σ x_0 has the score ∇ log p_t(x) = (t v(x, t) − x)/σ, so for any noise
schedule g_t the SDE
    dx = [v + (g_t²/(2σ)) (t v − x)] dt + g_t dW,   g_t = a √(σ/(1 − σ)) = a √((1 − t)/t),
has the marginals of the ODE dx = v dt (a: the noise level, paper 0.7; a = 0 is the ODE itself).
Euler–Maruyama on a grid t_0 < … < t_N, Δt_k = t_{k+1} − t_k: x_{k+1} ~ N(μ_k(x_k), s_k² I) with
    μ_k(x) = x + Δt_k b(x, t_k),   s_k = g_{t_k} √Δt_k.
At t_0 = 0 the schedule is singular (g_0 = ∞); flow_grpo (sd3_sde_with_logprob.py) replaces 1 − σ = t by the
next grid time there (``sigma == 1 → sigma_max = sigmas[1]``): g_0 = a √(1/t_1). On a uniform grid the first
step's std is then exactly a (s_0² = a²·Δt_0/t_1), whatever N: the first step is an O(1) jump, not an Euler step of
the SDE, and the chain's marginals converge to the flow's only slowly as Δt → 0 (docs/flow_grpo.md, "Marginals").
The last step (t_{N−1} → 1) is stochastic with its own std, as in flow_grpo: x_N is not noise-free.

Transition densities: log N(x'; μ, s² I), reduced over the dimensions by ``mean`` (flow_grpo averages) or ``sum``
(the exact log-likelihood); the KL between two steps with the same std is ‖μ_p − μ_q‖²/(2 s²), reduced alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from samplers.convention import _bcast

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
REDUCTIONS = ("mean", "sum")


def flow_sde_noise_level(ts: torch.Tensor, k: int, a: float) -> float:
    """g at grid time t_k: a √((1 − t_k)/t_k), with t_k = 0 replaced by t_{k+1} (flow_grpo's σ = 1 rule)."""
    t = float(ts[k])
    denom = float(ts[k + 1]) if t == 0.0 else t
    return a * math.sqrt((1.0 - t) / denom)


def flow_sde_step_std(ts: torch.Tensor, k: int, a: float) -> float:
    """s_k = g_{t_k} √Δt_k, the std of the step k → k+1."""
    return flow_sde_noise_level(ts, k, a) * math.sqrt(float(ts[k + 1] - ts[k]))


def flow_sde_step_stds(ts: torch.Tensor, a: float) -> torch.Tensor:
    """s_k for k = 0..N−1 (float64 [N])."""
    return torch.tensor([flow_sde_step_std(ts, k, a) for k in range(len(ts) - 1)], dtype=torch.float64)


def flow_sde_step_mean(x: torch.Tensor, v: torch.Tensor, t, dt, g) -> torch.Tensor:
    """μ = x + Δt [v + (g²/(2σ)) (t v − x)], σ = 1 − t; t, Δt, g floats or per-sample [B] tensors."""
    t, dt, g = (_bcast(torch.as_tensor(z, dtype=x.dtype, device=x.device), x) for z in (t, dt, g))
    return x + dt * (v + g.square() / (2.0 * (1.0 - t)) * (t * v - x))


def _reduce(elementwise: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r}; valid choices: {', '.join(REDUCTIONS)}")
    flat = elementwise.flatten(1)
    return flat.mean(1) if reduce == "mean" else flat.sum(1)


def _working(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (flow_grpo: bf16 overflows in these sums); fp64 stays fp64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std, reduce: str = "mean") -> torch.Tensor:
    """log N(x_next; mean, std² I) per sample [B], reduced over the dimensions (``mean`` | ``sum``)."""
    x_next, mean = _working(x_next), _working(mean)
    s = _bcast(torch.as_tensor(std, dtype=mean.dtype, device=mean.device), mean)
    z = (x_next - mean) / s
    return _reduce(-0.5 * z.square() - torch.log(s) - 0.5 * math.log(2.0 * math.pi), reduce)


def gaussian_kl_same_std(mean_p: torch.Tensor, mean_q: torch.Tensor, std, reduce: str = "mean") -> torch.Tensor:
    """KL(N(mean_p, s² I) ‖ N(mean_q, s² I)) = ‖mean_p − mean_q‖²/(2 s²) per sample [B], reduced alike."""
    mean_p, mean_q = _working(mean_p), _working(mean_q)
    s = _bcast(torch.as_tensor(std, dtype=mean_p.dtype, device=mean_p.device), mean_p)
    return _reduce((mean_p - mean_q).square() / (2.0 * s.square()), reduce)


@dataclass
class SDERollout:
    """xs [N+1, B, ...] states; stds [N] (float64) step stds s_k; log_probs [N, B] log p(x_{k+1} | x_k) of the
    sampled transitions under the rolled-out policy (None when a = 0); means [N, B, ...] (when kept)."""
    xs: torch.Tensor
    stds: torch.Tensor
    log_probs: torch.Tensor | None
    means: torch.Tensor | None = None


def flow_sde_integrate(velocity: VelocityFn, x: torch.Tensor, ts: torch.Tensor, a: float,
                       generator: torch.Generator | None = None, reduce: str = "mean",
                       keep_means: bool = False) -> SDERollout:
    """Euler–Maruyama of the marginal-preserving SDE on ``ts`` with noise level ``a`` (no grad); every step,
    the last included, is stochastic. Noise is drawn on the CPU from ``generator`` (runs reproduce across
    devices). ``velocity(x, t)`` receives t as a [B] tensor in x's dtype."""
    if a < 0:
        raise ValueError(f"the noise level a must be >= 0, got {a}")
    n = len(ts) - 1
    states, means, log_probs = [x], [], []
    stds = flow_sde_step_stds(ts, a)
    with torch.no_grad():
        for k in range(n):
            tk, dt = float(ts[k]), float(ts[k + 1] - ts[k])
            tb = torch.full((x.shape[0],), tk, dtype=x.dtype, device=x.device)
            g = flow_sde_noise_level(ts, k, a)
            mean = flow_sde_step_mean(x, velocity(x, tb), tk, dt, g)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = mean + float(stds[k]) * noise
            if a > 0:
                log_probs.append(gaussian_log_prob(x, mean, float(stds[k]), reduce))
            if keep_means:
                means.append(mean)
            states.append(x)
    return SDERollout(xs=torch.stack(states), stds=stds, log_probs=torch.stack(log_probs) if log_probs else None,
                      means=torch.stack(means) if keep_means else None)
