"""The one training loop for every algorithm, built from objects (``align.setup.assemble.build_trainer`` builds
them from a config).

accelerate (one process or many), AdamW over the algorithm's parameter groups, per-group gradient-norm
clipping, a NaN/Inf guard agreed across processes, tqdm, metrics.jsonl + the experiment trackers, periodic
evaluation, atomic checkpoints and exact resume, and ``samples_final.pt`` at the end.

Compute accounting: every row carries ``compute/<key>``, the rows of v_θ (``v_nograd``, ``v_grad``), of v_base
outside v_θ (``v_base``), their sum ``velocity``, and of the reward (``reward``, ``reward_grad``) that training
evaluated from step 0 to this row, summed over processes (align/train/compute.py defines a row; a CFG-combined v_θ
is one). Not counted: the periodic evaluation, the final samples, the preflight and the scoring of r(x_1) for
the log. The totals live in the checkpoint, so a resumed run continues them exactly.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from datetime import timedelta
from typing import Any, Iterable

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from omegaconf import OmegaConf
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from tqdm.auto import tqdm

from align.train.checkpoint import (RESUME_KEYS, CheckpointMismatch, RunWriteError, check_fits, check_same_config,
                                    load_latest, save_atomically, save_checkpoint, state_file, write_failure)
from align.train.compute import KEYS as COMPUTE_KEYS, VELOCITY, EvalCounter
from align.train.evaluation import Evaluator
from align.train.reward_watch import NonFiniteWatch
from align.core.interfaces import Algorithm, FlowModel, Reward, RewardError
from align.core.run_dir import CONFIG_FILE, FINISHED_FILE, SAMPLES_DIR, claim_run_dir, list_checkpoints
from align.train.run_logging import RunLogger
from align.core.schema import EvalConfig, TrainConfig
from align.train.sharding import Shard
from align.train.trackers import make_trackers
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


class TrainingStopped(RuntimeError):
    """The run stopped with a message for the command line; the run directory keeps what was written before."""


class TrainingDiverged(TrainingStopped):
    """Too many consecutive non-finite updates, or parameters blown up by an update."""


class RewardFailed(TrainingStopped):
    """The reward returned something training cannot use (``RewardError``: e.g. the wrong shape) mid-run."""


class Trainer:
    """The loop, built from its parts: ``model`` (a FlowModel), ``reward``, ``algorithm`` (already holding the
    model, reward and grid), the time grid ``grid`` and the prompt set ``prompts``; ``train`` and
    ``evaluation`` are the typed ``train`` / ``eval`` sections (``align/core/schema.py``). ``config`` (the resolved
    run config, a plain dict) is written to ``<run_dir>/config.yaml`` and given to the trackers.

    ``eval_rewards``: evaluation-only rewards by name (``eval.rewards``), reported beside the trained one.
    ``resume=True`` continues from the run directory's newest checkpoint. Seeding of the parts' initialisation
    is the caller's (``align.setup.assemble.build_trainer`` seeds before building them); the trainer's own stream
    (noise, prompts, the algorithms' random choices) is ``seed · 1000 + rank``.
    """

    def __init__(self, model: FlowModel, reward: Reward, algorithm: Algorithm, grid: torch.Tensor,
                 prompts: list[str], train: TrainConfig, run_dir: str, *, evaluation: EvalConfig,
                 seed: int = 0, device: str = "auto", resume: bool = False,
                 config: dict[str, Any] | None = None, eval_rewards: dict[str, Reward] | None = None):
        self.train_cfg, self.eval_cfg, self.seed, self.config = train, evaluation, seed, config
        self.run_dir = run_dir
        # Read the checkpoint before anything else: one that cannot be resumed (damaged, foreign, trained with
        # another config) is a clear error before any work, and the trackers need its step (TensorBoard purges the
        # events after it).
        loaded = load_latest(run_dir, needs=RESUME_KEYS) if resume else None
        self.resume_step = None if loaded is None else loaded[0]
        if loaded is not None:
            check_same_config(loaded[1], config, run_dir, state_file(run_dir, loaded[0]))
        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=train.collective_timeout_s))
        self.accelerator = Accelerator(cpu=cpu, kwargs_handlers=[timeout],
                                       log_with=make_trackers(list(train.trackers), run_dir, self.resume_step))
        self.is_main = self.accelerator.is_main_process
        self.model, self.reward, self.algo, self.ts, self.prompt_set = model, reward, algorithm, grid, prompts
        self.model.to(self.accelerator.device)
        self.reward.to(self.accelerator.device).requires_grad_(False).eval()
        # evaluation-only rewards (``eval.rewards``): scored beside the trained one, never trained on
        self.eval_rewards = dict(eval_rewards or {})
        for r in self.eval_rewards.values():
            r.to(self.accelerator.device).requires_grad_(False).eval()
        self.algo.to(self.accelerator.device)
        self.counter = EvalCounter(self.model, self.reward, self.algo)   # this process's rows since the last update
        self.compute = dict.fromkeys(COMPUTE_KEYS, 0)                   # every process's, from step 0
        # the rewards that returned non-finite values in training's own calls (what the counter counts)
        self.reward_watch = NonFiniteWatch(self.reward, active=lambda: self.counter.counting)
        self.nonfinite_rewards: list[str] = []      # ... in the current run of skipped updates (for the message)
        with self.counter.paused():
            self._preflight()

        self.groups = self.algo.param_groups()
        self.optimizer = torch.optim.AdamW(
            [dict(g) for g in self.groups], lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay,
            eps=train.adam_eps)
        # Per-process stream for noise, prompts and the algorithms' own random choices.
        self.generator = torch.Generator().manual_seed(self.seed * 1000 + self.accelerator.process_index)
        self.evaluator = Evaluator(self.model, self.reward, self.ts, self.prompt_set, evaluation.n_samples,
                                   evaluation.group_size, self.seed, batch_size=evaluation.batch_size,
                                   fid_reference=evaluation.fid_reference, shard=Shard.current(),
                                   extra_rewards=self.eval_rewards)
        self.step, self.bad_in_row, self.skipped, self.elapsed = 0, 0, 0, 0.0
        self.start_norms, self.broken = self._param_norms(), []   # the divergence guard's reference
        if loaded is not None:
            self.load_state(loaded[1], source=state_file(run_dir, loaded[0]))

    def _preflight(self) -> None:
        """Score two noise samples so that a wrong shape, a non-finite value or a weight problem surfaces before
        sampling starts."""
        x = self.model.sample_noise(2, torch.Generator().manual_seed(0))
        with torch.no_grad():
            r = self.reward(self.model.decode(x).float(), [self.prompt_set[0]] * 2)
        if r.shape != (2,):
            raise ValueError(f"{self.reward.description()} returned shape {tuple(r.shape)} for 2 samples, "
                             "expected (2,)")
        bad = (~torch.isfinite(r)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{self.reward.description()} returned non-finite values at rows {bad}: "
                             f"{r[bad].tolist()} for 2 noise samples of model={self.model.name} (checked before "
                             "training); it must be finite on the model's samples")

    # ---- checkpoint state -------------------------------------------------------------------------------
    def state(self, rng_states: list[dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        """Everything a resume needs; ``rng`` holds one entry per process (each draws its own noise), ``config`` the
        run's resolved config (a resume refuses a config.yaml edited since). Tensors and plain containers only:
        loading unpickles with ``weights_only=True``."""
        return {"step": self.step, "model": self.model.finetune_state_dict(), "algo": self.algo.state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": rng_states or [self._rng_state()],
                "bad_in_row": self.bad_in_row, "skipped": self.skipped, "elapsed": self.elapsed,
                "start_norms": self.start_norms, "compute": dict(self.compute), "config": self.config}

    def _rng_state(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}

    def load_state(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        """Continue from ``state`` (read from ``source``, named in errors). CheckpointMismatch, before anything is
        changed, if it does not fit this run: other processes, tensors of other names or shapes, or (checkpoints
        without a stored config) other learning rates; one that fails to load all the same is one too."""
        try:
            self._check_fits(state, source)
            self._apply_state(state)
        except CheckpointMismatch:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as err:
            raise CheckpointMismatch(f"{source} cannot be loaded into this run ({type(err).__name__}: "
                                     f"{(str(err).splitlines() or [''])[0]})") from None

    def _check_fits(self, state: dict[str, Any], source: str) -> None:
        """CheckpointMismatch naming what of ``state`` does not fit this run (see ``load_state``)."""
        world = self.accelerator.num_processes
        if len(state["rng"]) != world:
            raise CheckpointMismatch(f"{self.run_dir}: the checkpoint was written by {len(state['rng'])} process(es) "
                                     f"and this run has {world}; resume with the same number of processes (the noise "
                                     "streams are per process)")
        check_fits(self.model.finetune_state_dict(), state["model"], "model", source)
        check_fits(self.algo.state_dict(), state["algo"], "algorithm", source)
        if state.get("config") is None:
            self._check_learning_rates(state["optimizer"]["param_groups"], source)

    def _check_learning_rates(self, saved_groups: list[dict[str, Any]], source: str) -> None:
        """For checkpoints that store no config: AdamW's load_state_dict would put back the saved learning rates
        while config.yaml shows others, so a config whose rates differ from the saved ones is refused."""
        for ours, theirs, group in zip(self.optimizer.param_groups, saved_groups, self.groups):
            if float(theirs["lr"]) != float(ours["lr"]):
                key = "train.lr" if "lr" not in group else f"the algorithm's learning rate of {group['name']}"
                raise CheckpointMismatch(
                    f"{source} was trained with the learning rate {theirs['lr']} for the parameters {group['name']}, "
                    f"and the config gives {ours['lr']} ({key}): a run goes on with the learning rate it was trained "
                    f"with. Set {theirs['lr']} back in {os.path.join(self.run_dir, CONFIG_FILE)}, or start a new run")

    def _apply_state(self, state: dict[str, Any]) -> None:
        """Load ``state`` (checked by ``_check_fits``) into the model, algorithm, optimizer and streams."""
        self.step = int(state["step"])
        self.model.load_finetune_state_dict(state["model"])
        self.algo.load_state_dict(state["algo"])
        self.optimizer.load_state_dict(state["optimizer"])
        rank = self.accelerator.process_index
        self.generator.set_state(state["rng"][rank]["generator"])
        torch.set_rng_state(state["rng"][rank]["torch"])
        self.bad_in_row, self.skipped, self.elapsed = state["bad_in_row"], state["skipped"], state["elapsed"]
        # older checkpoints: the norms of this trainer's fresh initialisation (the same seed: the run's own start)
        self.start_norms = state.get("start_norms", self.start_norms)
        if "compute" in state:
            self.compute = {k: int(state["compute"][k]) for k in COMPUTE_KEYS}
        else:
            warnings.warn(f"{self.run_dir}: the checkpoint of step {self.step} was written before compute accounting; "
                          f"the compute/ counts restart from zero at step {self.step} (align.report leaves this run "
                          "out of its compute column and vs-compute plots)", stacklevel=3)

    def save(self) -> None:
        from accelerate.utils import gather_object

        rng = [self._rng_state()]
        if self.accelerator.num_processes > 1:
            rng = gather_object(rng)          # every process's streams, in rank order
        if self.is_main:
            save_checkpoint(self.run_dir, self.step, self.state(rng), self.train_cfg.keep_checkpoints,
                            export=self.model.save_finetuned)
        self.accelerator.wait_for_everyone()

    # ---- one update -------------------------------------------------------------------------------------
    def _draw_prompts(self, n: int) -> list[str]:
        """n rows of prompts in groups of G consecutive rows sharing one prompt drawn from the prompt set (G | n:
        checked before any work, ``align.setup.checks.check_groups``)."""
        G = self.algo.group_size
        picks = torch.randint(len(self.prompt_set), (n // G,), generator=self.generator).tolist()
        return [self.prompt_set[i] for i in picks for _ in range(G)]

    def _rollout_batch(self, n: int, prompts: list[str] | None = None):
        """One micro-batch of n trajectories: its own groups of prompts, or the given ``prompts``."""
        prompts = self._draw_prompts(n) if prompts is None else prompts
        x0 = self.model.sample_noise(n, self.generator)
        return self.algo.rollout(x0, prompts, self.model.encode(prompts), self.generator)

    def groups_span_micro_batches(self) -> bool:
        """True when a group of G rows is larger than, or straddles, a micro-batch (G ∤ batch_size / grad_accum):
        the update's prompts are drawn in groups first, the micro-batches take consecutive rows of them, and the
        algorithm's ``prepare`` computes the group statistics over the whole update."""
        micro = self.train_cfg.batch_size // self.train_cfg.grad_accum
        return micro % self.algo.group_size != 0

    def update(self) -> dict[str, Any]:
        """One optimizer update from ``train.grad_accum`` freshly rolled-out micro-batches."""
        accum = self.train_cfg.grad_accum
        micro = self.train_cfg.batch_size // accum
        if not self.groups_span_micro_batches():     # each micro-batch holds whole groups (the draws as before)
            return self.learn(self._rollout_batch(micro) for _ in range(accum))
        prompts = self._draw_prompts(micro * accum)
        return self.learn([self._rollout_batch(micro, prompts[i * micro:(i + 1) * micro]) for i in range(accum)],
                          groups_span=True)

    def learn(self, trajs: Iterable[Trajectory], groups_span: bool = False) -> dict[str, Any]:
        """One optimizer update from the micro-batches ``trajs`` (rolled out with the current θ).

        For an ``update_wide`` algorithm, or when the prompt groups span micro-batches (``groups_span``: rows
        ``i·G … i·G + G − 1`` of the micro-batches taken in order share a prompt), every micro-batch is rolled out
        first and ``prepare`` sees them all (and, through ``gather``, every process's); otherwise one micro-batch
        is alive at a time.
        """
        if self.algo.update_wide or groups_span:
            trajs = list(trajs)
            self.algo.prepare(trajs, self.generator, self.accelerator.gather)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        rewards = []
        finite = True
        for traj in trajs:
            loss, parts = self.algo.loss(traj, self.generator)
            rewards.append(self._reward_x1(traj))
            finite &= bool(torch.isfinite(loss))
            if finite:
                (loss / self.train_cfg.grad_accum).backward()
            for k, v in {"loss": loss.item(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
        logs = {k: v / len(rewards) for k, v in sums.items()}
        self._sync_gradients()
        norms = {}
        for g in self.groups:
            norm = torch.nn.utils.clip_grad_norm_(g["params"], self.train_cfg.grad_clip)
            norms[f"grad_norm/{g['name']}"] = float(norm)
            finite &= math.isfinite(float(norm))
        bad_rewards = self.reward_watch.take()
        finite, rewards_finite = self._agree(finite and not bad_rewards, not bad_rewards)
        r = self.accelerator.gather(torch.cat(rewards).to(self.accelerator.device))
        row = {"reward_mean": r.mean().item(), "reward_std": r.std().item(), **logs, **norms}
        if finite:
            self.optimizer.step()
            self.algo.after_step()
            self.bad_in_row = 0
            self.nonfinite_rewards = []
            norms = self._param_norms()
            row.update({f"param_norm/{k}": v for k, v in norms.items()})
            limit = self.train_cfg.max_param_growth
            self.broken = [f"{k} (norm {v:.3g}, {self.start_norms[k]:.3g} at the start)" for k, v in norms.items()
                           if not math.isfinite(v) or v > limit * max(self.start_norms[k], 1.0)]
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_row += 1
            self.skipped += 1
            if not rewards_finite:      # another process's reward, if not this one's: the trained reward
                self._note_nonfinite_rewards(bad_rewards or [self.reward.description()])
        row.update(skipped=int(not finite), skipped_total=self.skipped, reward_nonfinite=int(not rewards_finite))
        return row

    def _note_nonfinite_rewards(self, described: list[str]) -> None:
        self.nonfinite_rewards += [d for d in described if d not in self.nonfinite_rewards]

    def _reward_x1(self, traj: Trajectory) -> torch.Tensor:
        """r(x_1) for the log: the algorithm's own value when it computed one (PMP, AM, VGG-Flow), else scored (not
        counted as training compute)."""
        if traj.reward_x1 is not None:
            return traj.reward_x1.detach().float()
        with torch.no_grad(), self.counter.paused():
            return self.reward(self.model.decode(traj.x1).float(), traj.prompts).float()

    def _account(self) -> dict[str, int]:
        """Add the rows every process counted since the last call to the run's totals (one all-reduce of the
        five counts with several processes); the ``compute/`` keys of the row."""
        counted = self.counter.take()
        if self.accelerator.num_processes > 1:
            local = torch.tensor([counted[k] for k in COMPUTE_KEYS], dtype=torch.int64, device=self.accelerator.device)
            counted = dict(zip(COMPUTE_KEYS, self.accelerator.reduce(local, reduction="sum").tolist()))
        for k in COMPUTE_KEYS:
            self.compute[k] += int(counted[k])
        return self.compute_row()

    def compute_row(self) -> dict[str, int]:
        """The run's totals as ``compute/`` keys: v_nograd, v_grad, v_base, velocity (their sum), reward,
        reward_grad."""
        c = self.compute
        return {"compute/v_nograd": c["v_nograd"], "compute/v_grad": c["v_grad"], "compute/v_base": c["v_base"],
                "compute/velocity": sum(c[k] for k in VELOCITY), "compute/reward": c["reward"],
                "compute/reward_grad": c["reward_grad"]}

    def _param_norms(self) -> dict[str, float]:
        """‖params‖₂ of each optimizer group."""
        with torch.no_grad():
            return {g["name"]: float(torch.nn.utils.get_total_norm(g["params"])) for g in self.groups}

    def _agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true only if it is true on every process (one all-reduce): the update is taken only if every
        process's loss, gradients and rewards are finite, so the replicas never diverge."""
        if self.accelerator.num_processes == 1:
            return flags
        local = torch.tensor([float(f) for f in flags], device=self.accelerator.device)
        total = self.accelerator.reduce(local, reduction="sum").tolist()
        return tuple(v == self.accelerator.num_processes for v in total)

    def _sync_gradients(self) -> None:
        """Average gradients over processes (the loss is not a module forward, so no DDP wrapper): one
        all-reduce per parameter group (and dtype) on a flattened buffer; a missing gradient counts as zeros."""
        if self.accelerator.num_processes == 1:
            return
        for g in self.groups:
            buckets: dict[torch.dtype, list[torch.Tensor]] = {}
            for p in g["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                buckets.setdefault(p.grad.dtype, []).append(p.grad)
            for grads in buckets.values():
                mean = self.accelerator.reduce(_flatten_dense_tensors(grads), reduction="mean")
                for grad, avg in zip(grads, _unflatten_dense_tensors(mean, grads)):
                    grad.copy_(avg)

    # ---- the loop ---------------------------------------------------------------------------------------
    def train(self) -> None:
        """Train to ``train.steps``: evaluations, checkpoints and the final samples (see the class docstring). A
        reward output training cannot use stops the run (``RewardFailed``), its checkpoints as they were."""
        try:
            self._train()
        except RewardError as err:
            raise RewardFailed(f"{err}; the run stopped after {self.step} update(s), {self._checkpoint_note()}: fix "
                               f"the reward, then resume={self.run_dir} continues the run") from None

    def _checkpoint_note(self) -> str:
        """What the run directory holds to go on from: its newest checkpoint, or none."""
        saved = list_checkpoints(self.run_dir)
        return (f"the newest checkpoint (step {saved[-1]}) holds the last good parameters" if saved
                else "no checkpoint had been written yet")

    def _skipped_message(self) -> str:
        """Why the run stops after ``train.max_bad_steps`` skipped updates in a row, and the ways forward."""
        where = f"{self.run_dir}/checkpoints"
        if self.nonfinite_rewards:
            return (f"{self.bad_in_row} consecutive updates (the last at step {self.step}) were skipped because "
                    f"{' and '.join(self.nonfinite_rewards)} returned non-finite values (NaN or inf); the last good "
                    f"parameters are saved in {where}. Fix the reward (resume={self.run_dir} then continues the "
                    "run), lower train.lr or algo.beta if training drove the samples where it is not finite (a new "
                    "run), or raise train.max_bad_steps (resume=<run_dir> accepts it).")
        return (f"{self.bad_in_row} consecutive updates had a non-finite loss or gradient (step {self.step}); they "
                f"were skipped, and the last good parameters are saved in {where}. Lower train.lr or algo.beta (a "
                "new run), or raise train.max_bad_steps (resume=<run_dir> accepts it).")

    def _train(self) -> None:
        t = self.train_cfg
        if self.is_main:
            claim_run_dir(self.run_dir)
            if self.config is not None:
                OmegaConf.save(OmegaConf.create(self.config), os.path.join(self.run_dir, CONFIG_FILE))
        logger = RunLogger(self.run_dir, self.accelerator, self.resume_step, self.config)
        steps, every = t.steps, self.eval_cfg.every
        start_time = time.time() - self.elapsed
        if self.step == 0:
            logger.log({"step": 0, **self._evaluate(logger), **self.compute_row(), "time_s": 0.0})
        bar = tqdm(total=steps, initial=self.step, disable=not (self.is_main and t.progress),
                   desc=f"{self.algo.name}/{self.model.name}/{self.reward.name}", dynamic_ncols=True)
        try:
            while self.step < steps:
                row = self.update()
                row.update(self._account())
                self.step += 1
                if self.broken:       # the parameters themselves are broken: log the row, checkpoint nothing
                    self.elapsed = row["time_s"] = time.time() - start_time
                    logger.log({"step": self.step, **row})
                    raise TrainingDiverged(
                        f"the update of step {self.step} left the parameters of {', '.join(self.broken)} beyond "
                        f"train.max_param_growth={t.max_param_growth}; nothing was saved after it, "
                        f"{self._checkpoint_note()}. Lower train.lr or algo.beta (a new run), or raise "
                        "train.max_param_growth (resume=<run_dir> accepts it).")
                if self.bad_in_row >= t.max_bad_steps:   # skipped updates: the parameters are the last good
                    self.elapsed = row["time_s"] = time.time() - start_time
                    logger.log({"step": self.step, **row})
                    self.save()
                    raise TrainingDiverged(self._skipped_message())
                if self.step == steps or (every > 0 and self.step % every == 0):
                    row.update(self._evaluate(logger))
                self.elapsed = time.time() - start_time
                row["time_s"] = self.elapsed
                if self.step % t.log_every == 0 or "eval/reward" in row:
                    logger.log({"step": self.step, **row})
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.3f}", loss=f"{row['loss']:.3g}")
                if self.step % t.checkpoint_every == 0 or self.step == steps:
                    self.save()
            self._final_samples()     # before logger.close(): accelerate's end_training ends the process group
            self.accelerator.wait_for_everyone()    # no process ends the group while another still uses it
        finally:
            bar.close()
            logger.close()

    def _evaluate(self, logger: RunLogger) -> dict[str, float]:
        """Every process evaluates its share (align/train/sharding.py); the main process logs the sample grid."""
        with self.counter.paused():
            metrics, x1 = self.evaluator()
        if self.is_main:
            logger.images(SAMPLES_DIR, self.model.preview_grid(x1[preview_order(self.evaluator.prompts)]),
                          self.step)
            if metrics["eval/reward_nonfinite"]:
                warnings.warn(f"step {self.step}: {self.reward.description()} returned non-finite values for "
                              f"{metrics['eval/reward_nonfinite']} of the {len(self.evaluator.prompts)} evaluation "
                              "samples; that row's eval/reward and eval/reward_std are NaN (null in metrics.jsonl)",
                              RuntimeWarning, stacklevel=2)
        return metrics

    @torch.no_grad()
    def _final_samples(self) -> None:
        """Every process samples its share; the main process writes samples_final.pt."""
        with self.counter.paused():
            samples = self.evaluator.final_samples(self.eval_cfg.final_samples)
        if self.is_main:
            path = os.path.join(self.run_dir, FINISHED_FILE)
            try:
                save_atomically(samples, path)
            except OSError as err:
                raise RunWriteError(f"could not write {path}: {write_failure(err)}; the final checkpoint (step "
                                    f"{self.step}) is intact. Make room, then resume={self.run_dir} writes the final "
                                    "samples") from None
