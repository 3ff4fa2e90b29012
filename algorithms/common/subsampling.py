"""Which trajectory states an algorithm trains on (paper §1.7: 5 bins of the 20 transitions + the last)."""
from __future__ import annotations

import torch


def binned_time_indices(n_steps: int, n_bins: int, batch: int, generator: torch.Generator,
                        include_last: bool = True, min_index: int = 1) -> torch.Tensor:
    """Per trajectory: [N−1 (if include_last)] + one index drawn uniformly from each of ``n_bins`` equal
    bins of {0, …, N−1}, clamped to ≥ ``min_index`` (the pure-noise state t = 0 is never used).

    Returns a LongTensor [batch, n_bins (+1)].
    """
    if not 1 <= n_bins <= n_steps:
        raise ValueError(f"number of bins must be in [1, sampler.steps={n_steps}], got {n_bins}")
    bins = torch.tensor_split(torch.arange(n_steps), n_bins)
    cols = []
    if include_last:
        cols.append(torch.full((batch,), n_steps - 1, dtype=torch.long))
    for b in reversed(bins):
        pick = torch.randint(len(b), (batch,), generator=generator)
        cols.append(b[pick])
    return torch.stack(cols, dim=1).clamp_min(min_index)


def gather_states(traj, idx: torch.Tensor):
    """The states x_{idx[b, j]} of trajectory b, flattened to one batch of B·M rows.

    Returns (x [B·M, ...] detached, t [B·M], cond, prompts, k = grid index [B·M], sample = trajectory [B·M]).
    """
    from align.core.batching import index_cond

    B, M = idx.shape
    sample = torch.arange(B).repeat_interleave(M)
    k = idx.flatten()
    x = traj.xs[k, sample].detach()
    t = traj.ts[k].to(x)
    cond = index_cond(traj.cond, sample)
    prompts = [traj.prompts[i] for i in sample.tolist()] if traj.prompts else []
    return x, t, cond, prompts, k, sample


def per_sample_mse(a: torch.Tensor, b: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per-sample mean over elements of (a − b)²."""
    return (a - b).pow(2).flatten(1).mean(1)
