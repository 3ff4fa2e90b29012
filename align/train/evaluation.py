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

from align.core.interfaces import FlowModel, Reward
from align.metrics.paper_metrics import cosine_diversity, feature_diversity, frechet_distance
from align.train.sharding import Shard
from samplers import euler_integrate


class Evaluator:
    """Samples the finetuned and base models from the same fixed x_0 and prompts with the Euler ODE.

    Prompts: ``n_samples // group_size`` prompts taken in turn from the prompt set, ``group_size``
    samples each. Metrics are computed per distinct prompt and averaged over prompts. ``fid_reference``:
    ``paired`` (base samples from the same noise) or ``independent`` (from a second, independent fixed noise).

    Work is done in chunks of ``batch_size`` rows; with several processes (``shard``) each samples and scores a
    contiguous run of those chunks (``align/train/sharding.py``), so every figure is the one-process figure exactly;
    samples are gathered on the main process only.

    A non-finite reward is reported, not raised: ``eval/reward`` and ``eval/reward_std`` are then NaN (null in
    metrics.jsonl) and ``eval/reward_nonfinite`` counts the samples it was non-finite for (0 normally).

    Beside the trained reward: a mix's parts (``reward.part_values``: ``eval/reward/<label>``, unweighted) and the
    held-out rewards ``extra_rewards`` (``eval.rewards``: ``eval/heldout/<label>``), means over the evaluation
    samples, scored in the same chunks; the step-0 evaluation, of the untouched model, is the base's value.
    """

    FID_REFERENCES = ("independent", "paired")

    def __init__(self, model: FlowModel, reward: Reward, ts: torch.Tensor, prompt_set: list[str],
                 n_samples: int, group_size: int, seed: int, batch_size: int = 32, fid_reference: str = "paired",
                 shard: Shard = Shard(), extra_rewards: dict[str, Reward] | None = None):
        if n_samples < 2 or group_size < 2:
            raise ValueError("eval.n_samples and eval.group_size must be >= 2")
        if fid_reference not in self.FID_REFERENCES:
            raise ValueError(f"eval.fid_reference={fid_reference!r}: valid choices are "
                             f"{', '.join(self.FID_REFERENCES)}")
        self.fid_reference, self.seed, self.prompt_set = fid_reference, int(seed), list(prompt_set)
        self.model, self.reward, self.ts, self.batch_size, self.shard = model, reward, ts, batch_size, shard
        self.extra_rewards = dict(extra_rewards or {})     # eval.rewards: held-out rewards, scored, never trained
        n_groups = max(1, n_samples // group_size)
        self.prompts = [prompt_set[g % len(prompt_set)] for g in range(n_groups) for _ in range(group_size)]
        gen = torch.Generator().manual_seed(int(seed) + 1_000_003)
        self.noise = model.sample_noise(len(self.prompts), gen)
        self._base: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reference: torch.Tensor | None = None
        if self.extra_rewards:
            self._preflight()

    @torch.no_grad()
    def _chunks(self, velocity: Callable[..., torch.Tensor], noise: torch.Tensor, prompts: list[str],
                score: bool) -> list[tuple[Any, ...]]:
        """This process's chunks: (x_1,) or, with ``score``, (x_1, rewards, features, columns) each, on the CPU."""
        out, b = [], self.batch_size
        for i in self.shard.starts(len(prompts), b):
            p = prompts[i:i + b]
            cond = self.model.encode(p)
            x1 = euler_integrate(lambda x, t: velocity(x, t, cond), noise[i:i + b], self.ts, record=False)
            if score:
                rewards, columns = self._score(self.model.decode(x1).float(), p)
                out.append((x1.cpu(), rewards, self.model.features(x1).float().cpu(), columns))
            else:
                out.append((x1.cpu(),))
        return out

    def _score(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The trained reward of each row and the extra columns: a mix's parts, unweighted (``reward/<label>``),
        and the held-out rewards (``heldout/<label>``); a mix's total is its parts' weighted sum, scored once."""
        columns = {}
        if hasattr(self.reward, "part_values"):
            values = self.reward.part_values(images, prompts)
            rewards = self.reward.combine(values)
            columns.update({f"reward/{k}": v.float().cpu() for k, v in values.items()})
        else:
            rewards = self.reward(images, prompts)
        for label, reward in self.extra_rewards.items():
            columns[f"heldout/{label}"] = reward(images, prompts).float().cpu()
        return rewards.float().cpu(), columns

    def _preflight(self) -> None:
        """The held-out rewards score two noise samples (as the trainer checks the trained one), so a wrong shape
        or a non-finite value stops before any sampling."""
        x = self.model.sample_noise(2, torch.Generator().manual_seed(0))
        with torch.no_grad():
            images = self.model.decode(x).float()
            for label, reward in self.extra_rewards.items():
                r = reward(images, [self.prompt_set[0]] * 2)
                if not isinstance(r, torch.Tensor) or r.shape != (2,):
                    raise ValueError(f"eval.rewards: {label} returned "
                                     f"{tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__} "
                                     "for 2 samples, expected a tensor of shape (2,)")
                if not torch.isfinite(r).all():
                    raise ValueError(f"eval.rewards: {label} returned non-finite values {r.tolist()} for 2 "
                                     "noise samples")

    def _x1(self, chunks: list[tuple[torch.Tensor, ...]]) -> torch.Tensor | None:
        """Every process's x_1 chunks in row order, on the main process's device (None on the others)."""
        every = self.shard.gather([c[0] for c in chunks])
        return None if every is None else torch.cat([x for part in every for x in part]).to(self.model.device)

    def _scored(self, velocity: Callable[..., torch.Tensor], noise: torch.Tensor
                ) -> tuple[list[tuple[Any, ...]], torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """This process's chunks of the evaluation prompts from ``noise``, and the rewards, features and extra
        columns of all rows (gathered on every process, in the same chunks as the rewards: they are small)."""
        chunks = self._chunks(velocity, noise, self.prompts, score=True)
        every = [c for part in self.shard.all_gather([c[1:] for c in chunks]) for c in part]
        rewards, feats = (torch.cat([c[i] for c in every]) for i in (0, 1))
        columns = {k: torch.cat([c[2][k] for c in every]) for k in every[0][2]}
        return chunks, rewards, feats, columns

    def sample(self, velocity: Callable[..., torch.Tensor], noise: torch.Tensor | None = None,
               prompts: list[str] | None = None) -> torch.Tensor | None:
        """x_1 from x_0 = noise by the Euler ODE with ``velocity(x, t, cond)`` (default: the evaluation set)."""
        noise = self.noise if noise is None else noise
        return self._x1(self._chunks(velocity, noise, self.prompts if prompts is None else prompts, score=False))

    def base(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards and features of the base model's samples (computed once)."""
        if self._base is None:
            self._base = self._scored(self.model.base_velocity, self.noise)[1:3]
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
            self._reference = self._scored(self.model.base_velocity, self.reference_noise())[2]
        return self._reference

    def final_samples(self, n: int) -> dict[str, Any] | None:
        """``n`` samples of the current model in samples_final.pt's format: x_0 from the final samples' own
        stream (seed + 2000003), prompts taken in turn from the prompt set (None on processes but the main)."""
        gen = torch.Generator().manual_seed(self.seed + 2_000_003)
        prompts = [self.prompt_set[i % len(self.prompt_set)] for i in range(n)]
        x0 = self.model.sample_noise(n, gen)
        x1 = self.sample(self.model.velocity, x0, prompts)
        return None if x1 is None else {"x1": x1.cpu(), "x0": x0.cpu(), "prompts": prompts}

    def __call__(self) -> tuple[dict[str, float], torch.Tensor | None]:
        """The metrics (on every process) and the evaluated x_1 (on the main process; None on the others)."""
        chunks, rewards, feats, columns = self._scored(self.model.velocity, self.noise)
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
                   "eval/reward_nonfinite": int((~torch.isfinite(rewards)).sum()),
                   "eval/diversity": sum(div) / len(div), "eval/fid": sum(fid) / len(fid),
                   # the paper's units: mean pairwise cosine distance within a prompt, in units of 1e-2
                   "eval/diversity_cos": sum(cos) / len(cos)}
        # a mix's parts (eval/reward/<label>, unweighted) and the held-out rewards (eval/heldout/<label>): means over
        # the evaluation samples, each in its own units
        metrics.update({f"eval/{k}": v.mean().item() for k, v in columns.items()})
        return metrics, self._x1(chunks)

