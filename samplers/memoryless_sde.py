"""The memoryless SDE of Adjoint Matching (reference §3) in the paper's convention.

dX = b(X, t) dt + σ(t) dB with b(x, t) = 2 v(x, t) − x/(t + h) and σ(t) = √(2 (1 − t + h)/(t + h)).
h > 0 offsets the t = 0 singularity; h = 0 is the exact memoryless schedule. The last step is a
noiseless Euler step with the base velocity (AM App. G), so X_N is the base model's prediction.
"""
from __future__ import annotations

import torch

from samplers.euler import VelocityFn


def memoryless_noise_level(t: torch.Tensor | float, h: float) -> torch.Tensor:
    """σ(t) = √(2 (1 − t + h) / (t + h))."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.sqrt(2.0 * (1.0 - t + h) / (t + h))


def memoryless_drift(v: torch.Tensor, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
    """b(x, t) = 2 v(x, t) − x / (t + h)."""
    return 2.0 * v - x / (t + h)


def memoryless_sde_integrate(
    velocity: VelocityFn,
    base_velocity: VelocityFn,
    x: torch.Tensor,
    ts: torch.Tensor,
    h: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Euler–Maruyama on the grid ts; returns all states [N+1, B, ...] (no grad).

    Steps k = 0..N−2 use the controlled drift with ``velocity`` and noise; step N−1 → N is
    X_N = X_{N−1} + Δt·v_base(X_{N−1}, t_{N−1}), noiseless.
    """
    if h <= 0 and float(ts[1] - ts[0]) > 0:
        # With h = 0 the drift −x/t is singular at t_0 = 0.
        raise ValueError("algo.h must be > 0 (the offset of the memoryless schedule at t = 0)")
    n = len(ts) - 1
    states = [x]
    with torch.no_grad():
        for k in range(n):
            tk, dt = float(ts[k]), float(ts[k + 1] - ts[k])
            tb = torch.full((x.shape[0],), tk, dtype=x.dtype, device=x.device)
            if k == n - 1:
                x = x + dt * base_velocity(x, tb)
            else:
                # drawn on the CPU (the trainer's generator lives there) so runs reproduce across devices
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                sigma = float(memoryless_noise_level(tk, h))
                x = x + dt * memoryless_drift(velocity(x, tb), x, tk, h) + (dt ** 0.5) * sigma * noise
            states.append(x)
    return torch.stack(states)
