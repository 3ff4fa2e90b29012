"""VGG-Flow: Value Gradient Guidance for Flow Matching Alignment (Liu et al., NeurIPS 2025), Algorithm 1.

Relaxed control problem (Eq. 6), β = 1/λ:
    min_θ E[ (λ/2) ∫₀¹ ‖ṽ_θ(x_t, t)‖² dt − r(x_1) ],   v_θ = v_base + ṽ_θ.
Value-gradient matching (Eq. 8): ṽ* = −β g with g = ∇_x V, where g solves the gradient-HJB (Eq. 11).
Forward-looking parameterization (Eq. 16):
    x̂_1 = x_t + (1 − t)·sg(v_θ(x_t, t)),   g_φ(x, t) = −η_t · clip(∇r(x̂_1)) + ν_φ(x, t).
Losses (Eqs. 12–15), on states of the current model's ODE trajectories:
    L_match(θ) = ‖ṽ_θ + β sg(g_φ)‖²,  L_cons(φ) = ‖∂_t g + J_gᵀ(v_base − βg) + J_{v_base}ᵀ g‖²,
    L_bnd(φ) = ‖g_φ(x_1, 1) + ∇r(x_1)‖²,   L = L_match + L_cons + α L_bnd.
"""
from __future__ import annotations

from typing import Any

import torch

from align.batching import index_cond
from align.interfaces import Algorithm
from align.registry import register_algorithm
from align.reward_grad import clip_per_sample, per_sample_norms, reward_and_grad
from align.subsampling import binned_time_indices, gather_states, per_sample_mse
from align.value_gradient import consistency_residual
from samplers import Trajectory, one_step_prediction

ETA = {"t2": lambda t: t ** 2, "t": lambda t: t, "const": lambda t: torch.ones_like(t),
       "none": lambda t: torch.zeros_like(t)}
CLIP_MODES = ("batch_quantile", "previous_step", "const", "none")


@register_algorithm("vggflow")
class VGGFlow(Algorithm):
    name = "vggflow"

    def __init__(self, cfg: Any, model, reward, ts: torch.Tensor):
        super().__init__(cfg, model, reward, ts)
        if cfg.eta not in ETA:
            raise ValueError(f"unknown algo.eta={cfg.eta!r}; valid choices: {', '.join(ETA)}")
        if cfg.rgrad_clip not in CLIP_MODES:
            raise ValueError(f"unknown algo.rgrad_clip={cfg.rgrad_clip!r}; valid choices: {', '.join(CLIP_MODES)}")
        if cfg.boundary_at not in ("t1", "last_state"):
            raise ValueError(f"unknown algo.boundary_at={cfg.boundary_at!r}; valid choices: t1, last_state")
        self.beta, self.alpha, self.eta = float(cfg.beta), float(cfg.alpha), ETA[cfg.eta]
        self.value_net = model.make_value_network() if cfg.learn_value else None
        self.register_buffer("prev_tau", torch.tensor(float(cfg.rgrad_clip_value)))

    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        if self.value_net is not None:
            group = {"name": "phi", "params": list(self.value_net.parameters())}
            if self.cfg.get("value_lr") is not None:
                group["lr"] = float(self.cfg.value_lr)
            groups.append(group)
        return groups

    # ---- the value-gradient field g_φ (Eq. 16) -------------------------------------------------------
    def value_gradient(self, x: torch.Tensor, t: torch.Tensor, cond: Any, prompts: list[str],
                       tau: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """g_φ(x, t) = −η_t·clip(∇r(x̂_1)) + ν_φ(x, t); also returns the unclipped ∇r(x̂_1)."""
        with torch.no_grad():
            v = self.model.velocity(x, t, cond)
        _, grad_r = reward_and_grad(self.model, self.reward, one_step_prediction(x, t, v), prompts)
        eta = self.eta(t.float()).reshape(-1, *([1] * (x.dim() - 1)))
        g = -eta * clip_per_sample(grad_r, tau).to(x.dtype)
        if self.value_net is not None:
            g = g + self.value_net(x, t, cond)
        return g, grad_r

    def clip_threshold(self, grad_norms: torch.Tensor) -> torch.Tensor | None:
        mode = self.cfg.rgrad_clip
        if mode == "batch_quantile":   # paper: 80th percentile of this batch's norms
            return torch.quantile(grad_norms.float(), float(self.cfg.rgrad_quantile))
        if mode == "previous_step":    # preview code: the previous step's quantile
            tau = self.prev_tau.clone()
            self.prev_tau.copy_(torch.quantile(grad_norms.float(), float(self.cfg.rgrad_quantile)))
            return tau
        if mode == "const":
            return self.prev_tau.new_tensor(float(self.cfg.rgrad_clip_value))
        return None

    # ---- one update ---------------------------------------------------------------------------------
    def loss(self, traj: Trajectory, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, model = self.cfg, self.model
        N, B = traj.n_steps, traj.xs.shape[1]

        # 1. Subsample states: the last grid state x_{N−1} and one state from each of the bins (§1.7).
        idx = binned_time_indices(N, cfg.subsample_bins, B, generator)            # [B, M]
        x, t, cond, prompts, k, _ = gather_states(traj, idx)

        # 2. Forward-looking value gradient with the batch's reward-gradient clip.
        v_theta = model.velocity(x, t, cond)                                       # grad → θ
        with torch.no_grad():
            v_base = model.base_velocity(x, t, cond)
        _, grad_r = reward_and_grad(model, self.reward, one_step_prediction(x, t, v_theta.detach()), prompts)
        tau = self.clip_threshold(per_sample_norms(grad_r))
        eta = self.eta(t.float()).reshape(-1, *([1] * (x.dim() - 1)))
        g_fl = -eta * clip_per_sample(grad_r, tau).to(x.dtype)
        g = g_fl + self.value_net(x, t, cond) if self.value_net is not None else g_fl

        # 3. Value-gradient matching (Eq. 13): ṽ_θ → −β g, g a fixed target.
        loss_match = per_sample_mse(v_theta, (v_base - self.beta * g).detach()).mean()
        logs = {"loss_match": loss_match.item(), "rgrad_norm": per_sample_norms(grad_r).mean().item(),
                "rgrad_tau": float(tau) if tau is not None else float("nan")}
        loss = loss_match
        if self.value_net is None:
            return loss, logs

        # 4. Gradient-HJB consistency (Eq. 12) by finite differences (App. C.1).
        def g_field(xx: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            return self.value_gradient(xx, tt, cond, prompts, tau)[0]

        def v_base_field(xx: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model.base_velocity(xx, tt, cond)

        resid = consistency_residual(g_field, v_base_field, x, t, self.beta, cfg.fd_eps, cfg.fd_delta,
                                     cfg.fd_scheme, g_x=g, v_base_x=v_base,
                                     time_scale=float(cfg.time_derivative_scale))
        loss_cons = float(cfg.consistency_weight) * per_sample_mse(resid).mean()

        # 5. Boundary (Eq. 14): g(x_1, 1) = −∇r(x_1) with the same clipped gradient, i.e. ν_φ(x_1, 1) = 0
        #    for η_1 = 1; the preview code instead penalises ‖ν_φ‖² at the last grid state x_{N−1}.
        if cfg.boundary_at == "t1":
            xb = traj.xs[-1].detach()
            tb = torch.ones(B, dtype=xb.dtype, device=xb.device)
            gb, grad_rb = self.value_gradient(xb, tb, traj.cond, traj.prompts, tau)
            loss_bnd = per_sample_mse(gb, -clip_per_sample(grad_rb, tau).to(xb.dtype)).mean()
        else:
            last = k == N - 1
            loss_bnd = per_sample_mse(self.value_net(x[last], t[last], index_cond(cond, last.nonzero().flatten()))).mean()

        loss = loss + loss_cons + self.alpha * loss_bnd
        logs.update(loss_cons=loss_cons.item(), loss_bnd=loss_bnd.item())
        return loss, logs
