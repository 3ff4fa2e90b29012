"""The one training loop for every algorithm.

Seeding, accelerate (one process or many), AdamW over the algorithm's parameter groups, per-group
gradient-norm clipping, a NaN/Inf guard, tqdm, TensorBoard + metrics.jsonl, periodic evaluation,
atomic checkpoints and exact resume, and ``samples_final.pt`` at the end.
"""
from __future__ import annotations

import math
import os
import random
import time
from typing import Any, Iterable

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from align.build import (build_algorithm, build_grid, build_model, build_reward, check_train_config,
                         preflight)
from align.checkpoint import load_latest, save_checkpoint
from align.evaluation import Evaluator
from align.prompts import load_prompts
from align.run_logging import RunLogger
from samplers import Trajectory


def preview_order(prompts: list[str], per_prompt: int = 8) -> list[int]:
    """Indices for a sample grid: the first ``per_prompt`` samples of each distinct prompt, prompt by prompt
    (all samples when there is only one prompt)."""
    if len(set(prompts)) < 2:
        return list(range(len(prompts)))
    seen: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        seen.setdefault(p, []).append(i)
    return [i for idx in seen.values() for i in idx[:per_prompt]]


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite updates."""


def _device(cfg: DictConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(cfg.device)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str):
        check_train_config(cfg)
        self.cfg, self.run_dir = cfg, run_dir
        self.accelerator = Accelerator(cpu=_device(cfg) == "cpu")
        self.is_main = self.accelerator.is_main_process
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))
        seed = int(cfg.seed)
        torch.manual_seed(seed)           # identical initialisation on every process
        random.seed(seed)
        np.random.seed(seed)

        self.model = build_model(cfg)
        self.reward = build_reward(cfg, self.model)
        self.ts = build_grid(cfg)
        self.prompt_set = load_prompts(cfg.prompts, self.model)
        self.algo = build_algorithm(cfg, self.model, self.reward, self.ts)
        device = self.accelerator.device
        self.model.to(device)
        self.reward.to(device).requires_grad_(False).eval()
        self.algo.to(device)
        preflight(self.model, self.reward, self.prompt_set)

        t = cfg.train
        self.groups = self.algo.param_groups()
        self.optimizer = torch.optim.AdamW(
            [{k: v for k, v in g.items()} for g in self.groups], lr=float(t.lr), betas=tuple(t.betas),
            weight_decay=float(t.weight_decay), eps=float(t.adam_eps))
        # Per-process stream for noise, prompts and the algorithms' own random choices.
        self.generator = torch.Generator().manual_seed(seed * 1000 + self.accelerator.process_index)
        self.evaluator = Evaluator(self.model, self.reward, self.ts, self.prompt_set, int(cfg.eval.n_samples),
                                   int(cfg.eval.group_size), seed,
                                   fid_reference=str(cfg.eval.get("fid_reference", "paired")))
        self.step, self.bad_in_row, self.skipped, self.elapsed = 0, 0, 0, 0.0
        # Load the checkpoint here, not in train(): a checkpoint that cannot be resumed (e.g. written by another
        # number of processes) is then a clear error before any work starts.
        self.resume_step = None
        if cfg.resume:
            loaded = load_latest(run_dir)
            if loaded is not None:
                self.resume_step, state = loaded
                self.load_state(state)

    # ---- checkpoint state -------------------------------------------------------------------------------
    def state(self, rng_states: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        """Everything a resume needs; ``rng`` holds one entry per process (each draws its own noise)."""
        return {"step": self.step, "model": self.model.finetune_state_dict(), "algo": self.algo.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": rng_states or [self._rng_state()],
                "bad_in_row": self.bad_in_row, "skipped": self.skipped, "elapsed": self.elapsed}

    def _rng_state(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.model.load_finetune_state_dict(state["model"])
        self.algo.load_state_dict(state["algo"])
        self.optimizer.load_state_dict(state["optimizer"])
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        if len(state["rng"]) != world:
            raise ValueError(f"{self.run_dir}: the checkpoint was written by {len(state['rng'])} process(es) and "
                             f"this run has {world}; resume with the same number of processes (the noise "
                             "streams are per process)")
        self.generator.set_state(state["rng"][rank]["generator"])
        torch.set_rng_state(state["rng"][rank]["torch"])
        self.bad_in_row, self.skipped, self.elapsed = state["bad_in_row"], state["skipped"], state["elapsed"]

    def save(self) -> None:
        from accelerate.utils import gather_object

        rng = [self._rng_state()]
        if self.accelerator.num_processes > 1:
            rng = gather_object(rng)          # every process's streams, in rank order
        if self.is_main:
            save_checkpoint(self.run_dir, self.step, self.state(rng), int(self.cfg.train.keep_checkpoints),
                            export=self.model.save_finetuned)
        self.accelerator.wait_for_everyone()

    # ---- one update -------------------------------------------------------------------------------------
    def _rollout_batch(self, n: int):
        prompts = [self.prompt_set[i] for i in
                   torch.randint(len(self.prompt_set), (n,), generator=self.generator).tolist()]
        x0 = self.model.sample_noise(n, self.generator)
        return self.algo.rollout(x0, prompts, self.model.encode(prompts), self.generator)

    def update(self) -> dict[str, Any]:
        """One optimizer update from ``train.grad_accum`` freshly rolled-out micro-batches."""
        micro = int(self.cfg.train.batch_size) // int(self.cfg.train.grad_accum)
        trajs = (self._rollout_batch(micro) for _ in range(int(self.cfg.train.grad_accum)))
        return self.learn(trajs)

    def learn(self, trajs: Iterable[Trajectory]) -> dict[str, Any]:
        """One optimizer update from the micro-batches ``trajs`` (rolled out with the current θ).

        For an ``update_wide`` algorithm every micro-batch is rolled out first and ``prepare`` sees them all
        (and, through ``gather``, every process's); otherwise one micro-batch is alive at a time.
        """
        if self.algo.update_wide:
            trajs = list(trajs)
            self.algo.prepare(trajs, self.generator, self.accelerator.gather)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        rewards = []
        finite = True
        for traj in trajs:
            with torch.no_grad():
                rewards.append(self.reward(self.model.decode(traj.x1).float(), traj.prompts).float())
            loss, parts = self.algo.loss(traj, self.generator)
            finite &= bool(torch.isfinite(loss))
            if finite:
                (loss / int(self.cfg.train.grad_accum)).backward()
            for k, v in {"loss": loss.item(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
        logs = {k: v / len(rewards) for k, v in sums.items()}
        self._sync_gradients()
        norms = {}
        for g in self.groups:
            norm = torch.nn.utils.clip_grad_norm_(g["params"], float(self.cfg.train.grad_clip))
            norms[f"grad_norm/{g['name']}"] = float(norm)
            finite &= math.isfinite(float(norm))
        finite = self._agree(finite)
        r = self.accelerator.gather(torch.cat(rewards).to(self.accelerator.device))
        row = {"reward_mean": r.mean().item(), "reward_std": r.std().item(), **logs, **norms}
        if finite:
            self.optimizer.step()
            self.bad_in_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_row += 1
            self.skipped += 1
        row.update(skipped=int(not finite), skipped_total=self.skipped)
        return row

    def _agree(self, finite: bool) -> bool:
        """Step only if every process's loss and gradients are finite, so the replicas never diverge."""
        if self.accelerator.num_processes == 1:
            return finite
        flag = torch.tensor([float(finite)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() == self.accelerator.num_processes)

    def _sync_gradients(self) -> None:
        """Average gradients over processes (the loss is not a module forward, so no DDP wrapper)."""
        if self.accelerator.num_processes == 1:
            return
        for g in self.groups:
            for p in g["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(self.accelerator.reduce(p.grad, reduction="mean"))

    # ---- the loop ---------------------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        resume_step = self.resume_step
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            OmegaConf.save(cfg, os.path.join(self.run_dir, "config.yaml"), resolve=True)
        logger = RunLogger(self.run_dir, resume_step, enabled=self.is_main)
        steps, every = int(cfg.train.steps), int(cfg.eval.every)
        start_time = time.time() - self.elapsed
        if self.step == 0:
            logger.log({"step": 0, **self._evaluate(logger), "time_s": 0.0})
        bar = tqdm(total=steps, initial=self.step, disable=not (self.is_main and cfg.train.progress),
                   desc=f"{cfg.algo.name}/{cfg.model.name}/{cfg.reward.name}", dynamic_ncols=True)
        try:
            while self.step < steps:
                row = self.update()
                self.step += 1
                if self.bad_in_row >= int(cfg.train.max_bad_steps):
                    self.elapsed = time.time() - start_time
                    self.save()
                    raise TrainingDiverged(
                        f"{self.bad_in_row} consecutive updates had a non-finite loss or gradient (step "
                        f"{self.step}); the last good parameters are saved in {self.run_dir}/checkpoints. "
                        "Lower train.lr or algo.beta, or raise train.max_bad_steps.")
                if self.step == steps or (every > 0 and self.step % every == 0):
                    row.update(self._evaluate(logger))
                self.elapsed = time.time() - start_time
                row["time_s"] = self.elapsed
                if self.step % int(cfg.train.log_every) == 0 or "eval/reward" in row:
                    logger.log({"step": self.step, **row})
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.3g}")
                if self.step % int(cfg.train.checkpoint_every) == 0 or self.step == steps:
                    self.save()
        finally:
            bar.close()
            logger.close()
        self._final_samples()

    def _evaluate(self, logger: RunLogger) -> dict[str, float]:
        if not self.is_main:
            return {}
        metrics, x1 = self.evaluator()
        if hasattr(self.model, "preview_grid"):
            logger.images("samples", self.model.preview_grid(x1[preview_order(self.evaluator.prompts)]), self.step)
        return metrics

    @torch.no_grad()
    def _final_samples(self) -> None:
        if not self.is_main:
            return
        n = int(self.cfg.eval.final_samples)
        gen = torch.Generator().manual_seed(int(self.cfg.seed) + 2_000_003)
        prompts = [self.prompt_set[i % len(self.prompt_set)] for i in range(n)]
        x0 = self.model.sample_noise(n, gen)
        x1 = self.evaluator.sample(self.model.velocity, x0, prompts)
        path = os.path.join(self.run_dir, "samples_final.pt")
        torch.save({"x1": x1.cpu(), "x0": x0.cpu(), "prompts": prompts}, path + ".tmp")
        os.replace(path + ".tmp", path)
