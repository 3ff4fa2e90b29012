"""Every weight a run needs, checked before any work: one message listing all the missing ones.

``weight_needs(cfg)`` walks the composed config — the model's checkpoint and decoder, the metric features
(``model.features``), the trained reward's tower and head, and each ``eval.rewards`` entry (a ``reward=mix``
part too) — and pairs each ``WeightSpec`` with the config value that points to it. ``missing_weights`` resolves
each of them as the run will (``align.core.weights.resolve``: hub weights downloaded into the Hugging Face cache
when online, the cache only with HF_HUB_OFFLINE=1) and collects every ``WeightsError`` instead of stopping at the
first. ``missing_message`` is the one message a run (``align.run``) and ``align.fetch`` print for them.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf

from align.core.weights import WeightSpec, WeightsError, resolve


@dataclass(frozen=True)
class WeightNeed:
    """One weight a run loads: its spec and the value of the config key that points to it (None: unset)."""

    spec: WeightSpec
    value: str | None

    def resolved(self) -> str:
        """The local path (downloading when online), or a WeightsError naming the file and the way forward."""
        return resolve(self.spec, self.value)


def _sd3_needs(model: dict[str, Any]) -> list[WeightNeed]:
    from align.models.sd3 import _checkpoint_specs

    decoder = str(model.get("decoder", "taesd3"))
    checkpoint, taesd = _checkpoint_specs(model["pretrained"], bool(model.get("t5", True)), decoder == "vae")
    needs = [WeightNeed(checkpoint, model["pretrained"])]
    return needs + ([WeightNeed(taesd, model.get("taesd3_path"))] if decoder == "taesd3" else [])


def _flux_needs(model: dict[str, Any]) -> list[WeightNeed]:
    from align.models.flux import _checkpoint_specs

    decoder = str(model.get("decoder", "taef1"))
    checkpoint, taef1 = _checkpoint_specs(model["pretrained"], decoder == "vae")
    needs = [WeightNeed(checkpoint, model["pretrained"])]
    return needs + ([WeightNeed(taef1, model.get("taef1_path"))] if decoder == "taef1" else [])


def _aesthetic_needs(reward: dict[str, Any]) -> list[WeightNeed]:
    from align.metrics.clip import open_clip_weight_spec
    from rewards.aesthetic import HEAD_SPEC

    model_name = reward.get("clip_model", "ViT-L-14")
    tower = open_clip_weight_spec(model_name, "openai", what=f"CLIP image features ({model_name})",
                                  config_key="reward.clip_weights", env_var="ALIGN_AESTHETIC_CLIP_WEIGHTS")
    return [WeightNeed(tower, reward.get("clip_weights")), WeightNeed(HEAD_SPEC, reward.get("head_weights"))]


def _hpsv2_needs(reward: dict[str, Any]) -> list[WeightNeed]:
    from rewards.hpsv2 import hps_weight_spec

    return [WeightNeed(hps_weight_spec(str(reward.get("version", "v2.1"))), reward.get("weights"))]


def _pickscore_needs(reward: dict[str, Any]) -> list[WeightNeed]:
    from rewards.pickscore import MODEL_SPEC, PROCESSOR_SPEC

    return [WeightNeed(MODEL_SPEC, reward.get("model")), WeightNeed(PROCESSOR_SPEC, reward.get("processor"))]


def _mix_needs(reward: dict[str, Any]) -> list[WeightNeed]:
    return [need for part in reward.get("parts") or () for need in reward_needs(part)]


MODEL_NEEDS: dict[str, Callable[[dict[str, Any]], list[WeightNeed]]] = {"sd3": _sd3_needs, "flux": _flux_needs}
REWARD_NEEDS: dict[str, Callable[[dict[str, Any]], list[WeightNeed]]] = {
    "aesthetic": _aesthetic_needs, "hpsv2": _hpsv2_needs, "pickscore": _pickscore_needs, "mix": _mix_needs}


def features_needs(model: dict[str, Any]) -> list[WeightNeed]:
    """The metric features' weights (``model.features``; none for kind pixels or a model without the key)."""
    from align.metrics.features import features_weight_spec

    features = model.get("features")
    spec = features_weight_spec(features) if features else None
    return [WeightNeed(spec, features.get("weights"))] if spec else []


def reward_needs(reward: dict[str, Any]) -> list[WeightNeed]:
    """The weights of one reward node (``reward``, an ``eval.rewards`` entry or a mix part)."""
    return REWARD_NEEDS.get(str(reward.get("name")), lambda _: [])(reward)


def weight_needs(cfg: DictConfig) -> list[WeightNeed]:
    """Every weight the run ``cfg`` loads, in load order: model features, checkpoint, decoder, rewards."""
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    model = plain.get("model") or {}
    needs = features_needs(model) + MODEL_NEEDS.get(str(model.get("name")), lambda _: [])(model)
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
