"""Every weight a run needs, checked before any work: one message listing all the missing ones.

``weight_needs(cfg)`` walks the composed config — the metric features (``model.features``), the model, the trained
reward and each ``eval.rewards`` entry (a ``reward=mix`` part too) — and asks each registered part what it loads
(its class's ``weight_needs(section)``, a classmethod returning ``WeightNeed``s: each ``WeightSpec`` with the config
value that points to it; a part without one loads nothing; a plugin declares its own the same way). ``missing_weights`` resolves
each of them as the run will (``align.core.weights.resolve``: hub weights downloaded into the Hugging Face cache
when online, the cache only with HF_HUB_OFFLINE=1) and collects every ``WeightsError`` instead of stopping at the
first. ``missing_message`` is the one message a run (``align.run``) and ``align.fetch`` print for them.
"""
from __future__ import annotations

import shlex
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from align.core.registry import MODELS, REWARDS
from align.core.weights import WeightNeed, WeightsError


def features_needs(model: dict[str, Any]) -> list[WeightNeed]:
    """The metric features' weights (``model.features``; none for kind pixels or a model without the key)."""
    from align.metrics.features import features_weight_spec

    features = model.get("features")
    spec = features_weight_spec(features) if features else None
    return [WeightNeed(spec, features.get("weights"))] if spec else []


def part_needs(registry, node: dict[str, Any]) -> list[WeightNeed]:
    """What a registered part loads, as its class declares it (``weight_needs(cfg)``, a classmethod; none without
    one): a model's section, or a reward node (``reward``, an ``eval.rewards`` entry or a mix part)."""
    name = node.get("name")
    declared = getattr(registry.get(str(name)), "weight_needs", None) if name is not None else None
    return list(declared(node)) if declared else []


def reward_needs(reward: dict[str, Any]) -> list[WeightNeed]:
    """The weights of one reward node, and of a mix's parts."""
    return part_needs(REWARDS, reward) + [need for part in reward.get("parts") or () for need in reward_needs(part)]


def weight_needs(cfg: DictConfig) -> list[WeightNeed]:
    """Every weight the run ``cfg`` loads, in load order: model features, checkpoint, decoder, rewards."""
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    model = plain.get("model") or {}
    needs = features_needs(model) + part_needs(MODELS, model)
    needs += reward_needs(plain.get("reward") or {})
    for entry in (plain.get("eval") or {}).get("rewards") or ():
        needs += reward_needs(entry)
    return needs


def missing_weights(needs: Iterable[WeightNeed]) -> list[WeightsError]:
    """The WeightsError of every need that cannot be resolved (each message once, in order)."""
    errors: dict[str, WeightsError] = {}
    for need in needs:
        try:
            need.resolved()
        except WeightsError as err:
            errors.setdefault(str(err), err)
    return list(errors.values())


def fetch_command(overrides: Iterable[str]) -> str:
    """The command that downloads a run's hub weights: ``align.fetch`` with the run's own overrides."""
    return " ".join(["python -m align.fetch", *(shlex.quote(o) for o in overrides)])


def missing_message(errors: list[WeightsError], overrides: Iterable[str]) -> str:
    """One message for all the missing weights: a numbered line each, then the command that fetches them."""
    lines = [f"{len(errors)} weight{'s' if len(errors) > 1 else ''} this run needs "
             f"{'are' if len(errors) > 1 else 'is'} missing (nothing was started):"]
    lines += [f"  {i}. {err}" for i, err in enumerate(errors, 1)]
    lines.append(f"Those on the Hugging Face hub download in one go on a machine with network (HF_HUB_OFFLINE "
                 f"unset): {fetch_command(overrides)}")
    return "\n".join(lines)
