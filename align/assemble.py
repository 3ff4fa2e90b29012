"""``build_trainer(cfg, run_dir)``: the Trainer and its parts from a composed config (``align.config``)."""
from __future__ import annotations

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from align.build import build_algorithm, build_grid, build_model, build_reward
from align.prompts import load_prompts
from align.schema import EvalConfig, TrainConfig, typed
from align.trainer import Trainer


def _section(schema: type, node: DictConfig):
    """A config section as its checked dataclass (also for a resumed run's untyped config.yaml); resolved
    first, since its interpolations reach the root (``train.lr: ${algo.lr}``)."""
    return OmegaConf.to_object(typed(schema, OmegaConf.to_container(node, resolve=True, enum_to_str=True)))


def build_trainer(cfg: DictConfig, run_dir: str) -> Trainer:
    """Seed, build model, reward, grid, prompts (resolved once, here) and algorithm, and hand them to the
    Trainer. Every process builds identical parts (the same seed before the first random initialisation)."""
    train, evaluation = _section(TrainConfig, cfg.train), _section(EvalConfig, cfg.eval)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    set_seed(int(cfg.seed))
    model = build_model(cfg)
    reward = build_reward(cfg, model)
    grid = build_grid(cfg)
    prompts = load_prompts(cfg.prompts, model)
    model.prepare(prompts, str(cfg.sampler.grid), float(cfg.sampler.shift))
    algorithm = build_algorithm(cfg, model, reward, grid)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return Trainer(model, reward, algorithm, grid, prompts, train, run_dir, evaluation=evaluation,
                   seed=int(cfg.seed), device=str(cfg.device), resume=bool(cfg.resume), config=config)
