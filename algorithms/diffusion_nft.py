"""DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): online RL on the forward process, no likelihoods, no reward
gradients. Our convention: t = 0 noise, t = 1 data, x_t = t·x_1 + (1 − t)·ε, target velocity v = x_1 − ε.

One update (the paper's algorithm box; docs/diffusion_nft.md has the derivations):
  1. collect: x_1 = the Euler ODE of the old (sampling) policy v_old = v_{θ_old} from x_0, no grad, on the
     collection grid (``algo.collect_grid``/``collect_steps``; default the sampler's); r_raw = r(decode(x_1)),
     no reward gradient (a black-box reward is accepted);
  2. optimality probability, per group of G rows sharing a prompt (``algo.normaliser``):
       A = (r_raw − mean_group r_raw) / (Z + 1e-4),   r = ½ + ½·clip(A / a, −1, 1)   (a = ``algo.adv_clip``)
     Z: the std of every reward of the update over all processes (``global_std``, the code's default), or of the
     group (``group_std``); ``fixed``: A = r_raw (no centring, no division: r = ½ + ½ clip(r_raw / a, −1, 1), a
     fixed map, e.g. for a calibrated reward or the exactness test);
  3. forward process: per sample K times t (``algo.t_sampling``: the collection grid's t_0..t_{N−1}, K distinct
     ones, the code's; or t ~ U[0, 1)), ε ~ N(0, I), x_t = t x_1 + (1 − t) ε, and
       v⁺ = (1 − β) v_old + β v_θ,   v⁻ = (1 + β) v_old − β v_θ          (v_old under no grad)
       L(θ) = mean[ r·ℓ(v⁺) + (1 − r)·ℓ(v⁻) ] · s  +  λ_KL·mean ‖v_θ − v_base‖²
     ℓ(v) = mean over elements of (v − (x_1 − ε))²          (``weighting: uniform``, the paper's loss), or
     ℓ(v) = mean (x̂_1 − x_1)² / sg(mean |x̂_1 − x_1|),  x̂_1 = x_t + (1 − t) v   (``adaptive``, the paper's adaptive
     loss weighting as its code computes it: the x_1-prediction error normalised by its own mean absolute value);
     s = 1 (``loss_scale: paper``) or a/β (``code``: the released script's ×adv_clip_max/β);
  4. after the optimizer step (``after_step``): θ_old ← η_i θ_old + (1 − η_i) θ,
       η_i = min(rate·max(i − flat, 0), η_max),   i = optimizer steps taken so far
     (the code's decay_type 1: rate 1e-3, η_max 0.5, flat 0; its decay_type 2 for OCR: 7.5e-3, 0.999, 75).

At a fixed x_t the loss is quadratic in v_θ; with v_old the exact velocity of the old samples its minimiser is
v_old + (2/β)·α·(v⁺_r − v_old), α = E[r | x_t], v⁺_r = E[r·(x_1 − ε) | x_t] / α the velocity of the r-tilted
old distribution (the paper's theorem; tested in tests/test_diffusion_nft_exact.py with ``weighting: uniform``:
the adaptive weight depends on (x_1, ε) and moves the minimiser).

θ_old is a copy of ``model.trainable_parameters()`` held in this module's buffers (exact resume); v_old is the
model's own ``velocity`` with those values swapped in under no grad, so it works for any FlowModel (gmm's MLP
residual, the LoRA of digits and SD3). It is always evaluated before v_θ, whose CFG branch must see unchanged
parameters at its backward.

CFG: ``model.velocity`` is the CFG-combined field v_u + w (v_c − v_u) with the model's ``guidance_scale`` w, in the
collection, in v_old and in v_θ (whose unconditional branch is detached from θ under grad). The paper trains and
samples CFG-free (guidance 1, "CFG-free" in its title claims); with w ≠ 1 this trains the guided field instead.
The paper's setting: ``model.guidance_scale=1`` (digits defaults to 2, SD3 to 5).

Departures from the released code (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py): Euler ODE collection (theirs: a
10-step DPM2 solver, noise level 0.7 deterministic); one loss over all B·K rows (theirs: one backward per time, same
gradient); groups are G consecutive rows of a process's update, across its micro-batches (theirs: all samples of one prompt
in the epoch, over processes);
evaluation with θ itself (theirs: an EMA of θ, decay 0.9); KL off by default (``kl_coef``; theirs 1e-4).
"""
from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import MISSING

from align.core.batching import index_cond, per_sample
from align.core.interfaces import Algorithm
from align.core.registry import register_algorithm
from align.core.schema import positive, require
from samplers import Trajectory, euler_integrate, one_step_prediction, training_grid

CollectGrid = enum.StrEnum("CollectGrid", "model uniform")
Normaliser = enum.StrEnum("Normaliser", "global_std group_std fixed")
TimeSampling = enum.StrEnum("TimeSampling", "grid uniform")
Weighting = enum.StrEnum("Weighting", "uniform adaptive")
LossScale = enum.StrEnum("LossScale", "paper code")

STD_EPS = 1e-4          # the code's advantage normaliser offset
ADAPTIVE_MIN = 1e-5     # the code's floor on the adaptive weight


@dataclass
class DiffusionNFTConfig:
    """``algo=diffusion_nft``."""
    name: str = "diffusion_nft"
    lr: float = MISSING             # paper/code: 3e-4 (SD3.5-M LoRA r 32, AdamW wd 1e-4); preset: align/setup/paper_settings
    beta: float = 1.0               # β, the mixing (guidance) strength of v± (code default 1.0; 0.1 for OCR, multi-reward)
    # G: rows per prompt group (paper: 24 images per prompt on SD3.5-M). 4 so that the built-in budgets split
    # (digits: 8 rows per update); must divide train.batch_size (a group may span micro-batches).
    group_size: int = 4
    # Z of the optimality map: global_std (std of all the update's rewards, over processes; the code's default) |
    # group_std (std within the group) | fixed (no centring, no division: r = ½ + ½ clip(r_raw / adv_clip, −1, 1))
    normaliser: Normaliser = Normaliser.global_std
    adv_clip: float = 5.0           # a: r = ½ + ½ clip(A / a, −1, 1) (code: adv_clip_max 5, i.e. A clipped to ±5)
    # times per sample: grid (the collection grid's t_0..t_{N−1}, n_times distinct ones; the code) | uniform (U[0, 1))
    t_sampling: TimeSampling = TimeSampling.grid
    n_times: Optional[int] = None   # K noised copies per sample; null: ⌊0.99·N⌋ (the code's timestep_fraction 0.99)
    weighting: Weighting = Weighting.adaptive   # uniform: plain velocity MSE | adaptive: the paper's adaptive weight
    loss_scale: LossScale = LossScale.paper     # paper: L as written | code: × adv_clip / β (the released script)
    kl_coef: float = 0.0            # λ_KL of mean ‖v_θ − v_base‖² (code: 1e-4; 0 skips the base evaluation)
    # The old-policy schedule η_i = min(eta_rate·max(i − eta_flat, 0), eta_max) (code decay_type 1: 1e-3, 0.5, 0);
    # eta_max = 0: on-policy (θ_old = θ after every step); eta_rate ≥ 1 with eta_max = 1: θ_old frozen at the start.
    eta_rate: float = 1.0e-3
    eta_max: float = 0.5
    eta_flat: int = 0
    # The collection grid: model (the sampler's grid) | uniform (t_k = k/N, N = collect_steps or sampler.steps);
    # the paper collects on 10 steps and evaluates on 40.
    collect_grid: CollectGrid = CollectGrid.model
    collect_steps: Optional[int] = None

    def validate(self) -> None:
        require(positive(self.beta), "algo.beta", self.beta, "finite and > 0")
        require(positive(self.adv_clip), "algo.adv_clip", self.adv_clip, "finite and > 0")
        require(math.isfinite(self.kl_coef) and self.kl_coef >= 0, "algo.kl_coef", self.kl_coef, "finite and >= 0")
        require(math.isfinite(self.eta_rate) and self.eta_rate >= 0, "algo.eta_rate", self.eta_rate,
                "finite and >= 0")
        require(0 <= self.eta_max <= 1, "algo.eta_max", self.eta_max, "in [0, 1]")
        require(self.eta_flat >= 0, "algo.eta_flat", self.eta_flat, ">= 0")
        require(self.n_times is None or self.n_times >= 1, "algo.n_times", self.n_times, ">= 1 (or null)")
        require(self.collect_steps is None or self.collect_steps >= 1, "algo.collect_steps", self.collect_steps,
                ">= 1 (or null)")
        if self.collect_grid == "model" and self.collect_steps is not None:
            raise ValueError(f"algo.collect_steps={self.collect_steps} needs algo.collect_grid=uniform (collect_grid="
                             "model collects on the sampler's own grid); valid choices: model, uniform")
        smallest = 1 if self.normaliser == "fixed" else 2
        require(self.group_size >= smallest, "algo.group_size", self.group_size,
                f">= {smallest}" + (" (the group mean needs two rows; 1 only with algo.normaliser=fixed)"
                                    if smallest == 2 else ""))

    def validate_steps(self, n_steps: int) -> None:
        """K distinct grid times per sample need K <= N, the collection grid's steps."""
        N = self.collect_steps if self.collect_steps is not None else n_steps
        if self.t_sampling == "grid" and self.n_times is not None and self.n_times > N:
            raise ValueError(f"algo.n_times={self.n_times} distinct grid times per sample, but the collection grid "
                             f"has {N} steps (sampler.steps / algo.collect_steps); lower it or use "
                             "algo.t_sampling=uniform")

    def validate_batch(self, rows_per_update: int) -> None:
        if rows_per_update % self.group_size:
            raise ValueError(f"algo.group_size={self.group_size} must divide the {rows_per_update} rows of an update "
                             "(train.batch_size, per process): every group of G rows shares one prompt")


def eta_schedule(i: int, rate: float, eta_max: float, flat: int) -> float:
    """η_i = min(rate·max(i − flat, 0), η_max): the weight kept on θ_old after the i-th optimizer step."""
    return min(rate * max(i - flat, 0), eta_max)


def optimality(r_raw: torch.Tensor, group_size: int, normaliser: str, adv_clip: float,
               global_std: torch.Tensor | None = None) -> torch.Tensor:
    """r ∈ [0, 1] from raw rewards [B] in groups of G consecutive rows (see the module docstring, step 2)."""
    if normaliser == "fixed":
        A = r_raw
    else:
        groups = r_raw.reshape(-1, group_size)
        centred = groups - groups.mean(1, keepdim=True)
        Z = groups.std(1, unbiased=False, keepdim=True) if normaliser == "group_std" else global_std
        A = (centred / (Z + STD_EPS)).reshape(-1)
    return 0.5 + 0.5 * torch.clamp(A / adv_clip, -1.0, 1.0)


def row_loss(v: torch.Tensor, target: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, x1: torch.Tensor,
             weighting: str) -> torch.Tensor:
    """ℓ(v) per row [R]: the velocity MSE (``uniform``), or the adaptive x̂_1-regression (module docstring, step 3)."""
    if weighting == "uniform":
        return (v - target).pow(2).flatten(1).mean(1)
    err = (one_step_prediction(x_t, t, v) - x1).flatten(1)
    weight = err.detach().double().abs().mean(1).clamp(min=ADAPTIVE_MIN).to(err.dtype)
    return err.pow(2).mean(1) / weight


def implicit_policies(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """v⁺ = (1 − β) v_old + β v_θ and v⁻ = (1 + β) v_old − β v_θ."""
    return (1.0 - beta) * v_old + beta * v_theta, (1.0 + beta) * v_old - beta * v_theta


@register_algorithm("diffusion_nft", config=DiffusionNFTConfig)
class DiffusionNFT(Algorithm):
    """Flow matching on the old policy's own samples, weighted between implicit positive and negative policies."""

    uses_reward_gradient = False
    update_wide = True           # the optimality map's Z is the std over the whole update (all micro-batches)
    groups_span_micro_batches = True    # ... and its groups are taken over the update's micro-batches in order

    def __init__(self, cfg: Any, model, reward, ts: torch.Tensor):
        super().__init__(cfg, model, reward, ts)       # self.cfg: an instance of its config dataclass
        cfg = self.cfg
        self.beta = cfg.beta
        self.collect_ts = training_grid(cfg.collect_grid, ts, cfg.collect_steps)
        N = len(self.collect_ts) - 1
        self.n_times = cfg.n_times if cfg.n_times is not None else max(1, int(N * 0.99))
        if cfg.t_sampling == "grid" and self.n_times > N:
            raise ValueError(f"algo.n_times={self.n_times} exceeds the collection grid's {N} steps")
        # θ_old: the sampling policy's values of the trainable parameters, and i, the optimizer steps taken
        for k, p in enumerate(model.trainable_parameters()):
            self.register_buffer(f"theta_old_{k:04d}", p.detach().clone())
        self.register_buffer("steps_taken", torch.zeros((), dtype=torch.long))

    @property
    def group_size(self) -> int:
        return self.cfg.group_size

    def old_parameters(self) -> list[torch.Tensor]:
        return [b for n, b in self.named_buffers() if n.startswith("theta_old_")]

    @contextlib.contextmanager
    def old_policy(self) -> Iterator[None]:
        """The model with θ_old's values in its trainable parameters (no grad), θ's restored on exit."""
        params = self.model.trainable_parameters()
        with torch.no_grad():
            kept = [p.detach().clone() for p in params]
            for p, old in zip(params, self.old_parameters(), strict=True):
                p.copy_(old)
        try:
            with torch.no_grad():
                yield
        finally:
            with torch.no_grad():
                for p, k in zip(params, kept):
                    p.copy_(k)

    # ---- 1. collect -------------------------------------------------------------------------------------------
    def rollout(self, x0: torch.Tensor, prompts: list[str], cond: Any, generator: torch.Generator) -> Trajectory:
        """x_1 from the old policy (Euler ODE on the collection grid) and its raw reward, all without grad."""
        with self.old_policy():
            xs = euler_integrate(lambda x, t: self.model.velocity(x, t, cond), x0, self.collect_ts)
            r_raw = self.reward(self.model.decode(xs[-1]).float(), prompts).float()
        return Trajectory(xs=xs, ts=self.collect_ts, cond=cond, prompts=prompts, reward_x1=r_raw.detach())

    # ---- 2. optimality probabilities, over the whole update -------------------------------------------------
    def prepare(self, trajs: list[Trajectory], generator: torch.Generator,
                gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        cfg = self.cfg
        global_std = None
        if cfg.normaliser == "global_std":
            global_std = gather(torch.cat([tr.reward_x1 for tr in trajs])).std(unbiased=False)
        r = optimality(torch.cat([tr.reward_x1 for tr in trajs]), self.group_size, cfg.normaliser, cfg.adv_clip,
                       global_std)
        for tr, r_tr in zip(trajs, r.split([len(tr.reward_x1) for tr in trajs])):
            tr.extras["optimality"] = r_tr

    # ---- 3. the loss on the forward process -----------------------------------------------------------------
    def draw_times(self, B: int, generator: torch.Generator) -> torch.Tensor:
        """[B, K] times: K distinct grid times t_0..t_{N−1} per sample, or K draws of U[0, 1)."""
        K = self.n_times
        if self.cfg.t_sampling == "uniform":
            return torch.rand(B, K, generator=generator, dtype=torch.float64)
        N = len(self.collect_ts) - 1
        picks = torch.rand(B, N, generator=generator).argsort(dim=1)[:, :K]
        return self.collect_ts[:N][picks]

    def loss(self, traj: Trajectory, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        if "optimality" not in traj.extras:            # a caller that skipped prepare: this micro-batch alone
            self.prepare([traj], generator, lambda x: x)
        model, cfg = self.model, self.cfg
        x1 = traj.x1.detach()
        B, K = x1.shape[0], self.n_times
        t = self.draw_times(B, generator).reshape(-1).to(x1.device, x1.dtype)         # [B·K], sample-major
        rows = torch.arange(B).repeat_interleave(K)
        x1_rows = x1[rows.to(x1.device)]
        eps = torch.randn(x1_rows.shape, generator=generator, dtype=torch.float32).to(x1)
        tb = per_sample(t, x1_rows)
        x_t = tb * x1_rows + (1.0 - tb) * eps
        target = x1_rows - eps
        cond = index_cond(traj.cond, rows)
        r = traj.extras["optimality"].to(x1.device, x1.dtype)[rows.to(x1.device)]

        # v_old (and v_base) before v_θ: the CFG branch of v_θ checks at its backward that θ is unchanged
        with self.old_policy():
            v_old = model.velocity(x_t, t, cond)
        v_base = None
        if cfg.kl_coef > 0:
            with torch.no_grad():
                v_base = model.base_velocity(x_t, t, cond)
        v_theta = model.velocity(x_t, t, cond)                                       # grad → θ
        v_pos, v_neg = implicit_policies(v_theta, v_old, self.beta)
        l_pos = row_loss(v_pos, target, x_t, t, x1_rows, cfg.weighting)
        l_neg = row_loss(v_neg, target, x_t, t, x1_rows, cfg.weighting)
        scale = cfg.adv_clip / self.beta if cfg.loss_scale == "code" else 1.0
        policy = (r * l_pos + (1.0 - r) * l_neg).mean() * scale
        loss = policy
        logs = {"policy_loss": policy.item(), "optimality_mean": r.mean().item(),
                "old_deviation": (v_theta - v_old).detach().pow(2).mean().item(),
                "eta": eta_schedule(int(self.steps_taken) + 1, cfg.eta_rate, cfg.eta_max, cfg.eta_flat)}
        if v_base is not None:
            kl = (v_theta - v_base).pow(2).flatten(1).mean(1).mean()
            loss = loss + cfg.kl_coef * kl
            logs["kl"] = kl.item()
        return loss, logs

    # ---- 4. the old-policy schedule ---------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self) -> None:
        """θ_old ← η_i θ_old + (1 − η_i) θ after the i-th optimizer step taken."""
        self.steps_taken += 1
        eta = eta_schedule(int(self.steps_taken), self.cfg.eta_rate, self.cfg.eta_max, self.cfg.eta_flat)
        for old, p in zip(self.old_parameters(), self.model.trainable_parameters(), strict=True):
            old.mul_(eta).add_(p.detach().to(old.dtype), alpha=1.0 - eta)
