"""Flow-GRPO (Liu et al. 2025, arXiv 2505.05470): GRPO on the per-step Gaussian policy of a marginal-preserving SDE.

Policy. On the training grid t_0 = 0 < … < t_N = 1 (``algo.train_grid``/``train_steps``, the paper's Denoising
Reduction: train on N = 10 SDE steps, evaluate with the ODE on the model's grid) the rollout runs
    x_{k+1} ~ p_θ(· | x_k) = N(μ_θ,k(x_k), s_k² I),  μ_θ,k(x) = x + Δt_k [v_θ + (g_k²/(2σ_k)) (t_k v_θ − x)],
    s_k = g_k √Δt_k,  g_k = a √((1 − t_k)/t_k),  σ_k = 1 − t_k                (samplers/flow_sde.py)
with the current v_θ (old policy θ_old), no grad, noise level a (paper 0.7); every step is stochastic, the last too.
Algorithm (one update, G rows per prompt):
  1. roll out B trajectories in groups of G sharing a prompt; keep x_{0..N} and log p_old(x_{k+1} | x_k);
  2. rewards r_i = r(decode(x_N)) (no gradient of r is ever taken: black-box rewards work);
  3. advantages A_i = (r_i − mean_G r) / (std_G r + ε)   (``normalize_std``, ``std_over``, ``baseline``),
     clipped to ±adv_clip_max;
  4. over the trained steps K (all, or ``timestep_fraction`` of them), ρ_ik = exp(log p_θ − log p_old) and
       L(θ) = mean_{i,k∈K} max(−A_i ρ_ik, −A_i clip(ρ_ik, 1 − ε, 1 + ε)) + β mean_{i,k∈K} KL(p_θ,k ‖ p_base,k)(x_ik),
     KL = ‖μ_θ,k − μ_base,k‖²/(2 s_k²) (closed form, same std; μ_base from v_base, the frozen prior).
Log-densities and the KL are averaged over dimensions (flow_grpo's) or summed (``reduce: sum``, the exact
likelihood); the reduction scales both terms alike, so the fixed point does not move.

Fixed point (docs/flow_grpo.md, tests/test_flow_grpo_exact.py). On-policy (ρ ≡ 1, the clip inactive), with
normalize_std off, E[(r_i − mean_G r) ∇ log p_θ(path_i)] = (1 − 1/G) ∇E[r]: the other G − 1 rewards in the mean
are independent of path i and E[∇ log p_θ] = 0. So the group-mean baseline optimises
E[r] − β/(1 − 1/G)·KL(path), whose optimum is the tilt p_ref(path) exp((1 − 1/G) r/β); ``baseline:
leave_one_out`` (A_i = r_i − mean_{j≠i} r_j) removes the factor. The KL term differentiates the per-step KL at the
sampled states only (not through their distribution); at the optimum of a linear-Gaussian chain with a linear
reward the optimal per-step shift is constant in x, so that missing term vanishes there and the tilt is a fixed
point (tested).

Where the paper and flow_grpo's code (scripts/train_sd3.py, config/grpo.py) differ:
  * KL: the paper's is ‖Δμ‖²/(2 s_k²); the code divides by g_k² (std_dev_t, without Δt): Δt_k times the paper's.
    Default ``kl: paper``; ``kl: code`` reproduces the code, whose β values (0.04 GenEval/OCR, 0.01 PickScore) were
    tuned with it: at 10 uniform steps the paper's form with the same β regularises 10× more.
  * advantages: the paper normalises by the group's std; the code's SD3 configs (global_std=True) by the std of
    every reward of the sampling epoch: ``std_over: batch`` (all rows of the update, gathered over processes).
  * trained steps: the code trains the first ⌊N·timestep_fraction⌋ transitions (0.99 at N = 10: all but the last),
    ``timestep_selection: first``; ``random`` draws them per trajectory.
  * off-policy reuse: the code takes 2 optimizer updates per sampling epoch (gradient_accumulation_steps =
    num_batches_per_epoch/2), the second on samples of the policy before the first; ``old_policy_every: 2`` does
    that (rollouts use θ_old, refreshed after every 2nd update; θ_old lives in state_dict for exact resume).
    With 1 (the default) every update is on-policy: ρ ≡ 1 and the clip never acts.
  * groups: G consecutive rows of one process's update, across its micro-batches when G does not divide them
    (the advantages are then taken in ``prepare`` over the whole update); the code's sampler spreads a prompt's G
    images over the processes.
CFG: ``model.velocity`` is the CFG-combined field; under grad its unconditional branch is detached from θ
(align/models/flow_transformer.py). flow_grpo's first release (39d3d2c) backpropagated through both branches; since
2d76907 it detaches the unconditional one, as here. Sampling uses the same guided field.
Training grid (``train_grid``): ``uniform`` t_k = k/N (default: the gmm and digits grids' kind, and what Adjoint
Matching trains on here); ``sd3`` SD3's shifted grid with N steps and ``train_shift`` (flow_grpo's: the scheduler's
grid at num_steps = 10, shift 3); ``flux`` FluxPipeline's grid with N steps and the FLUX model's own shift (flow_grpo's
FLUX configs: N = 6); ``model``: the sampler's grid itself (``train_steps: null``).
"""
from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import MISSING

from align.core.batching import index_cond
from align.core.interfaces import Algorithm
from align.core.registry import register_algorithm
from align.core.schema import positive, require
from samplers import (Trajectory, flow_sde_integrate, flow_sde_noise_level, flow_sde_step_mean, flow_sde_step_stds,
                      gaussian_kl_same_std, gaussian_log_prob, make_grid, training_grid)

TrainGrid = enum.StrEnum("TrainGrid", "uniform sd3 flux model")
StdOver = enum.StrEnum("StdOver", "group batch")
Baseline = enum.StrEnum("Baseline", "group_mean leave_one_out")
KLForm = enum.StrEnum("KLForm", "paper code")
Reduce = enum.StrEnum("Reduce", "mean sum")
TimestepSelection = enum.StrEnum("TimestepSelection", "first random")


@dataclass
class FlowGRPOConfig:
    """``algo=flow_grpo``."""
    name: str = "flow_grpo"
    lr: float = MISSING             # paper: 3e-4 (LoRA on SD3.5-M, AdamW); preset: align/setup/paper_settings.py
    # KL coefficient β: paper 0.04 (GenEval, OCR); code's PickScore config 0.01; 0 drops the KL (and v_base calls).
    # Those values were tuned with the code's KL form (kl: code), see the module docstring.
    # Preset: align/setup/paper_settings.py (0.04; FLUX: 0).
    beta: float = MISSING
    noise_level: float = 0.7        # a of g_t = a √((1 − t)/t) (paper and code: 0.7)
    # G: rows per prompt, consecutive in the update (paper: 24 on SD3.5-M with 48 prompts per epoch); it must
    # divide train.batch_size, and a group may span micro-batches (one trajectory per micro-batch fits any G)
    group_size: int = 4
    normalize_std: bool = True      # divide the centred rewards by their std (off: raw centred rewards, exact target)
    std_over: StdOver = StdOver.group  # group (paper) | batch: every reward of the update (code's global_std=True)
    # group_mean (paper): A_i = r_i − mean_G r | leave_one_out: r_i − mean_{j≠i} r_j = G/(G−1) × the group_mean's
    baseline: Baseline = Baseline.group_mean
    adv_eps: float = 1.0e-4         # ε of the std normalisation (code: 1e-4)
    adv_clip_max: Optional[float] = 5.0  # |A| clip (code: 5); null: no clip
    clip_range: float = 1.0e-4      # PPO's ε on the ratio (code: 1e-4, from DDPO)
    kl: KLForm = KLForm.paper       # paper: ‖Δμ‖²/(2 s_k²) | code: ‖Δμ‖²/(2 g_k²) (= Δt_k × paper)
    reduce: Reduce = Reduce.mean    # over dimensions, of log p and the KL: mean (code) | sum (exact likelihood)
    train_grid: TrainGrid = TrainGrid.uniform  # uniform | sd3 | flux | model (see above)
    train_steps: Optional[int] = 10  # N of the training SDE (paper: 10, evaluation on 40); null: sampler.steps
    train_shift: float = 3.0        # shift of train_grid=sd3 (SD3's scheduler: 3)
    timestep_fraction: float = 1.0  # trained transitions per trajectory: ⌊N·fraction⌋ (≥ 1); code's configs: 0.99
    timestep_selection: TimestepSelection = TimestepSelection.first  # first (code) | random (distinct, per row)
    # optimizer updates per sampling policy θ_old (1: on-policy; code's SD3 configs: 2)
    old_policy_every: int = 1

    def validate(self) -> None:
        require(positive(self.noise_level), "algo.noise_level", self.noise_level, "finite and > 0 (a = 0 is the ODE, "
                "whose transitions have no density)")
        require(math.isfinite(self.beta) and self.beta >= 0, "algo.beta", self.beta, "finite and >= 0")
        require(self.group_size >= 2, "algo.group_size", self.group_size, ">= 2 (advantages are relative to a group)")
        require(math.isfinite(self.adv_eps) and self.adv_eps >= 0, "algo.adv_eps", self.adv_eps, "finite and >= 0")
        require(self.adv_clip_max is None or positive(self.adv_clip_max), "algo.adv_clip_max", self.adv_clip_max,
                "finite and > 0, or null")
        require(positive(self.clip_range), "algo.clip_range", self.clip_range, "finite and > 0")
        require(self.train_steps is None or self.train_steps >= 1, "algo.train_steps", self.train_steps,
                ">= 1, or null (sampler.steps)")
        require(positive(self.train_shift), "algo.train_shift", self.train_shift, "finite and > 0")
        require(0 < self.timestep_fraction <= 1, "algo.timestep_fraction", self.timestep_fraction, "in (0, 1]")
        require(self.old_policy_every >= 1, "algo.old_policy_every", self.old_policy_every, ">= 1")

    def validate_batch(self, rows_per_update: int) -> None:
        if rows_per_update % self.group_size:
            raise ValueError(f"algo.group_size={self.group_size} must divide the update's {rows_per_update} rows "
                             "(train.batch_size, per process): every group of G rows shares one prompt")

    def validate_steps(self, n_steps: int) -> None:
        if self.train_grid == "model" and self.train_steps not in (None, n_steps):
            raise ValueError(f"algo.train_grid=model trains on the sampler's {n_steps} steps; got "
                             f"algo.train_steps={self.train_steps} (set it to null, or use train_grid=uniform|sd3|flux)")


def group_advantages(r: torch.Tensor, G: int, normalize_std: bool = True, baseline: str = "group_mean",
                     eps: float = 1e-4, std: torch.Tensor | None = None) -> torch.Tensor:
    """A [B] from rewards r [B] in groups of G consecutive rows: r − mean_G r (or the leave-one-out mean), divided
    by (σ + eps) if ``normalize_std``, σ the group's population std or, if given, ``std`` (one number)."""
    rg = r.reshape(-1, G)
    centred = rg - rg.mean(1, keepdim=True)
    if baseline == "leave_one_out":
        centred = centred * (G / (G - 1))
    if normalize_std:
        sd = rg.std(1, correction=0, keepdim=True) if std is None else std
        centred = centred / (sd + eps)
    return centred.reshape(-1)


def trained_steps(n_steps: int, fraction: float, selection: str, batch: int,
                  generator: torch.Generator) -> torch.Tensor:
    """The transitions k → k+1 each trajectory trains on, [batch, M], M = max(1, ⌊N·fraction⌋): the first M
    (flow_grpo) or M distinct ones drawn per trajectory."""
    M = max(1, int(n_steps * fraction + 1e-9))
    if selection == "random":
        return torch.rand(batch, n_steps, generator=generator).argsort(dim=1)[:, :M]
    return torch.arange(M).expand(batch, M).clone()


def ppo_clipped_loss(adv: torch.Tensor, ratio: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Per row max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε))."""
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))


@register_algorithm("flow_grpo", config=FlowGRPOConfig)
class FlowGRPO(Algorithm):
    """GRPO with the PPO clip and a per-step KL to the base, on the marginal-preserving SDE (module docstring)."""

    uses_reward_gradient = False
    groups_span_micro_batches = True    # prepare() takes the advantages over the whole update

    def __init__(self, cfg: Any, model, reward, ts: torch.Tensor):
        super().__init__(cfg, model, reward, ts)       # self.cfg: an instance of its config dataclass
        cfg = self.cfg
        if cfg.train_grid in ("sd3", "flux"):
            if cfg.train_grid == "flux" and not hasattr(model, "grid_shift"):
                raise ValueError(f"algo.train_grid=flux needs a FLUX model (its scheduler's shift); model={model.name}")
            shift = cfg.train_shift if cfg.train_grid == "sd3" else float(model.grid_shift)
            self.train_ts = make_grid(cfg.train_grid, len(ts) - 1 if cfg.train_steps is None else cfg.train_steps,
                                      shift)
        else:
            self.train_ts = training_grid(cfg.train_grid, ts, cfg.train_steps)
        n, a = len(self.train_ts) - 1, cfg.noise_level
        self.a, self.beta, self.G = a, cfg.beta, cfg.group_size
        self.stds = flow_sde_step_stds(self.train_ts, a)                                 # s_k [N]
        self.gs = torch.tensor([flow_sde_noise_level(self.train_ts, k, a) for k in range(n)], dtype=torch.float64)
        # the std statistic over every micro-batch (and process) of an update needs them all at once
        self.update_wide = cfg.normalize_std and cfg.std_over == "batch"
        self.old_every = cfg.old_policy_every
        if self.old_every > 1:                         # θ_old and the update count: checkpointed, for exact resume
            for i, p in enumerate(self.model.trainable_parameters()):
                self.register_buffer(f"old_theta_{i}", p.detach().clone())
            self.register_buffer("updates_taken", torch.zeros((), dtype=torch.long))

    @property
    def group_size(self) -> int:
        return self.G

    # ---- θ_old -------------------------------------------------------------------------------------------
    def _old_params(self) -> list[torch.Tensor]:
        return [getattr(self, f"old_theta_{i}") for i in range(len(self.model.trainable_parameters()))]

    @contextlib.contextmanager
    def _sampling_policy(self) -> Iterator[None]:
        """θ_old in place of θ for the rollout (a no-op when on-policy or θ_old was just refreshed)."""
        if self.old_every == 1 or int(self.updates_taken) % self.old_every == 0:
            yield
            return
        params = self.model.trainable_parameters()
        with torch.no_grad():
            current = [p.detach().clone() for p in params]
            for p, old in zip(params, self._old_params()):
                p.copy_(old)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, c in zip(params, current):
                    p.copy_(c)

    def after_step(self) -> None:
        if self.old_every > 1:
            self.updates_taken += 1
            if int(self.updates_taken) % self.old_every == 0:
                with torch.no_grad():
                    for old, p in zip(self._old_params(), self.model.trainable_parameters()):
                        old.copy_(p.detach())

    # ---- 1–3: rollout, rewards, advantages ------------------------------------------------------------------
    def rollout(self, x0: torch.Tensor, prompts: list[str], cond: Any, generator: torch.Generator) -> Trajectory:
        """The SDE with θ_old on the training grid (``ts`` of the trajectory), its log-probs, r(x_N) and (unless
        the std runs over the whole update) the advantages."""
        with self._sampling_policy():
            sde = flow_sde_integrate(lambda x, t: self.model.velocity(x, t, cond), x0, self.train_ts, self.a,
                                     generator, self.cfg.reduce)
        with torch.no_grad():
            r = self.reward(self.model.decode(sde.xs[-1]).float(), prompts).float()
        traj = Trajectory(xs=sde.xs, ts=self.train_ts, cond=cond, prompts=prompts, reward_x1=r,
                          extras={"log_probs": sde.log_probs})
        if not self.update_wide and len(prompts) % self.G == 0:    # else prepare(): the std or the groups span
            traj.extras["advantages"] = self.advantages(r)
        return traj

    def advantages(self, r: torch.Tensor, std: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        adv = group_advantages(r, self.G, cfg.normalize_std, cfg.baseline, cfg.adv_eps, std)
        if cfg.adv_clip_max is not None:
            adv = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        return adv

    def prepare(self, trajs: list[Trajectory], generator: torch.Generator,
                gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """The advantages over the update's micro-batches taken in order (a group may span them), with
        ``std_over: batch`` σ of every reward of the update over all processes (flow_grpo's global std)."""
        r = torch.cat([t.reward_x1 for t in trajs])
        std = None
        if self.cfg.normalize_std and self.cfg.std_over == "batch":
            std = gather(r).std(correction=0).to(r)
        for t, adv in zip(trajs, self.advantages(r, std).split([len(t.reward_x1) for t in trajs])):
            t.extras["advantages"] = adv

    # ---- 4: the clipped surrogate and the KL ---------------------------------------------------------------
    def loss(self, traj: Trajectory, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, model = self.cfg, self.model
        N, B = traj.n_steps, traj.xs.shape[1]
        idx = trained_steps(N, cfg.timestep_fraction, cfg.timestep_selection, B, generator)   # [B, M]
        M = idx.shape[1]
        row = torch.arange(B).repeat_interleave(M)
        k = idx.flatten()
        x, x_next = traj.xs[k, row].detach(), traj.xs[k + 1, row].detach()
        t, dt = traj.ts[k], traj.ts[k + 1] - traj.ts[k]
        g, s = self.gs[k], self.stds[k]
        cond = index_cond(traj.cond, row)
        tx = t.to(x)

        mean_theta = flow_sde_step_mean(x, model.velocity(x, tx, cond), t, dt, g)          # grad → θ
        log_p = gaussian_log_prob(x_next, mean_theta, s, cfg.reduce)
        log_p_old = traj.extras["log_probs"][k, row].to(log_p)
        ratio = torch.exp(log_p - log_p_old)
        adv = traj.extras["advantages"].to(log_p)[row]
        policy = ppo_clipped_loss(adv, ratio, cfg.clip_range).mean()
        loss = policy
        logs = {"policy_loss": policy.item(), "ratio_mean": ratio.mean().item(),
                "clip_frac": ((ratio - 1.0).abs() > cfg.clip_range).float().mean().item(),
                "approx_kl_old": 0.5 * (log_p - log_p_old).square().mean().item(),
                "adv_mean": adv.mean().item(), "adv_abs_mean": adv.abs().mean().item(),
                "adv_std": adv.std().item() if adv.numel() > 1 else 0.0}
        if self.beta > 0:
            with torch.no_grad():
                mean_base = flow_sde_step_mean(x, model.base_velocity(x, tx, cond), t, dt, g)
            kl = gaussian_kl_same_std(mean_theta, mean_base, s if cfg.kl == "paper" else g, cfg.reduce).mean()
            loss = loss + self.beta * kl
            logs["kl"] = kl.item()
        return loss, logs
