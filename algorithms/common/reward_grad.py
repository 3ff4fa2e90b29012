"""Reward gradients in model space, ∇_x r(decode(x)), and the per-sample norm clip of VGG-Flow (Eq. 16)."""
from __future__ import annotations

import torch

from align.core.interfaces import FlowModel, Reward
from align.core.batching import per_sample
from samplers import Trajectory


def reward_and_grad(model: FlowModel, reward: Reward, x: torch.Tensor, prompts: list[str]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """r(decode(x)) [B] and its gradient w.r.t. x [B, ...], in fp32 (fp64 when x or the reward's tensors are fp64),
    detached from any outer graph; zero in a row whose reward is non-finite (``without_nonfinite_rewards``). A model
    with ``reward_grad_batch_size`` = n takes the gradient n images at a time (one decode-and-reward graph alive at
    once, not B): the same gradient for a reward that scores each image independently, at a fraction of the memory
    (FLUX's VAE: docs/flux.md#hardware-and-memory)."""
    held = [p.dtype for p in (*reward.parameters(), *reward.buffers()) if p.is_floating_point()]
    dtype = torch.float64 if torch.float64 in held or x.dtype == torch.float64 else torch.float32
    n = getattr(model, "reward_grad_batch_size", None) or len(x)
    parts = [_reward_and_grad(model, reward, x[i:i + n], prompts[i:i + n], dtype) for i in range(0, len(x), n)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([r for r, _ in parts]), torch.cat([g for _, g in parts])


def _reward_and_grad(model: FlowModel, reward: Reward, x: torch.Tensor, prompts: list[str], dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        x = x.detach().to(dtype).requires_grad_(True)
        r = reward(model.decode(x), prompts).float()
        (grad,) = torch.autograd.grad(r.sum(), x)
    return r.detach(), without_nonfinite_rewards(r.detach(), grad.detach())


def without_nonfinite_rewards(r: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with zeros in the rows whose reward r is non-finite. The trainer skips an update in which the reward
    returned a non-finite value (align/train/reward_watch.py); the zeros keep the rest of that update finite until
    then (VGG-Flow's finite-difference steps, scaled by ∇r, would otherwise put NaN into the time a model is
    evaluated at). A NaN gradient of a finite reward is left as it is: the loss's NaN guard sees it."""
    return grad.masked_fill(per_sample(~torch.isfinite(r), grad), 0.0)


def reward_grad_at_x1(model: FlowModel, reward: Reward, traj: Trajectory) -> torch.Tensor:
    """∇r(decode(x_1)) of a trajectory; r(x_1) is kept as ``traj.reward_x1`` (the trainer logs it)."""
    r, grad = reward_and_grad(model, reward, traj.x1, traj.prompts)
    traj.reward_x1 = r
    return grad


def per_sample_norms(g: torch.Tensor) -> torch.Tensor:
    return g.flatten(1).norm(dim=1)


def clip_per_sample(g: torch.Tensor, tau: torch.Tensor | float | None) -> torch.Tensor:
    """G ← G · min(1, τ / ‖G‖) per sample; τ = None leaves G unchanged."""
    if tau is None:
        return g
    norms = per_sample_norms(g)
    scale = torch.clamp(torch.as_tensor(tau, dtype=g.dtype, device=g.device) / norms.clamp_min(1e-12), max=1.0)
    return g * per_sample(scale, g)
