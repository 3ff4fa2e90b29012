"""VGG-Flow: Value Gradient Guidance for Flow Matching Alignment (Liu et al., NeurIPS 2025), Algorithm 1.

Relaxed control problem (Eq. 6), β = 1/λ:
    min_θ E[ (λ/2) ∫₀¹ ‖ṽ_θ(x_t, t)‖² dt − r(x_1) ],   v_θ = v_base + ṽ_θ.
Value-gradient matching (Eq. 8): ṽ* = −β g with g = ∇_x V, where g solves the gradient-HJB (Eq. 11).
Forward-looking parameterization (Eq. 16), with the value network's output in velocity units, N_φ = β ν_φ
(as in the authors' code, reference §1.6):
    x̂_1 = x_t + (1 − t)·sg(v_θ(x_t, t)),   g_φ(x, t) = −η_t · clip(∇r(x̂_1)) + N_φ(x, t)/β.
Losses (Eqs. 12–15), on states of the current model's ODE trajectories, the φ terms multiplied by β so that
they are velocities (β g is the velocity correction ṽ):
    L_match(θ) = ‖ṽ_θ + β sg(g_φ)‖²,   L_cons(φ) = ‖β (∂_t g + J_gᵀ(v_base − βg) + J_{v_base}ᵀ g)‖²,
    L_bnd(φ) = ‖β (g_φ(x_1, 1) + clip(∇r(x_1)))‖²,   L = L_match + L_cons + α L_bnd.
With r → c·r and β → β/c every term, every gradient and so the trained model are unchanged: the model depends
on the reward scale and β only through c·β, and α means the same at every scale (the weight of the boundary
error against the consistency error, both in velocity units).
The clip threshold τ is the 80th percentile of ‖∇r(x̂_1)‖ over the whole update (every micro-batch and every
process), so gradient accumulation and several processes give the update of one big batch.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from omegaconf import MISSING

from align.core.batching import index_cond, per_sample
from align.core.interfaces import Algorithm
from align.core.registry import register_algorithm
from align.core.schema import positive, require
from algorithms.common.reward_grad import clip_per_sample, per_sample_norms, reward_and_grad
from algorithms.common.subsampling import binned_time_indices, gather_states, per_sample_mse
from algorithms.common.value_gradient import consistency_residual, network_dtype, use_network_jvp
from samplers import Trajectory, euler_integrate, one_step_prediction

ETA = {"t2": lambda t: t ** 2, "t": lambda t: t, "const": lambda t: torch.ones_like(t),
       "none": lambda t: torch.zeros_like(t)}

# The choices (str enums: `cfg.eta == "t2"` holds; a bad value is refused naming the valid ones).
Eta = enum.StrEnum("Eta", list(ETA))
RgradClip = enum.StrEnum("RgradClip", "batch_quantile previous_step const none")
FdScheme = enum.StrEnum("FdScheme", "central forward")
FdTerms = enum.StrEnum("FdTerms", "spacetime separate")
FdNetwork = enum.StrEnum("FdNetwork", "auto fd jvp")
FdStep = enum.StrEnum("FdStep", "rms raw")
ConsistencyLoss = enum.StrEnum("ConsistencyLoss", "velocity code")
ConsistencyTimes = enum.StrEnum("ConsistencyTimes", "grid within_step")
BoundaryAt = enum.StrEnum("BoundaryAt", "t1 last_state")


@dataclass
class VGGFlowConfig:
    """``algo=vggflow``. Paper defaults unless noted; the preview code's choices are options."""
    name: str = "vggflow"
    lr: float = MISSING             # paper: 5e-4 for every reward (preview code run.sh: 1e-3); preset: the paper's
    value_lr: Optional[float] = None  # learning rate of the value network φ (null: train.lr, as in the code)
    # β = 1/λ: inverse temperature of the relaxed control problem (paper: 5e4 aesthetic, 3e7 HPSv2, 5e5 PickScore,
    # 1e4 ablations); the matching target is ṽ = −β g. Preset: align/setup/paper_settings.py.
    beta: float = MISSING
    # α weights the boundary loss ‖β(g(x₁,1) + ∇r(x₁))‖² against the consistency loss ‖β·R‖²: both are velocities
    # (β g is the velocity correction; the value network outputs N_φ = β ν_φ), so α means the same at every reward
    # scale and β. Per domain (align/setup/paper_settings.py): 1e4 on SD3 (paper), 10 on gmm and digits (1e4 swamps
    # L_cons there, reference §3 note).
    alpha: float = MISSING
    eta: Eta = Eta.t2               # forward-looking weight η_t: t2 (paper) | t (run.sh, faster) | const | none
    learn_value: bool = True        # false: forward-looking term only, ν_φ ≡ 0 (ablation)
    subsample_bins: int = 5         # one state per bin of the N transitions + the last grid state (§1.7)
    rgrad_clip: RgradClip = RgradClip.batch_quantile  # batch_quantile (paper) | previous_step (preview code) | const | none
    rgrad_quantile: float = 0.8     # the paper's 80th percentile
    rgrad_clip_value: float = 1.0   # const clip, and the initial threshold of previous_step
    # spacetime: ∂_t g + J_g(v_base − βg) as one derivative along (v_base − βg, 1) (paper Eq. 43 moves x and t
    # together) | separate: ∂_t g and J_g·d differenced apart (two differences of g). See docs/speed.md.
    fd_terms: FdTerms = FdTerms.spacetime
    # forward (the paper's Eq. 43 and the preview code: reuses g(x, t) and v_base(x, t), first order) | central
    # (second order, one more g and v_base per state). Default spacetime + forward: 4 velocity and 2 reward-
    # gradient evaluations per trained state (separate + central: 8 and 5); the accuracy table is docs/speed.md.
    fd_scheme: FdScheme = FdScheme.forward
    # The steps: x-step per-coordinate RMS ≤ fd_eps, t-step ≤ fd_delta (spacetime: one joint step within both).
    # 3e-5: the flows' timestep embeddings (τ = 1000σ, sinusoids up to one radian per τ) curve on a scale of
    # 1e-3 in t, so a 1e-3 step is off by 10–30 % on digits in fp32 (experiments/fd_accuracy.py; 3e-5: 1.2 %
    # forward, 0.4 % central; the central scheme's best is 1e-4, 0.2 %). bf16 networks: see fd_network.
    fd_eps: float = 3.0e-5
    fd_delta: float = 3.0e-5
    # auto: bf16/fp16 flow networks by forward-mode AD (FD there is rounding noise), FD in fp32 | fd | jvp
    fd_network: FdNetwork = FdNetwork.auto
    # rms: x-steps of per-coordinate RMS fd_eps along the normalised direction | raw: the preview code's steps,
    # x + fd_eps·g for J_{v_base}·g and x − fd_eps·(v_base − βg)/β for J_g·(v_base − βg) (fd_terms=separate only)
    fd_step: FdStep = FdStep.rms
    time_derivative_scale: float = 1.0  # 1 (paper); 1e-3 reproduces the preview code's τ = 1000σ units
    # velocity: L_cons = ‖β·R‖² (βR is a velocity, like the matching loss and N_φ) | code: ‖R/β‖² (the preview
    # code: 1/β⁴ of it, so that its boundary weighs α·β⁴/6 against it, docs/vggflow.md)
    consistency_loss: ConsistencyLoss = ConsistencyLoss.velocity
    consistency_weight: float = 1.0     # a factor on L_cons (1: the paper's L_cons + α L_bnd)
    # Where the consistency residual is enforced: grid (paper: at the sub-sampled grid states) | within_step (at a
    # uniform time inside each state's Euler step, on the sampler's own segment: ν_φ is then constrained between
    # grid times too; on SD3's shifted grid `grid` leaves the late gaps 0.73 → 0.85 → 0.99 free, see docs/vggflow.md)
    consistency_times: ConsistencyTimes = ConsistencyTimes.grid
    # t1 (paper: ‖β(g(x₁, 1) + ∇r(x₁))‖², the mean over trajectories) | last_state (the preview code: ‖N_φ‖² at the
    # last grid state x_{N−1}, weighted as it weighs it: α/M · Σ over the M sub-sampled columns that hold x_{N−1}
    # of the mean over those rows, M = subsample_bins + 1)
    boundary_at: BoundaryAt = BoundaryAt.t1

    def validate(self) -> None:
        require(positive(self.beta), "algo.beta", self.beta, "finite and > 0")
        if self.fd_step == "raw" and (self.fd_terms != "separate" or self.fd_network == "jvp"):
            raise ValueError(f"algo.fd_step=raw (the preview code's steps) differences ∂_t g, J_g·d and J_v_base·g "
                             f"separately and through the network: it needs algo.fd_terms=separate (got "
                             f"{self.fd_terms}) and algo.fd_network=fd or auto (got {self.fd_network})")

    def validate_steps(self, n_steps: int) -> None:
        require(1 <= self.subsample_bins <= n_steps, "algo.subsample_bins", self.subsample_bins,
                f"in [1, sampler.steps={n_steps}]")


@register_algorithm("vggflow", config=VGGFlowConfig)
class VGGFlow(Algorithm):
    update_wide = True      # prepare() sees every micro-batch of an update before any loss (the clip threshold)

    def __init__(self, cfg: Any, model, reward, ts: torch.Tensor):
        super().__init__(cfg, model, reward, ts)       # self.cfg: an instance of its config dataclass
        cfg = self.cfg
        self.beta, self.alpha, self.eta = cfg.beta, cfg.alpha, ETA[cfg.eta]
        self.value_net = model.make_value_network() if cfg.learn_value else None   # outputs N_φ = β ν_φ
        # bf16/fp16 networks: forward-mode AD through the network in the residual (algorithms/common/value_gradient.py)
        self.network_jvp = use_network_jvp(cfg.fd_network, network_dtype(model))
        if cfg.fd_step == "raw" and self.network_jvp:
            raise ValueError(f"algo.fd_step=raw differences the flow network itself, which computes in "
                             f"{network_dtype(model)} here (algo.fd_network=auto would take forward-mode AD): "
                             "set algo.fd_network=fd, as the preview code does")
        self.register_buffer("prev_tau", torch.tensor(cfg.rgrad_clip_value))
        self.tau: torch.Tensor | None = None      # this update's clip threshold (set by prepare)

    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        if self.value_net is not None:
            group = {"name": "phi", "params": list(self.value_net.parameters())}
            if self.cfg.value_lr is not None:
                group["lr"] = self.cfg.value_lr
            groups.append(group)
        return groups

    # ---- rollout: the Euler ODE, keeping v_θ(x_k, t_k) for the forward-looking x̂_1 -----------------------
    def rollout(self, x0: torch.Tensor, prompts: list[str], cond: Any, generator: torch.Generator) -> Trajectory:
        vs: list[torch.Tensor] = []

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            vs.append(self.model.velocity(x, t, cond))
            return vs[-1]

        xs = euler_integrate(velocity, x0, self.ts)
        return Trajectory(xs=xs, ts=self.ts, cond=cond, prompts=prompts, extras={"vs": torch.stack(vs)})

    # ---- the value-gradient field g_φ (Eq. 16) -------------------------------------------------------
    def value_gradient(self, x: torch.Tensor, t: torch.Tensor, cond: Any, prompts: list[str],
                       tau: torch.Tensor | None, grad_r: torch.Tensor | None = None,
                       x_hat: torch.Tensor | None = None, n_phi: torch.Tensor | None = None) -> torch.Tensor:
        """g_φ(x, t) = −η_t·clip(∇r(x̂_1)) + N_φ(x, t)/β. ``grad_r`` = ∇r(x̂_1) or ``x_hat`` = x̂_1, and ``n_phi`` =
        N_φ(x, t), when already computed; at t = 1, x̂_1 = x and no velocity is evaluated."""
        if grad_r is None:
            if x_hat is None and bool((t == 1).all()):
                x_hat = x
            elif x_hat is None:
                with torch.no_grad():
                    x_hat = one_step_prediction(x, t, self.model.velocity(x, t, cond))
            _, grad_r = reward_and_grad(self.model, self.reward, x_hat, prompts)
        # η in the trajectory's precision (at least fp32): the residual differences g at t and t + δ, δ down to 1e-7
        g = -per_sample(self.eta(t.to(torch.promote_types(t.dtype, torch.float32))), x) * clip_per_sample(
            grad_r, tau).to(x.dtype)
        if self.value_net is not None:
            g = g + (self.value_net(x, t, cond) if n_phi is None else n_phi) / self.beta
        return g

    # ---- update-wide: training states, their reward gradients, the clip threshold -----------------------
    def prepare(self, trajs: list[Trajectory], generator: torch.Generator,
                gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """For every micro-batch: the last grid state and one state per bin (§1.7), x̂_1 there from the rollout's
        own v_θ and ∇r(x̂_1). The last state's x̂_1 is its Euler step, x_1 itself, so ∇r(x_1) (the boundary's) and
        r(x_1) (the log's) come with it. Then τ over all of them and all processes (``gather``)."""
        norms = []
        for traj in trajs:
            idx = binned_time_indices(traj.n_steps, self.cfg.subsample_bins, traj.xs.shape[1], generator)
            x, t, cond, prompts, k, sample = gather_states(traj, idx)
            if "vs" in traj.extras:
                v = traj.extras["vs"][k, sample].to(x)
            else:
                with torch.no_grad():
                    v = self.model.velocity(x, t, cond)
            x_hat = one_step_prediction(x, t, v)
            last = idx.shape[1] * torch.arange(idx.shape[0])       # column 0 of each row: k = N − 1
            x_hat[last] = traj.x1.detach().to(x_hat)
            r, grad_r = reward_and_grad(self.model, self.reward, x_hat, prompts)
            traj.reward_x1 = r[last]
            traj.extras.update(vgg_idx=idx, vgg_grad_r=grad_r, vgg_x_hat=x_hat, vgg_grad_r1=grad_r[last])
            norms.append(per_sample_norms(grad_r))
        self.tau = self.clip_threshold(gather(torch.cat(norms)))

    def clip_threshold(self, grad_norms: torch.Tensor) -> torch.Tensor | None:
        mode = self.cfg.rgrad_clip
        grad_norms = grad_norms.to(torch.promote_types(grad_norms.dtype, torch.float32))
        if mode == "batch_quantile":   # paper: 80th percentile of this batch's norms
            return torch.quantile(grad_norms, self.cfg.rgrad_quantile)
        if mode == "previous_step":    # preview code: the previous step's quantile
            tau = self.prev_tau.clone()
            self.prev_tau.copy_(torch.quantile(grad_norms, self.cfg.rgrad_quantile))
            return tau
        if mode == "const":
            return self.prev_tau.new_tensor(self.cfg.rgrad_clip_value)
        return None

    def value_at_states_and_x1(self, traj: Trajectory, x: torch.Tensor, t: torch.Tensor, sample: torch.Tensor
                               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """N_φ at the training states and, for the boundary (``boundary_at: t1``), at (x_1, 1), in one call."""
        if self.value_net is None:
            return None, None
        if self.cfg.boundary_at != "t1":
            return self.value_net(x, t, index_cond(traj.cond, sample)), None
        x1 = traj.x1.detach().to(x)
        rows = torch.cat([sample, torch.arange(len(x1))])
        out = self.value_net(torch.cat([x, x1]), torch.cat([t, torch.ones_like(t[:len(x1)])]),
                             index_cond(traj.cond, rows))
        return out[:len(x)], out[len(x):]

    # ---- one micro-batch ------------------------------------------------------------------------------
    def loss(self, traj: Trajectory, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, model, beta = self.cfg, self.model, self.beta
        if "vgg_idx" not in traj.extras:        # called outside the trainer: this batch is the whole update
            self.prepare([traj], generator, gather=lambda n: n)
        tau, grad_r = self.tau, traj.extras["vgg_grad_r"]

        # 1. The training states: x_{N−1} and one per bin, with ∇r(x̂_1) from prepare().
        x, t, cond, prompts, k, sample = gather_states(traj, traj.extras["vgg_idx"])
        n_phi, n_phi_1 = self.value_at_states_and_x1(traj, x, t, sample)

        # 2. Forward-looking value gradient with the update's reward-gradient clip.
        with torch.no_grad():
            v_base = model.base_velocity(x, t, cond)
        g = self.value_gradient(x, t, cond, prompts, tau, grad_r=grad_r, n_phi=n_phi)
        logs = {"rgrad_norm": per_sample_norms(grad_r).mean().item(),
                "rgrad_tau": float(tau) if tau is not None else float("nan")}
        # v_θ with grad is taken after the φ terms (4, 5), whose residual takes new reward gradients: its graph and
        # theirs (decode + reward) are then never alive together. within_step needs it first, for its segment.
        v_theta = model.velocity(x, t, cond) if cfg.consistency_times == "within_step" else None     # grad → θ

        def matching(v_theta: torch.Tensor | None) -> torch.Tensor:
            """3. Value-gradient matching (Eq. 13): ṽ_θ → −β g, g a fixed target."""
            v_theta = model.velocity(x, t, cond) if v_theta is None else v_theta                  # grad → θ
            loss = per_sample_mse(v_theta, (v_base - beta * g).detach()).mean()
            logs["loss_match"] = loss.item()
            return loss

        if self.value_net is None:
            return matching(v_theta), logs

        # 4. Gradient-HJB consistency (Eq. 12) by finite differences (App. C.1), times β (velocity units).
        def g_field(xx: torch.Tensor, tt: torch.Tensor, x_hat: torch.Tensor | None = None) -> torch.Tensor:
            return self.value_gradient(xx, tt, cond, prompts, tau, x_hat=x_hat)

        def predictor(xx: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:      # x̂_1 inside g (network_jvp)
            with torch.no_grad():
                return one_step_prediction(xx, tt, model.velocity(xx, tt, cond))

        def v_base_field(xx: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model.base_velocity(xx, tt, cond)

        xc, tc, gc, vbc, x_hat = x, t, g, v_base, traj.extras["vgg_x_hat"]
        if cfg.consistency_times == "within_step":
            # The residual at a uniform time inside each state's Euler step, on the sampler's own segment:
            # enforcing it only at the grid times leaves ν_φ free between them (wide late steps of SD3's grid).
            u = torch.rand(len(k), generator=generator, dtype=torch.float64)
            h = (traj.ts[k + 1] - traj.ts[k]).cpu() * u
            step = h.to(x)
            xc = x + per_sample(step, x) * v_theta.detach()
            tc = t + step
            x_hat = predictor(xc, tc)
            gc = self.value_gradient(xc, tc, cond, prompts, tau, x_hat=x_hat)
            vbc = v_base_field(xc, tc)
        resid = consistency_residual(g_field, v_base_field, xc, tc, beta, cfg.fd_eps, cfg.fd_delta,
                                     cfg.fd_scheme, g_x=gc, v_base_x=vbc,
                                     time_scale=cfg.time_derivative_scale,
                                     predictor=predictor, jvp=self.network_jvp,
                                     spacetime=cfg.fd_terms == "spacetime", x_hat=x_hat,
                                     raw_steps=cfg.fd_step == "raw")
        units = beta if cfg.consistency_loss == "velocity" else 1.0 / beta
        loss_cons = cfg.consistency_weight * per_sample_mse(units * resid).mean()

        # 5. Boundary (Eq. 14): g(x_1, 1) = −∇r(x_1) with the same clipped gradient, times β; for η_1 = 1 this is
        #    ‖N_φ(x_1, 1)‖². The preview code instead penalises ‖N_φ‖² at the last grid state x_{N−1}.
        if cfg.boundary_at == "t1":
            xb, grad_rb = traj.x1.detach(), traj.extras["vgg_grad_r1"]
            tb = torch.ones(xb.shape[0], dtype=xb.dtype, device=xb.device)
            gb = self.value_gradient(xb, tb, traj.cond, traj.prompts, tau, grad_r=grad_rb, n_phi=n_phi_1)
            loss_bnd = per_sample_mse(beta * gb, -beta * clip_per_sample(grad_rb, tau).to(xb.dtype)).mean()
        else:
            loss_bnd = last_state_boundary(per_sample_mse(n_phi), k, traj.n_steps, traj.extras["vgg_idx"].shape[1])

        # the residual's RMS, in g's units whatever the loss's form (consistency_loss), to compare the forms
        logs.update(loss_cons=loss_cons.item(), loss_bnd=loss_bnd.item(),
                    resid_rms=resid.detach().pow(2).mean().sqrt().item())
        return matching(v_theta) + loss_cons + self.alpha * loss_bnd, logs


@register_algorithm("vggflow_authors", config=VGGFlowConfig)
class VGGFlowAuthors(VGGFlow):
    """``algo=vggflow_authors``: VGG-Flow with every choice of the authors' code at once (its preset,
    align/conf/algo/vggflow_authors.yaml; each difference from ``algo=vggflow`` and its measured effect:
    docs/vggflow.md). The same algorithm: only the settings differ."""


def last_state_boundary(per_state: torch.Tensor, k: torch.Tensor, n_steps: int, columns: int) -> torch.Tensor:
    """The preview code's boundary loss (``boundary_at: last_state``) from ‖N_φ‖² at each training state (rows of
    ``columns`` sub-sampled states each, the last grid state first): each column that holds x_{N−1} in some rows
    adds the mean over those rows, and the sum is divided by the number of columns (the code averages every term
    over them). Column 0 always holds x_{N−1}; the last bin's column does in the rows that drew it too."""
    column = torch.arange(len(k), device=k.device) % columns
    last = k == n_steps - 1
    terms = [per_state[last & (column == j)].mean() for j in range(columns) if bool((last & (column == j)).any())]
    return torch.stack(terms).sum() / columns
