"""Build the model, reward, held-out rewards, grid and algorithm a config names, each from the config alone;
the config was checked first (``align.setup.checks.check_config``: ``align.setup.assemble`` runs it)."""
from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from align.core.interfaces import Algorithm, FlowModel, Reward
from align.core.registry import ALGORITHMS, MODELS, REWARDS
from align.core.reward_mix import RewardEntry
from align.core.schema import checked_object
from samplers import make_grid


def _kwargs(node: DictConfig) -> dict[str, Any]:
    d = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    d.pop("name", None)
    return d


def build_model(cfg: DictConfig) -> FlowModel:
    """The model from its config section: a typed one as its dataclass instance, which the refusal pass checked and
    the class takes as it is (``checked_object``); an untyped one as a dict, which the class types and checks."""
    return MODELS.get(cfg.model.name)(checked_object(cfg.model))


def build_reward(cfg: DictConfig) -> Reward:
    """The trained reward."""
    return REWARDS.get(cfg.reward.name)(**_kwargs(cfg.reward))


def build_eval_rewards(entries: list[RewardEntry]) -> dict[str, Reward]:
    """``eval.rewards``' checked entries (``CheckedConfig.eval_rewards``) built, by label (reported as
    ``eval/heldout/<label>``)."""
    return {e.label: e.build() for e in entries}


def build_grid(cfg: DictConfig, model: FlowModel | None = None) -> torch.Tensor:
    """The sampler's grid; the flux grid takes its shift from the model (``grid_shift``: its scheduler's,
    resolution-dependent) unless ``sampler.mu`` is set."""
    shift = float(cfg.sampler.shift)
    if str(cfg.sampler.grid) == "flux":
        mu = OmegaConf.select(cfg, "sampler.mu", default=None)
        if mu is not None:
            shift = math.exp(float(mu))
        elif hasattr(model, "grid_shift"):
            shift = float(model.grid_shift)
        else:
            raise ValueError(f"sampler.grid=flux takes its shift from a FLUX model's scheduler; model="
                             f"{getattr(model, 'name', None)} has none: set sampler.mu=<log-shift> or use "
                             "sampler.grid=uniform|sd3")
    return make_grid(cfg.sampler.grid, int(cfg.sampler.steps), shift)


def build_algorithm(cfg: DictConfig, model: FlowModel, reward: Reward, ts: torch.Tensor) -> Algorithm:
    """The algorithm from ``cfg.algo``, handed over as ``build_model`` hands the model its section."""
    return ALGORITHMS.get(cfg.algo.name)(checked_object(cfg.algo), model, reward, ts)
