"""PMP's and Adjoint Matching's losses take v_base from their costate sweeps: compare a loss and its θ-gradients
with a reference that evaluates v_base afresh at the loss states, and count the v_base rows the loss evaluated."""
from __future__ import annotations

from typing import Callable
from unittest import mock

import torch


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def check_kept_v_base(algo, traj, reference_loss: Callable) -> tuple[int, torch.Tensor]:
    """Assert loss and θ-gradients equal ``reference_loss(algo, traj, seed=0)``'s to 1e-12 (float64: the same
    v_base up to rounding; the float32 digits model differs from the former no-grad evaluation by ~1e-6 of
    |v_base| with CFG, which runs both branches as one batch without grad, two with it). Returns the v_base rows
    the loss evaluated (outside v_θ only on digits: the GMM's v_θ calls it too) and the reference's loss states."""
    model = algo.model
    params = model.trainable_parameters()
    with mock.patch.object(model, "base_velocity", wraps=model.base_velocity) as base:
        loss, _ = algo.loss(traj, torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(loss, params)
    base_rows = sum(call.args[0].shape[0] for call in base.call_args_list)
    ref, idx = reference_loss(algo, traj, seed=0)
    ref_grads = torch.autograd.grad(ref, params)
    assert _rel_err(loss, ref) < 1e-12 and all(_rel_err(g, r) < 1e-12 for g, r in zip(grads, ref_grads))
    return base_rows, idx
