"""Periodic evaluation on fixed noise and prompts: reward, diversity and prior preservation (FID vs base).

FID reference (``eval.fid_reference``): ``independent`` (the paper's; SD3's default) — the base model's samples
of the same prompts from a second fixed noise set, drawn independently of the evaluation noise, so the
untouched model's FID is the finite-sample distance between two base sample sets (> 0, the paper's Base row);
``paired`` (digits' and gmm's default) — the base model's samples from the evaluation noise itself, so the
untouched model scores exactly 0. Both reference sets are sampled once per run and cached.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from align.interfaces import FlowModel, Reward
from align.metrics import cosine_diversity, feature_diversity, frechet_distance
from samplers import euler_integrate


class Evaluator:
    """Samples the finetuned and base models from the same fixed x_0 and prompts with the Euler ODE.

    Prompts: ``n_samples // group_size`` prompts taken in turn from the prompt set, ``group_size``
    samples each. Metrics are computed per distinct prompt and averaged over prompts. ``fid_reference``:
    ``paired`` (base samples from the same noise) or ``independent`` (from a second, independent fixed noise).
    """

    FID_REFERENCES = ("independent", "paired")

    def __init__(self, model: FlowModel, reward: Reward, ts: torch.Tensor, prompt_set: list[str],
                 n_samples: int, group_size: int, seed: int, batch_size: int = 256, fid_reference: str = "paired"):
        if n_samples < 2 or group_size < 2:
            raise ValueError("eval.n_samples and eval.group_size must be >= 2")
        if fid_reference not in self.FID_REFERENCES:
            raise ValueError(f"eval.fid_reference={fid_reference!r}: valid choices are "
                             f"{', '.join(self.FID_REFERENCES)}")
        self.fid_reference, self.seed, self.prompt_set = fid_reference, int(seed), list(prompt_set)
        self.model, self.reward, self.ts, self.batch_size = model, reward, ts, batch_size
        n_groups = max(1, n_samples // group_size)
        self.prompts = [prompt_set[g % len(prompt_set)] for g in range(n_groups) for _ in range(group_size)]
        gen = torch.Generator().manual_seed(int(seed) + 1_000_003)
        self.noise = model.sample_noise(len(self.prompts), gen)
        self._base: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reference: torch.Tensor | None = None

    @torch.no_grad()
    def sample(self, velocity: Callable[..., torch.Tensor], noise: torch.Tensor | None = None,
               prompts: list[str] | None = None) -> torch.Tensor:
        """x_1 from x_0 = noise by the Euler ODE with ``velocity(x, t, cond)``, in chunks."""
        noise = self.noise if noise is None else noise
        prompts = self.prompts if prompts is None else prompts
        out = []
        for i in range(0, len(prompts), self.batch_size):
            p = prompts[i:i + self.batch_size]
            cond = self.model.encode(p)
            out.append(euler_integrate(lambda x, t: velocity(x, t, cond), noise[i:i + self.batch_size],
                                       self.ts, record=False))
        return torch.cat(out)

    @torch.no_grad()
    def _score(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rewards, feats = [], []
        for i in range(0, len(self.prompts), self.batch_size):
            xb, pb = x1[i:i + self.batch_size], self.prompts[i:i + self.batch_size]
            rewards.append(self.reward(self.model.decode(xb).float(), pb).float().cpu())
            feats.append(self.model.features(xb).float().cpu())
        return torch.cat(rewards), torch.cat(feats)

    def base(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards and features of the base model's samples (computed once)."""
        if self._base is None:
            self._base = self._score(self.sample(self.model.base_velocity))
        return self._base

    def reference_noise(self) -> torch.Tensor:
        """The independent reference set's x_0: a second fixed draw (its own generator stream), same prompts."""
        gen = torch.Generator().manual_seed(self.seed + 2_000_029)
        return self.model.sample_noise(len(self.prompts), gen)

    def reference_features(self) -> torch.Tensor:
        """Features of the FID reference set (computed once): the base samples from the evaluation noise
        (``paired``) or from ``reference_noise()`` (``independent``)."""
        if self.fid_reference == "paired":
            return self.base()[1]
        if self._reference is None:
            x1 = self.sample(self.model.base_velocity, self.reference_noise())
            self._reference = self._score(x1)[1]
        return self._reference

    @torch.no_grad()
    def final_samples(self, n: int) -> dict[str, Any]:
        """``n`` samples of the current model in samples_final.pt's format: x_0 from the final samples' own
        stream (seed + 2000003), prompts taken in turn from the prompt set."""
        gen = torch.Generator().manual_seed(self.seed + 2_000_003)
        prompts = [self.prompt_set[i % len(self.prompt_set)] for i in range(n)]
        x0 = self.model.sample_noise(n, gen)
        x1 = self.sample(self.model.velocity, x0, prompts)
        return {"x1": x1.cpu(), "x0": x0.cpu(), "prompts": prompts}

    def __call__(self) -> tuple[dict[str, float], torch.Tensor]:
        x1 = self.sample(self.model.velocity)
        rewards, feats = self._score(x1)
        base_feats = self.reference_features()
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(self.prompts):
            groups.setdefault(p, []).append(i)
        div, cos, fid = [], [], []
        for idx in groups.values():
            div.append(feature_diversity(feats[idx]))
            cos.append(cosine_diversity(feats[idx]))
            fid.append(frechet_distance(feats[idx], base_feats[idx]))
        metrics = {"eval/reward": rewards.mean().item(), "eval/reward_std": rewards.std().item(),
                   "eval/diversity": sum(div) / len(div), "eval/fid": sum(fid) / len(fid),
                   # the paper's units: mean pairwise cosine distance within a prompt, in units of 1e-2
                   "eval/diversity_cos": sum(cos) / len(cos)}
        return metrics, x1

