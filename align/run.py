"""``python -m align.run key=value ...``: train one algorithm on one model and reward (``-m`` sweeps).

Before Hydra starts any job, every combination of the overrides is composed once and checked (the refusal pass,
``align/setup/checks.py``, whose result the job's build takes over), so an unknown algorithm, model, reward or key
stops the run with a short message listing the valid choices.
When no ``model=`` is given, the model is the domain the reward scores (``reward=aesthetic`` → SD3).
β and the learning rate default to the paper's values for the run's model × reward × algorithm
(``align/setup/paper_settings.py``; anything set explicitly wins); the run prints which ones it took from there.

Re-running into an existing run directory (an explicit ``run_dir=`` or a Hydra multirun job directory) is
safe, which makes sweeps resumable (``align.sweep``, Hydra launchers): a finished run is skipped (also one whose
checkpoints were deleted); a run with a checkpoint resumes from it, after checking that its saved config.yaml
matches the requested one; a directory without a checkpoint starts afresh (its partial files are removed). A
non-empty folder that align did not write is refused, and so is a second writer: rank 0 takes the run
directory's lock before it looks at the folder and holds it for the whole run, decides alone, and hands its
decision to the other processes of a multi-process launch (``SharedPlan``). A run that fails before any work
removes the directory only if it found it empty, and only while it still holds the lock.
Those rules, and the run directory's file names, are ``align.core.run_dir``'s.
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import ExitStack, contextmanager
from typing import Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from align.setup.checks import ConfigError, resumable_config
from align.setup.overrides import ConfigProblem, check_overrides
from align.setup.paper_settings import describe
from align.setup.paths import absolute_paths
from align.setup.registration import register_resolvers
from align.core.run_dir import (FINISHED_FILE, METRICS_FILE, RESUMABLE_KEYS, SAMPLES_DIR, TB_DIR,
                                RunMismatch, clear_partial_run, discard_if_unused, last_checkpoint_step, own_run_dir,
                                plan_existing_run, prepare_resume, read_metrics)

CONF = os.path.join(os.path.dirname(__file__), "conf")


def _fail(message: str) -> None:
    print(f"align: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def _job(cfg: DictConfig) -> None:
    register_resolvers()    # a launcher may run the job in a fresh process, which has not checked the overrides
    run_dir = HydraConfig.get().runtime.output_dir
    if cfg.resume:
        run_dir = os.path.abspath(str(cfg.resume))
        cfg = _resumed_config(_saved_config(cfg.resume, run_dir), cfg, run_dir)
    absolute_paths(cfg)     # the config.yaml it saves names its files from anywhere (align.setup.paths)
    shared = SharedPlan(run_dir, _collective_timeout(cfg))
    if _launch_rank() != 0:
        _run(cfg, run_dir, shared.hear(), is_main=False)
        return
    try:
        with _sole_writer(run_dir) as claimed_empty:
            try:
                _run(cfg, run_dir, shared.tell(_plan(cfg, run_dir)), is_main=True)
            except SystemExit:
                if claimed_empty:
                    discard_if_unused(run_dir)     # ours alone, still locked: leave no empty run directory behind
                raise
    except SystemExit:
        shared.tell(STOP)                          # the other processes stop too (once told a plan, they go on)
        raise


@contextmanager
def _sole_writer(run_dir: str) -> Iterator[bool]:
    """Hold ``run_dir``'s lock for the run, taken before anything about the folder is decided (refused: a user's
    folder, a second writer); yields whether it found the folder empty and unclaimed (see own_run_dir)."""
    with ExitStack() as stack:
        try:
            claimed_empty = stack.enter_context(own_run_dir(run_dir))
        except RunMismatch as err:
            _fail(str(err))
        yield claimed_empty


STOP = "stop"


class SharedPlan:
    """The main process's plan for the run directory (skip, resume or start), handed to the other processes of a
    multi-process launch (torchrun, accelerate launch) through the launcher's key-value store before any of them
    builds a trainer. Only the main process looks at the directory, holding its lock: the others would see it
    while rank 0 readies it, or while a previous writer was still ending, and could decide otherwise."""

    _stores: list = []      # rank 0 may serve the store (a plain env:// launch): it must outlive the handover

    def __init__(self, run_dir: str, timeout_s: float):
        self.key = f"align.run/plan/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{run_dir}"
        self.store = _launch_store(timeout_s) if _world_size() > 1 else None
        self.told = False
        if self.store is not None:
            SharedPlan._stores.append(self.store)

    def tell(self, action: str) -> str:
        """Hand ``action`` (or STOP) to the other processes, once; returns it."""
        if self.store is not None and not self.told:
            self.store.set(self.key, action)
        self.told = True
        return action

    def hear(self) -> str:
        """The main process's plan (waits for it); exits as it does if it stopped before training."""
        action = self.store.get(self.key).decode()
        if action == STOP:
            _fail("the main process (rank 0) stopped before training; its message says why")
        return action


def _collective_timeout(cfg: DictConfig) -> float:
    """train.collective_timeout_s (its default for a config saved before the key existed)."""
    from align.core.schema import TrainConfig

    return float(OmegaConf.select(cfg, "train.collective_timeout_s", default=TrainConfig.collective_timeout_s))


def _launch_store(timeout_s: float):
    """The multi-process launch's key-value store (torchrun's agent's, or the one rank 0 serves), as the process
    group will find it."""
    from datetime import timedelta

    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
    return store


def _plan(cfg: DictConfig, run_dir: str) -> str:
    """The main process's plan, taken holding the lock: ``skip``, ``resume`` or ``start``, with the directory
    readied for it (a partial run's files cleared, metrics.jsonl cut back to the checkpoint)."""
    resuming = bool(cfg.resume)
    action = "resume" if resuming else "start"
    try:
        if not resuming and _reusable_run_dir():
            action = plan_existing_run(run_dir, OmegaConf.to_container(cfg, resolve=True), absolute_paths)
            if action == "skip":
                print(f"align: {run_dir} already finished, skipping", flush=True)
            elif action == "resume":
                print(f"align: {run_dir} has a checkpoint (step {last_checkpoint_step(run_dir)}), resuming",
                      flush=True)
            else:
                clear_partial_run(run_dir)
        if action == "resume":      # the checkpoint is usable, before prepare_resume changes any file
            from align.train.checkpoint import check_resumable

            check_resumable(run_dir, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        if action == "resume" and prepare_resume(run_dir, int(cfg.train.steps)) is None:
            print(f"align: {run_dir} has no checkpoint yet, starting afresh", flush=True)
    except RunMismatch as err:
        _fail(str(err))
    return action


def _run(cfg: DictConfig, run_dir: str, action: str, is_main: bool) -> None:
    """Carry out the main process's plan (``_plan``): skip, or build the trainer (resuming) and train."""
    if action == "skip":
        return
    if action == "resume":
        with open_dict(cfg):
            cfg.resume = run_dir
    from align.setup.checks import ConfigError
    from align.setup.assemble import build_trainer
    from align.train.checkpoint import RunWriteError
    from align.train.trainer import TrainingStopped

    with open_dict(cfg):
        cfg.run_dir = run_dir
    if is_main and (line := describe(cfg)):   # β / lr filled in from align/setup/paper_settings.py
        print(line, flush=True)
    _check_weights(cfg)
    try:
        trainer = build_trainer(cfg, run_dir)
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as err:
        _fail(str(err).strip("'\""))
    if trainer.is_main:
        print(f"align: run directory {run_dir}\n"
              f"       TensorBoard: tensorboard --logdir {os.path.join(run_dir, TB_DIR)}\n"
              f"       sample grids: {os.path.join(run_dir, SAMPLES_DIR)}/step_*.png (newest: latest.png)",
              flush=True)
    try:
        trainer.train()
    except (TrainingStopped, RunWriteError) as err:
        _fail(str(err))
    if trainer.is_main:
        last = _last_eval(run_dir)
        print(f"align: done. {last}\n       metrics: {os.path.join(run_dir, METRICS_FILE)}\n"
              f"       final samples: {os.path.join(run_dir, FINISHED_FILE)}\n"
              f"       sample grid: {os.path.join(run_dir, SAMPLES_DIR, 'latest.png')}", flush=True)


def _check_weights(cfg: DictConfig) -> None:
    """Stop before any work when weights are missing, listing every one of them (``align.setup.preflight``)."""
    from align.setup.preflight import missing_message, missing_weights, weight_needs

    errors = missing_weights(weight_needs(cfg))
    if errors:
        _fail(missing_message(errors, HydraConfig.get().overrides.task))


def _saved_config(given: str, run_dir: str) -> DictConfig:
    """The saved config of the run ``resume=`` continues; a missing or unreadable config.yaml, or a folder that
    cannot be written, stops here with one line."""
    try:
        return resumable_config(run_dir)
    except ConfigError as err:
        _fail(f"resume={given}: {err}")


def _resumed_config(saved: DictConfig, given: DictConfig, run_dir: str) -> DictConfig:
    changed = [o.partition("=")[0] for o in HydraConfig.get().overrides.task]
    bad = [k for k in changed if k not in RESUMABLE_KEYS + ("resume",)]
    if bad:
        _fail(f"resume={run_dir} continues that run with its own config.yaml; only "
              f"{', '.join(RESUMABLE_KEYS)} may be changed, not {', '.join(bad)}")
    with open_dict(saved):
        saved.resume = run_dir
        for k in changed:
            if k in RESUMABLE_KEYS:
                OmegaConf.update(saved, k, OmegaConf.select(given, k))
    return saved


def _launch_rank() -> int:
    """This process's global rank as set by torchrun / accelerate launch (0 when launched alone)."""
    return int(os.environ.get("RANK", "0")) if _world_size() > 1 else 0


def _world_size() -> int:
    """How many processes the launch started (WORLD_SIZE; 1 when launched alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _reusable_run_dir() -> bool:
    """An explicit ``run_dir=`` or a multirun job directory (the default timestamped run_dir is always new)."""
    from hydra.types import RunMode

    hc = HydraConfig.get()
    return hc.mode == RunMode.MULTIRUN or any(o.partition("=")[0] == "run_dir" for o in hc.overrides.task)


def _last_eval(run_dir: str) -> str:
    rows = [r for r in read_metrics(run_dir) if "eval/reward" in r]
    if not rows:
        return ""
    # a NaN metric is stored as null
    first, last = ({k: math.nan if v is None else v for k, v in r.items()} for r in (rows[0], rows[-1]))
    return (f"eval reward {first['eval/reward']:.4g} -> {last['eval/reward']:.4g}, diversity "
            f"{first['eval/diversity']:.4g} -> {last['eval/diversity']:.4g}, FID vs base {last['eval/fid']:.4g}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = check_overrides(argv, CONF)
    except ConfigProblem as err:
        _fail(str(err))
    sys.argv = [sys.argv[0]] + argv
    _job()


if __name__ == "__main__":
    main()
