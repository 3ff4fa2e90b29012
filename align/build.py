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


def _kwargs(node: DictConfig, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    d = OmegaConf.to_container(node, resolve=True)
    for k in ("name", *drop):
        d.pop(k, None)
    return d


# Keys of a model config that the runner reads (per-domain defaults), not the model's constructor.
RUNNER_KEYS = ("default_reward", "train_steps", "batch_size", "eval_every", "eval_samples", "vggflow_beta", "vggflow_alpha",
               "am_beta", "fid_reference")


def build_model(cfg: DictConfig) -> FlowModel:
    return MODELS.get(cfg.model.name)(**_kwargs(cfg.model, RUNNER_KEYS))


def build_reward(cfg: DictConfig, model: FlowModel) -> Reward:
    reward = REWARDS.get(cfg.reward.name)(**_kwargs(cfg.reward))
    if reward.domain not in ("any", model.name):
        raise ConfigError(f"reward={cfg.reward.name} scores the '{reward.domain}' domain but model={model.name}; "
                          f"use model={reward.domain} or a reward of the {model.name} domain")
    return reward


def build_grid(cfg: DictConfig) -> torch.Tensor:
    return make_grid(cfg.sampler.grid, int(cfg.sampler.steps), float(cfg.sampler.shift))


def build_algorithm(cfg: DictConfig, model: FlowModel, reward: Reward, ts: torch.Tensor) -> Algorithm:
    return ALGORITHMS.get(cfg.algo.name)(cfg.algo, model, reward, ts)


def preflight(model: FlowModel, reward: Reward, prompts: list[str]) -> None:
    """Score two noise samples so that shape or weight problems surface before sampling starts."""
    gen = torch.Generator().manual_seed(0)
    x = model.sample_noise(2, gen)
    with torch.no_grad():
        r = reward(model.decode(x).float(), [prompts[0]] * 2)
    if r.shape != (2,):
        raise ConfigError(f"reward={reward.name} returned shape {tuple(r.shape)} for 2 samples, expected (2,)")


def check_train_config(cfg: DictConfig) -> None:
    t = cfg.train
    if int(t.steps) < 1:
        raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
    if int(t.batch_size) < 1 or int(t.grad_accum) < 1 or int(t.batch_size) % int(t.grad_accum):
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be a positive multiple of "
                          f"train.grad_accum ({t.grad_accum})")
    if float(t.lr) <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    if int(cfg.eval.final_samples) < 1:
        raise ConfigError(f"eval.final_samples must be >= 1, got {cfg.eval.final_samples}")
