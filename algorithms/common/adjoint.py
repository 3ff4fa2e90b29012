"""The discrete adjoint (costate) of an Euler-discretised control problem, swept backward along a trajectory.

For dynamics x_{k+1} = x_k + Δt_k f_k(x_k) with running cost Δt_k L_k(x_k) and terminal cost Φ(x_N), the
cost-to-go J_k(x_k) has the exact gradient a_k = ∇J_k(x_k):
    a_N = ∇Φ(x_N),    a_k = a_{k+1} + Δt_k ∇_x H_k(x, a_{k+1})|_{x = x_k},    H_k(x, a) = a·f_k(x) + L_k(x),
with a_{k+1} held fixed inside the gradient: one vector-Jacobian product per step (Pontryagin's costate
of the Euler scheme). VGG-Flow-PMP and Adjoint Matching differ only in H_k.
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

from align.core.params import held_constant

# H(k, x, t, a) -> (Σ over the batch of H_k(x_i, a_i), y): y, shaped like x, is a forward H_k evaluated at x that
# the caller keeps (PMP and AM: v_base(x_k, t_k), so their losses need not evaluate it again); t is a [B] tensor
# of t_k in x's dtype.
Hamiltonian = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Sweep(NamedTuple):
    """costates: a_k [N+1, B, ...] (NaN for k < stop). kept: the Hamiltonian's y at x_k, detached, in y's dtype
    [N+1, B, ...] (NaN for k < stop and k = N): one more tensor the size of the trajectory's xs."""
    costates: torch.Tensor
    kept: torch.Tensor


def hamiltonian_grad(hamiltonian: Hamiltonian, k: int, x: torch.Tensor, t: torch.Tensor,
                     a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """∇_x H_k(x, a) with a fixed, and H_k's y detached; only x is differentiated (parameter .grad fields are left
    untouched)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        h, y = hamiltonian(k, x, t, a.detach().to(x.dtype))
        (g,) = torch.autograd.grad(h, x)
    return g, y.detach()


def costate_sweep(xs: torch.Tensor, ts: torch.Tensor, a_last: torch.Tensor, hamiltonian: Hamiltonian,
                  stop: int = 0, params: Iterable[nn.Parameter] = ()) -> Sweep:
    """a_k for k = N..stop along the states xs [N+1, B, ...] on the grid ts [N+1], and the Hamiltonian's y at
    x_k for k = N−1..stop.

    The costate is accumulated in float32, or in the states' or a_last's dtype if wider. ``params`` (the trainable
    parameters H_k reads) are held constant during the sweep: no graph to them is built, and a CFG branch that is
    detached from them needs no recomputation in the backward (the x-gradient is the same, bit for bit).
    """
    n = xs.shape[0] - 1
    acc = torch.promote_types(torch.promote_types(a_last.dtype, xs.dtype), torch.float32)
    a = a_last.detach().to(acc)
    out = torch.full((n + 1, *a.shape), float("nan"), dtype=acc, device=a.device)
    kept = torch.full_like(xs, float("nan"))
    out[n] = a
    with held_constant(params):
        for k in range(n - 1, stop - 1, -1):
            x = xs[k]
            t = torch.full((x.shape[0],), float(ts[k]), dtype=x.dtype, device=x.device)
            g, y = hamiltonian_grad(hamiltonian, k, x, t, a)
            kept = kept.to(y.dtype)         # y's own dtype (a no-op unless a model returns another than x's)
            kept[k] = y
            a = a + float(ts[k + 1] - ts[k]) * g.to(acc)
            out[k] = a
    return Sweep(out, kept)


def kept_at(kept: torch.Tensor, k: torch.Tensor, sample: torch.Tensor, stop: int,
            evaluate: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """kept[k_i, sample_i] for each row i of a gathered batch (algorithms.common.subsampling.gather_states); the
    rows the sweep did not reach (k_i < stop) are ``evaluate(rows)`` instead, run without grad."""
    out = kept[k, sample]
    rows = (k < stop).nonzero().squeeze(1)
    if len(rows):
        with torch.no_grad():
            out[rows] = evaluate(rows)
    return out
