"""``build_parts(cfg)``: the model, reward, grid and prompts a composed config (``align.setup.compose``) names;
``build_trainer(cfg, run_dir)``: those, the algorithm and the Trainer. Both take the config through the refusal
pass first (``align.setup.checks``; once: a config the command line already checked is not checked again), so a
program that builds gets the command line's checks."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from align.setup.build import build_algorithm, build_eval_rewards, build_grid, build_model, build_reward
from align.setup.checks import CheckedConfig, checked_config
from align.core.interfaces import FlowModel, Reward
from align.train.trainer import Trainer


@dataclass
class Parts:
    """What a run samples and scores with, without the algorithm: the model, reward, time grid and prompt set, and
    the held-out rewards (``eval.rewards``) by label."""
    model: FlowModel
    reward: Reward
    grid: torch.Tensor
    prompts: list[str]
    eval_rewards: dict[str, Reward]


def build_parts(cfg: DictConfig, training: bool = True, checked: CheckedConfig | None = None) -> Parts:
    """Check (the refusal pass, unless ``checked`` is its result for ``cfg``), seed, then build model, reward,
    held-out rewards, grid and prompts (those the check loaded; the model's default prompts otherwise). The same
    seed gives identical parts in every process and in ``align.evaluate`` (``training=False``: no algorithm will
    differentiate the reward, so a black-box one is not refused for the config's algorithm)."""
    checked = checked or checked_config(cfg, training)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    set_seed(int(cfg.seed))
    model = build_model(cfg)
    reward = build_reward(cfg)
    eval_rewards = build_eval_rewards(checked.eval_rewards)
    grid = build_grid(cfg, model)
    prompts = list(model.default_prompts()) if checked.prompts is None else checked.prompts
    model.prepare(prompts, str(cfg.sampler.grid), float(cfg.sampler.shift))
    return Parts(model, reward, grid, prompts, eval_rewards)


def build_trainer(cfg: DictConfig, run_dir: str) -> Trainer:
    """``cfg`` checked (the refusal pass, once), ``build_parts`` and the algorithm, handed to the Trainer."""
    checked = checked_config(cfg)
    parts = build_parts(cfg, checked=checked)
    algorithm = build_algorithm(cfg, parts.model, parts.reward, parts.grid)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return Trainer(parts.model, parts.reward, algorithm, parts.grid, parts.prompts, checked.train, run_dir,
                   evaluation=checked.evaluation, seed=int(cfg.seed), device=str(cfg.device),
                   resume=bool(cfg.resume), config=config, eval_rewards=parts.eval_rewards)
