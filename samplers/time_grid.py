"""Time grids t_0 = 0 < t_1 < ... < t_N = 1 in the paper's convention (t = 0 noise, t = 1 data)."""
from __future__ import annotations

import torch


def uniform_grid(n_steps: int) -> torch.Tensor:
    """t_k = k / N, k = 0..N (float64)."""
    if n_steps < 1:
        raise ValueError(f"sampler.steps must be >= 1, got {n_steps}")
    return torch.linspace(0.0, 1.0, n_steps + 1, dtype=torch.float64)


def sd3_grid(n_steps: int, shift: float = 3.0, sigma_min: float = 1e-3) -> torch.Tensor:
    """SD3's shifted grid (diffusers ``FlowMatchEulerDiscreteScheduler``), returned as t = 1 − σ.

    s_k = linspace(1, s_min, N) with s_min = shift·σ_min / (1 + (shift − 1)σ_min) (the scheduler's
    shifted sigma_min), σ_k = shift·s_k / (1 + (shift − 1)s_k), then σ_N = 0 is appended.
    """
    if n_steps < 1:
        raise ValueError(f"sampler.steps must be >= 1, got {n_steps}")
    s_min = shift * sigma_min / (1.0 + (shift - 1.0) * sigma_min)
    s = torch.linspace(1.0, s_min, n_steps, dtype=torch.float64)
    sigma = shift * s / (1.0 + (shift - 1.0) * s)
    sigma = torch.cat([sigma, torch.zeros(1, dtype=torch.float64)])
    return 1.0 - sigma


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent log-shift μ: linear in the number of packed image tokens, from ``base_shift`` at
    ``base_seq_len`` to ``max_shift`` at ``max_seq_len`` (the scheduler config's keys; FluxPipeline's defaults)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(image_seq_len * slope + base_shift - slope * base_seq_len)


def flux_grid(n_steps: int, shift: float) -> torch.Tensor:
    """FluxPipeline's schedule, returned as t = 1 − σ: s_k = linspace(1, 1/N, N), σ_k = shift·s_k / (1 + (shift − 1)s_k),
    then σ_N = 0 appended.

    With dynamic shifting the scheduler applies exp(μ) / (exp(μ) + (1/s − 1)), which is the same map with
    shift = exp(μ); with a static shift (FLUX.1-schnell: 1) it is that shift. Unlike ``sd3_grid`` the unshifted
    grid ends at 1/N, not at the scheduler's σ_min.
    """
    if n_steps < 1:
        raise ValueError(f"sampler.steps must be >= 1, got {n_steps}")
    s = torch.linspace(1.0, 1.0 / n_steps, n_steps, dtype=torch.float64)
    sigma = torch.cat([shift * s / (1.0 + (shift - 1.0) * s), torch.zeros(1, dtype=torch.float64)])
    return 1.0 - sigma


def make_grid(kind: str, n_steps: int, shift: float = 3.0) -> torch.Tensor:
    """Build the grid named by ``sampler.grid`` (``uniform``, ``sd3`` or ``flux``; ``shift`` is the sd3 grid's
    shift or the flux grid's, exp(μ) under dynamic shifting)."""
    if kind == "uniform":
        return uniform_grid(n_steps)
    if kind == "sd3":
        return sd3_grid(n_steps, shift)
    if kind == "flux":
        return flux_grid(n_steps, shift)
    raise ValueError(f"unknown sampler.grid={kind!r}; valid choices: uniform, sd3, flux")


def training_grid(kind: str, model_ts: torch.Tensor, n_steps: int | None = None) -> torch.Tensor:
    """The grid an algorithm trains on, given the model's sampling grid ``model_ts`` (``algo.train_grid``).

    ``model``: ``model_ts`` itself. ``uniform``: t_k = k/N with N = ``n_steps`` or, if None, the model grid's number
    of steps (so the cost per update is unchanged). The learned field is a function of continuous t, so a model
    trained on one grid can be sampled on another.
    """
    if kind == "model":
        if n_steps is not None and n_steps != len(model_ts) - 1:
            raise ValueError(f"train_grid=model uses the sampler's {len(model_ts) - 1} steps; "
                             f"got train_steps={n_steps} (set it to null, or use train_grid=uniform)")
        return model_ts.clone()
    if kind == "uniform":
        return uniform_grid(len(model_ts) - 1 if n_steps is None else int(n_steps))
    raise ValueError(f"unknown train_grid={kind!r}; valid choices: model, uniform")
