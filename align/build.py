"""Build the model, reward, algorithm and grid a config names, with clear errors before any work."""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from align.interfaces import Algorithm, FlowModel, Reward
from align.registry import ALGORITHMS, MODELS, REWARDS
from samplers import make_grid


class ConfigError(ValueError):
    """A configuration problem found before any work started; the message says how to fix it."""


def _kwargs(node: DictConfig) -> dict[str, Any]:
    d = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    d.pop("name", None)
    return d


def build_model(cfg: DictConfig) -> FlowModel:
    return MODELS.get(cfg.model.name)(**_kwargs(cfg.model))


def check_domain(reward: str, model: str) -> None:
    """ConfigError unless the reward ``reward`` scores the model ``model``'s domain (from the class: no weights)."""
    domain = REWARDS.get(reward).domain
    if domain not in ("any", model):
        raise ConfigError(f"reward={reward} scores the '{domain}' domain but model={model}; "
                          f"use model={domain} or a reward of the {model} domain")


def build_reward(cfg: DictConfig, model: FlowModel) -> Reward:
    check_domain(cfg.reward.name, model.name)     # before the reward looks for its weights
    return REWARDS.get(cfg.reward.name)(**_kwargs(cfg.reward))


def build_grid(cfg: DictConfig) -> torch.Tensor:
    return make_grid(cfg.sampler.grid, int(cfg.sampler.steps), float(cfg.sampler.shift))


def build_algorithm(cfg: DictConfig, model: FlowModel, reward: Reward, ts: torch.Tensor) -> Algorithm:
    """The algorithm with its typed config (each class merges an untyped one, e.g. a resumed run's, onto its
    config dataclass)."""
    return ALGORITHMS.get(cfg.algo.name)(cfg.algo, model, reward, ts)
