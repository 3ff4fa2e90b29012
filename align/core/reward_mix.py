"""Reward mixing: a weighted sum of registered rewards, r(x) = Σ_i w_i r_i(x), as one reward (``reward=mix``,
registered by rewards/mix.py); and the reward entries it shares with ``eval.rewards`` (held-out rewards,
``align/setup/build.py``).

An entry is ``{name: <registered reward>, weight: <float>, label: <optional>, ...that reward's own keys}``
(``eval.rewards`` entries have no weight). Each is typed and checked as a standalone ``reward=<name>`` would be
(its config dataclass, unknown keys refused), labelled by ``label`` (default: its name; labels are the metric names,
so two entries of one reward need distinct labels). The mix scores the parts' common domain (a part of domain
``any`` fits every domain; two different domains are refused), is differentiable iff every part is, and gives the
parts' unweighted values by label (``part_values``: the evaluator's ``eval/reward/<label>``). A mix inside a mix is
refused: list its parts in the outer one.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from align.core.interfaces import Reward
from align.core.registry import REWARDS
from align.core.schema import typed

LABEL = re.compile(r"^[A-Za-z0-9_.\-]+$")      # a metric-name component (no '/')


def is_differentiable(cls: type, cfg: Any) -> bool:
    """Whether the reward class ``cls`` with config ``cfg`` is differentiable (``cls.is_differentiable(cfg)`` where
    it depends on the config, else the class's ``differentiable``)."""
    fn = getattr(cls, "is_differentiable", None)
    return bool(fn(cfg)) if fn is not None else bool(cls.differentiable)


def domain_of(cls: type, cfg: Any) -> str:
    """The domain the reward class ``cls`` with config ``cfg`` scores (``cls.domain_of(cfg)``, else ``cls.domain``)."""
    fn = getattr(cls, "domain_of", None)
    return str(fn(cfg)) if fn is not None else str(cls.domain)


@dataclass(frozen=True)
class RewardEntry:
    """One checked entry: its label, the registered name, class, typed config and (a mix's part) weight."""
    key: str                   # where it was given, e.g. reward.parts[1]
    label: str
    name: str
    cls: type
    cfg: Any                   # its typed config (DictConfig), or a plain dict for a reward without a dataclass
    weight: float | None

    @property
    def differentiable(self) -> bool:
        return is_differentiable(self.cls, self.cfg)

    @property
    def domain(self) -> str:
        return domain_of(self.cls, self.cfg)

    def kwargs(self) -> dict[str, Any]:
        given = OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True) if isinstance(
            self.cfg, DictConfig) else dict(self.cfg)
        given.pop("name", None)
        return given

    def build(self) -> Reward:
        return self.cls(**self.kwargs())


def parse_entries(entries: Any, key: str, weighted: bool) -> list[RewardEntry]:
    """``entries`` (a list of mappings) checked and typed; ValueError naming ``key[i]`` and the problem."""
    if isinstance(entries, (DictConfig, ListConfig)):
        entries = OmegaConf.to_container(entries, resolve=True, enum_to_str=True)
    if entries is None:
        entries = []
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"{key} must be a list of entries {{name: <reward>{', weight: <float>' if weighted else ''}"
                         f", ...}}, got {entries!r}")
    out, seen = [], {}
    for i, entry in enumerate(entries):
        out.append(_entry(entry, f"{key}[{i}]", weighted))
        label = out[-1].label
        if label in seen:
            raise ValueError(f"{seen[label]} and {key}[{i}] are both labelled {label!r} (a label is a metric name); "
                             f"give one a distinct label, e.g. {{name: {out[-1].name}, label: {label}_2, ...}}")
        seen[label] = f"{key}[{i}]"
    return out


def _entry(entry: Any, key: str, weighted: bool) -> RewardEntry:
    example = "{name: digits_thickness" + (", weight: 1.0" if weighted else "") + "}"
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError(f"{key} must be a mapping with a reward's name, e.g. {example}; got {entry!r}")
    entry = dict(entry)
    name, label, weight = entry.pop("name"), entry.pop("label", None), entry.pop("weight", None)
    try:
        cls = REWARDS.get(name)
    except KeyError:
        raise ValueError(f"{key}.name={name} is not a reward; valid choices: {', '.join(REWARDS.names())}") from None
    if cls is MixReward:
        raise ValueError(f"{key}.name=mix: a mix cannot hold a mix; list that mix's parts in this one")
    if weighted:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{key}.weight must be a finite number (the part's weight w_i), got {weight!r}")
    elif weight is not None:
        raise ValueError(f"{key}.weight: a held-out reward has no weight (it is scored, not trained on); drop it")
    label = name if label is None else label
    if not isinstance(label, str) or not LABEL.match(label):
        raise ValueError(f"{key}.label must be a name of letters, digits, '_', '.' or '-', got {label!r}")
    schema = REWARDS.config(name)
    if schema is None:
        cfg: Any = {"name": name, **entry}
    else:
        known = {f.name for f in dataclasses.fields(schema)} - {"name"}
        unknown = sorted(set(entry) - known)
        if unknown:
            raise ValueError(f"{key}: reward {name} has no key {unknown[0]!r}; its keys: "
                             f"{', '.join(sorted(known)) or 'none'} (and label{', weight' if weighted else ''})")
        cfg, problem = None, None
        try:
            cfg = typed(schema, {"name": name, **entry})
        except Exception as err:      # OmegaConf's type error, or the config's validate()
            where = getattr(err, "full_key", None)
            problem = f"{key}{'.' + where if where else ''} ({name}): {_one_line(err)}"
        if problem is not None:       # raised outside the except: no OmegaConf error in its context
            raise ValueError(problem)
    return RewardEntry(key, label, name, cls, cfg, None if weight is None else float(weight))


def _one_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def common_domain(entries: Sequence[RewardEntry], key: str) -> str:
    """The one domain the entries score (``any`` if all of them score any); ValueError if two differ."""
    domains = {e.domain for e in entries} - {"any"}
    if len(domains) > 1:
        parts = ", ".join(f"{e.label} ({e.domain})" for e in entries)
        raise ValueError(f"{key} score different domains: {parts}; every part must score the model's domain")
    return domains.pop() if domains else "any"


@dataclass
class MixConfig:
    """``reward=mix``: r = Σ_i w_i r_i over ``parts``, each part a registered reward with its weight, e.g.
    ``'reward.parts=[{name: digits_thickness, weight: 1.0}, {name: digits_classifier, weight: 0.5}]'``."""
    name: str = "mix"
    # entries {name: <reward>, weight: <w_i>, label: <optional metric name, default the name>, ...its own keys}
    parts: List[Dict[str, Any]] = field(default_factory=list)

    def validate(self) -> None:
        entries = parse_entries(self.parts, "reward.parts", weighted=True)
        if not entries:
            raise ValueError("reward.parts must list at least one reward, e.g. "
                             "'reward.parts=[{name: digits_thickness, weight: 1.0}, {name: digits_classifier, "
                             "weight: 0.5}]'")
        common_domain(entries, "reward.parts")


class MixReward(Reward):
    """r(x) = Σ_i w_i r_i(x), each r_i a registered reward in its own units."""

    name, domain = "mix", "any"

    def __init__(self, parts: Sequence[dict[str, Any]], **_: Any):
        super().__init__()
        entries = parse_entries(list(parts), "reward.parts", weighted=True)
        if not entries:
            raise ValueError("reward.parts must list at least one reward")
        self.domain = common_domain(entries, "reward.parts")
        self.labels = [e.label for e in entries]
        self.weights = [float(e.weight) for e in entries]
        self.parts = nn.ModuleList([e.build() for e in entries])
        self.differentiable = all(getattr(p, "differentiable", True) for p in self.parts)

    @classmethod
    def _entries(cls, cfg: Any) -> list[RewardEntry]:
        return parse_entries(cfg.get("parts", []), "reward.parts", weighted=True)

    @classmethod
    def is_differentiable(cls, cfg: Any) -> bool:
        return all(e.differentiable for e in cls._entries(cfg))

    @classmethod
    def domain_of(cls, cfg: Any) -> str:
        return common_domain(cls._entries(cfg), "reward.parts")

    @classmethod
    def black_box_parts(cls, cfg: Any) -> list[str]:
        """Labels of the parts that are not differentiable (for the refusal's message)."""
        return [e.label for e in cls._entries(cfg) if not e.differentiable]

    def part_values(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each part's unweighted r_i(images), by label."""
        return {label: part(images, prompts) for label, part in zip(self.labels, self.parts)}

    def combine(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_i w_i r_i from ``part_values``' output (the forward, and the evaluator's total, in one place)."""
        total = None
        for label, w in zip(self.labels, self.weights):
            term = w * values[label]
            total = term if total is None else total + term
        return total

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.combine(self.part_values(images, prompts))
