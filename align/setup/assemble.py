"""``build_parts(cfg)``: the model, reward, grid and prompts a composed config (``align.setup.compose``) names;
``build_trainer(cfg, run_dir)``: those, the algorithm and the Trainer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from align.setup.build import build_algorithm, build_eval_rewards, build_grid, build_model, build_reward
from align.core.interfaces import FlowModel, Reward
from align.setup.prompts import load_prompts
from align.core.schema import EvalConfig, TrainConfig, typed
from align.train.trainer import Trainer


def section(schema: type, node: DictConfig):
    """A config section as its checked dataclass (also for a resumed run's untyped config.yaml); resolved
    first, since its interpolations reach the root (``train.lr: ${algo.lr}``)."""
    return OmegaConf.to_object(typed(schema, OmegaConf.to_container(node, resolve=True, enum_to_str=True)))


@dataclass
class Parts:
    """What a run samples and scores with, without the algorithm: the model, reward, time grid and prompt set, and
    the held-out rewards (``eval.rewards``) by label."""
    model: FlowModel
    reward: Reward
    grid: torch.Tensor
    prompts: list[str]
    eval_rewards: dict[str, Reward]


def build_parts(cfg: DictConfig, training: bool = True) -> Parts:
    """Seed, then build model, reward, held-out rewards, grid and prompts (resolved once, here, and checked against
    the model). The same seed gives identical parts in every process and in ``align.evaluate`` (``training=False``:
    no algorithm will differentiate the reward, so a black-box one is not refused for the config's algorithm)."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    set_seed(int(cfg.seed))
    model = build_model(cfg)
    reward = build_reward(cfg, model, training)
    eval_rewards = build_eval_rewards(cfg, model)
    grid = build_grid(cfg, model)
    prompts = load_prompts(cfg.prompts, model)
    model.prepare(prompts, str(cfg.sampler.grid), float(cfg.sampler.shift))
    return Parts(model, reward, grid, prompts, eval_rewards)


def build_trainer(cfg: DictConfig, run_dir: str) -> Trainer:
    """``build_parts`` and the algorithm, handed to the Trainer."""
    train, evaluation = section(TrainConfig, cfg.train), section(EvalConfig, cfg.eval)
    parts = build_parts(cfg)
    algorithm = build_algorithm(cfg, parts.model, parts.reward, parts.grid)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return Trainer(parts.model, parts.reward, algorithm, parts.grid, parts.prompts, train, run_dir,
                   evaluation=evaluation, seed=int(cfg.seed), device=str(cfg.device), resume=bool(cfg.resume),
                   config=config, eval_rewards=parts.eval_rewards)
