"""Build the model, reward, algorithm and grid a config names, with clear errors before any work."""
from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from align.core.interfaces import Algorithm, FlowModel, Reward
from align.core.registry import ALGORITHMS, MODELS, REWARDS
from align.core.reward_mix import MixReward, RewardEntry, domain_of, is_differentiable, parse_entries
from samplers import make_grid


class ConfigError(ValueError):
    """A configuration problem found before any work started; the message says how to fix it."""


def _kwargs(node: DictConfig) -> dict[str, Any]:
    d = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    d.pop("name", None)
    return d


def build_model(cfg: DictConfig) -> FlowModel:
    return MODELS.get(cfg.model.name)(**_kwargs(cfg.model))


def scores_domain(domain: str, model: str) -> bool:
    """Whether a reward of ``domain`` scores the model ``model``: its own domain, ``any``, or the domain whose rewards
    the model declares it shares (``reward_domain``: FLUX's RGB images and prompts are the sd3 domain's)."""
    shared = getattr(MODELS.get(model), "reward_domain", None) if model in MODELS.names() else None
    return domain in ("any", model, shared)


def check_domain(reward: str, model: str, reward_cfg: Any = None) -> None:
    """ConfigError unless the reward ``reward`` (with its config ``reward_cfg``, where its domain depends on it:
    mix, callable) scores the model ``model``'s domain (from the class and config: no weights)."""
    cls = REWARDS.get(reward)
    try:
        domain = domain_of(cls, reward_cfg) if reward_cfg is not None else cls.domain
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not scores_domain(domain, model):
        raise ConfigError(f"reward={reward} scores the '{domain}' domain but model={model}; "
                          f"use model={domain} or a reward of the {model} domain")


def gradient_free_algorithms() -> list[str]:
    """The registered algorithms that never differentiate the reward (``uses_reward_gradient = False``)."""
    return [n for n in ALGORITHMS.names() if not ALGORITHMS.get(n).uses_reward_gradient]


def check_reward_gradient(algo: str, reward: str, differentiable: bool, detail: str = "") -> None:
    """ConfigError if the algorithm ``algo`` differentiates the reward and the reward ``reward`` is not
    differentiable; the message names the algorithms that accept it."""
    if differentiable or not ALGORITHMS.get(algo).uses_reward_gradient:
        return
    accept = gradient_free_algorithms()
    raise ConfigError(f"algo={algo} differentiates the reward, but reward={reward}{detail} is not differentiable "
                      f"(a black-box score); algorithms that accept it: "
                      f"{', '.join(f'algo={a}' for a in accept) if accept else 'none is registered yet'}")


def _black_box_detail(name: str, reward_cfg: Any) -> str:
    if REWARDS.get(name) is MixReward:
        return f" (its part{'s' if len(MixReward.black_box_parts(reward_cfg)) > 1 else ''} " \
               f"{', '.join(MixReward.black_box_parts(reward_cfg))})"
    if name == "callable":
        return f" (reward.target={reward_cfg.get('target')}, reward.differentiable=false)"
    return ""


def check_reward(cfg: DictConfig, training: bool = True) -> None:
    """What the trained reward and ``eval.rewards`` need of the model and (``training``) the algorithm, from the
    classes and configs only (no weights looked for): domains, and a reward gradient for an algorithm that uses
    one."""
    name = str(cfg.reward.name)
    check_domain(name, str(cfg.model.name), cfg.reward)
    if training:
        _check_trained_gradient(cfg)
    eval_reward_entries(cfg, str(cfg.model.name))


def _check_trained_gradient(cfg: DictConfig) -> None:
    name = str(cfg.reward.name)
    try:
        differentiable = is_differentiable(REWARDS.get(name), cfg.reward)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not differentiable:
        check_reward_gradient(str(cfg.algo.name), name, False, _black_box_detail(name, cfg.reward))


def eval_reward_entries(cfg: DictConfig, model: str) -> list[RewardEntry]:
    """``eval.rewards`` checked: each entry typed as its reward's config, labels distinct, each reward of the
    domain of ``model``."""
    try:
        entries = parse_entries(OmegaConf.select(cfg, "eval.rewards", default=None) or [], "eval.rewards",
                                weighted=False)
        domains = [e.domain for e in entries]
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for e, domain in zip(entries, domains):
        if not scores_domain(domain, model):
            raise ConfigError(f"{e.key}: reward {e.name} scores the '{domain}' domain but model={model}; "
                              f"held-out rewards must score the model's domain")
    return entries


def build_reward(cfg: DictConfig, model: FlowModel, training: bool = True) -> Reward:
    """The trained reward, checked first (no weights looked for yet) against the model and (``training``, and the
    config names one) the algorithm."""
    check_domain(cfg.reward.name, model.name, cfg.reward)
    if training and OmegaConf.select(cfg, "algo.name", default=None) is not None:
        _check_trained_gradient(cfg)
    return REWARDS.get(cfg.reward.name)(**_kwargs(cfg.reward))


def build_eval_rewards(cfg: DictConfig, model: FlowModel) -> dict[str, Reward]:
    """``eval.rewards`` built, by label (reported as ``eval/heldout/<label>``)."""
    return {e.label: e.build() for e in eval_reward_entries(cfg, model.name)}


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
    """The algorithm with its typed config (each class merges an untyped one, e.g. a resumed run's, onto its
    config dataclass); refused if it differentiates the reward and ``reward`` is not differentiable."""
    check_reward_gradient(str(cfg.algo.name), reward.name, bool(getattr(reward, "differentiable", True)))
    return ALGORITHMS.get(cfg.algo.name)(cfg.algo, model, reward, ts)
