"""``python -m align.run key=value ...``: train one algorithm on one model and reward (``-m`` sweeps).

Before Hydra starts any job, every combination of the overrides is composed once and checked (the refusal pass,
``align/setup/checks.py``, whose result the job's build takes over), so an unknown algorithm, model, reward or key
stops the run with a short message listing the valid choices.
When no ``model=`` is given, the model is the domain the reward scores (``reward=aesthetic`` → SD3).
β and the learning rate default to the paper's values for the run's model × reward × algorithm
(``align/setup/paper_settings.py``; anything set explicitly wins); the run prints which ones it took from there.

Re-running into an existing run directory (an explicit ``run_dir=`` or a Hydra multirun job directory) is
safe, which makes sweeps resumable (``align.sweep``, Hydra launchers): a finished run is skipped; a run with a
checkpoint resumes from it, after checking that its saved config.yaml matches the requested one; a directory
without a checkpoint starts afresh (its partial files are removed). A non-empty folder that align did not
write is refused, and so is a second writer (rank 0 holds the run directory's lock for the whole run).
Those rules, and the run directory's file names, are ``align.core.run_dir``'s.
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from align.setup.overrides import ConfigProblem, check_overrides
from align.setup.paper_settings import describe
from align.setup.registration import register_resolvers
from align.core.run_dir import (CONFIG_FILE, FINISHED_FILE, METRICS_FILE, RESUMABLE_KEYS, SAMPLES_DIR, TB_DIR,
                                RunMismatch, claim_run_dir, clear_partial_run, discard_if_unused, hold_run_dir,
                                last_checkpoint_step, plan_existing_run, prepare_resume, read_metrics)

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
        saved = os.path.join(run_dir, CONFIG_FILE)
        if not os.path.isfile(saved):
            _fail(f"resume={cfg.resume}: {saved} does not exist (is this a run directory?)")
        cfg = _resumed_config(OmegaConf.load(saved), cfg, run_dir)
    is_main = _launch_rank() == 0
    fresh = not (os.path.isdir(run_dir) and os.listdir(run_dir))
    try:
        with _sole_writer(run_dir) if is_main else nullcontext():
            _run(cfg, run_dir, is_main)
    except SystemExit:
        if fresh and is_main:
            discard_if_unused(run_dir)     # leave no half-written run directory
        raise


@contextmanager
def _sole_writer(run_dir: str) -> Iterator[None]:
    """Mark ``run_dir`` as ours and hold its lock for the run (refused: a user's folder, a second writer)."""
    with ExitStack() as stack:
        try:
            claim_run_dir(run_dir)
            stack.enter_context(hold_run_dir(run_dir))
        except RunMismatch as err:
            _fail(str(err))
        yield


def _run(cfg: DictConfig, run_dir: str, is_main: bool) -> None:
    """Skip, resume or start; only the main process (rank 0) changes files, the others decide from the same state."""
    resuming = bool(cfg.resume)
    try:
        if not resuming and _reusable_run_dir():
            action = plan_existing_run(run_dir, OmegaConf.to_container(cfg, resolve=True))
            if action == "skip":
                print(f"align: {run_dir} already finished, skipping", flush=True)
                return
            if action == "resume":
                print(f"align: {run_dir} has a checkpoint (step {last_checkpoint_step(run_dir)}), resuming",
                      flush=True)
                with open_dict(cfg):
                    cfg.resume = run_dir
                resuming = True
            elif is_main:
                clear_partial_run(run_dir)
        if resuming and is_main and prepare_resume(run_dir, int(cfg.train.steps)) is None:
            print(f"align: {run_dir} has no checkpoint yet, starting afresh", flush=True)
    except RunMismatch as err:
        _fail(str(err))
    from align.setup.checks import ConfigError
    from align.setup.assemble import build_trainer
    from align.train.trainer import TrainingStopped

    with open_dict(cfg):
        cfg.run_dir = run_dir
    if is_main and (line := describe(cfg)):   # β / lr filled in from align/setup/paper_settings.py
        print(line, flush=True)
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
    except TrainingStopped as err:
        _fail(str(err))
    if trainer.is_main:
        last = _last_eval(run_dir)
        print(f"align: done. {last}\n       metrics: {os.path.join(run_dir, METRICS_FILE)}\n"
              f"       final samples: {os.path.join(run_dir, FINISHED_FILE)}\n"
              f"       sample grid: {os.path.join(run_dir, SAMPLES_DIR, 'latest.png')}", flush=True)


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
    return int(os.environ.get("RANK", "0"))


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
