"""``python -m align.run key=value ...``: train one algorithm on one model and reward (``-m`` sweeps).

Before Hydra starts any job, every combination of the overrides is composed once, so an unknown
algorithm, model, reward or key stops the run with a short message listing the valid choices.
When no ``model=`` is given, the model is the domain the reward scores (``reward=aesthetic`` → SD3).
"""
from __future__ import annotations

import os
import shutil
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from align.cli_checks import ConfigProblem, check_overrides

CONF = os.path.join(os.path.dirname(__file__), "conf")


def _fail(message: str) -> None:
    print(f"align: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base=None, config_path="conf", config_name="config")
def _job(cfg: DictConfig) -> None:
    from align.build import ConfigError
    from align.trainer import Trainer, TrainingDiverged

    run_dir = HydraConfig.get().runtime.output_dir
    if cfg.resume:
        run_dir = os.path.abspath(str(cfg.resume))
        saved = os.path.join(run_dir, "config.yaml")
        if not os.path.isfile(saved):
            _fail(f"resume={cfg.resume}: {saved} does not exist (is this a run directory?)")
        cfg = _resumed_config(OmegaConf.load(saved), cfg, run_dir)
    with open_dict(cfg):
        cfg.run_dir = run_dir
    fresh = not os.listdir(run_dir) if os.path.isdir(run_dir) else True
    try:
        trainer = Trainer(cfg, run_dir)
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as err:
        if fresh and os.path.isdir(run_dir) and not os.listdir(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)   # leave no half-written run directory
        _fail(str(err).strip("'\""))
    if trainer.is_main:
        print(f"align: run directory {run_dir}\n       TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'tb')}"
              f"\n       sample grids: {os.path.join(run_dir, 'samples')}/step_*.png (newest: latest.png)",
              flush=True)
    try:
        trainer.train()
    except TrainingDiverged as err:
        _fail(str(err))
    if trainer.is_main:
        last = _last_eval(run_dir)
        print(f"align: done. {last}\n       metrics: {os.path.join(run_dir, 'metrics.jsonl')}\n"
              f"       final samples: {os.path.join(run_dir, 'samples_final.pt')}\n"
              f"       sample grid: {os.path.join(run_dir, 'samples', 'latest.png')}", flush=True)


# What a resumed run may change; everything else comes from the run's own config.yaml.
RESUMABLE_KEYS = ("train.steps", "train.progress", "train.checkpoint_every", "train.keep_checkpoints", "device")


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


def _last_eval(run_dir: str) -> str:
    from align.run_logging import read_metrics

    rows = [r for r in read_metrics(run_dir) if "eval/reward" in r]
    if not rows:
        return ""
    first, last = rows[0], rows[-1]
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
