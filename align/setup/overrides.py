"""Check command-line overrides before Hydra starts any job: unknown groups or keys get a one-paragraph
message with the valid choices and the nearest key (``+key`` adds a key only to a free-form mapping such as
``reward.kwargs``, never a setting to a typed section, and ``~key`` deletes none of those either); then each
combination is composed once, its relative paths made absolute (``align.setup.paths``), and goes through the
refusal pass (``align.setup.checks.check_config``): a bad value (refused by the typed configs: align/core/schema.py
and the algorithms', models' and rewards' config dataclasses) gets a one-line message naming the key, the value and
the valid choices (no traceback); so do a reward (or an ``eval.rewards`` entry) of another domain than the model's,
a reward that is not differentiable with an algorithm that differentiates it, prompts the model cannot condition on,
groups that do not fit the update and a given ``run_dir=`` that cannot be written; ``resume=`` needs a readable
config.yaml in a writable folder. ``model=`` defaults to the reward's domain (a mix's: its parts'; a callable's:
``reward.domain``) and, when only ``model=`` is given, ``reward=`` to the domain's ``default_reward`` (its preset,
align/conf/preset/)."""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from align.setup.checks import CheckedConfig, ConfigError, check_config, resumable_config, section_name
from align.setup.paper_settings import find_missing
from align.setup.paths import absolute_paths
from align.setup.registration import prepare_compose
from align.core.registry import REGISTRIES, REWARDS, SCHEMA_SUFFIX
from align.core.schema import typed_config, unknown_key_message

GROUPS = ("algo", "model", "reward")
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp",
                "--config-dir", "-cd", "--experimental-rerun"}
_MAX_COMBOS = 512
_MISSING = object()


class ConfigProblem(ValueError):
    pass


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    flags, overrides, skip = [], [], False
    for a in argv:
        if skip:
            flags.append(a)
            skip = False
        elif a.startswith("-"):
            flags.append(a)
            skip = a in _VALUE_FLAGS
        else:
            overrides.append(a)
    return flags, overrides


def _options(conf_dir: str, group: str) -> list[str]:
    """The group's choices: its typed configs (stored by the registries) and presets (yaml files)."""
    d = os.path.join(conf_dir, group)
    names = {f[:-5] for f in os.listdir(d) if f.endswith(".yaml")} if os.path.isdir(d) else set()
    try:
        names |= {f[:-5] for f in ConfigStore.instance().list(group) if f.endswith(".yaml")}
    except OSError:   # nothing stored in this group
        pass
    return sorted(n for n in names if not n.endswith(SCHEMA_SUFFIX))


def _default_choice(conf_dir: str, group: str) -> str:
    for entry in OmegaConf.load(os.path.join(conf_dir, "config.yaml")).defaults:
        if isinstance(entry, DictConfig) and group in entry:
            return str(entry[group])
    raise ConfigProblem(f"config.yaml has no default for {group}")


def _combos(overrides: list[str]) -> list[list[str]]:
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    combos = [list(c) for c in itertools.islice(itertools.product(*choices), _MAX_COMBOS)]
    return combos or [[]]


def _group_values(combo: list[str], group: str) -> str | None:
    for o in combo:
        k, _, v = o.partition("=")
        if k == group:
            return v
    return None


def _parsed_value(combo: list[str], key: str) -> str | None:
    """``key``'s value in ``combo`` as Hydra reads it (a quoted path, e.g. a sweep run's with an '=', unquoted)."""
    for o in combo:
        if o.partition("=")[0] == key:
            return str(OverridesParser.create().parse_override(o).value())
    return None


def _unknown_group(conf_dir: str, group: str, value: str) -> ConfigProblem:
    opts = _options(conf_dir, group)
    return ConfigProblem(f"unknown {group} '{value}'. Valid choices for {group}=: {', '.join(opts)}. "
                         f"Example: python -m align.run {group}={opts[0]}")


def _unknown_key(cfg: DictConfig, key: str) -> ConfigProblem:
    """The key is not in ``cfg``: the nearest valid one under its deepest existing section; ``+key`` is suggested
    only where new keys are taken (a free-form mapping), never for a typed section's settings."""
    parts = key.split(".")
    parent, node = [], cfg
    for p in parts[:-1]:
        nxt = node.get(p, _MISSING) if isinstance(node, DictConfig) else _MISSING
        if not isinstance(nxt, DictConfig):
            break
        parent.append(p)
        node = nxt
    message = unknown_key_message(key, node.keys(), section_name(cfg, ".".join(parent)))
    if _free_form(node, parts[len(parent)]):
        message += f". To add a key to that free-form mapping, write +{key}=..."
    return ConfigProblem(message)


def _free_form(node: DictConfig, key: str) -> bool:
    """Whether ``node`` takes new keys at ``key``: it is an untyped mapping, or ``key`` is a typed section's field of
    type Any (e.g. ``reward.kwargs``), whose value may be any mapping."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return True
    return any(f.name == key and f.type in (Any, "Any") for f in dataclasses.fields(schema))


def _check_deletion(conf_dir: str, cfg: DictConfig, key: str) -> None:
    """``~key``: only a free-form mapping's entries can be deleted; a group (``~algo``) or a typed section's setting
    (``~algo.beta``, ``~seed``) is a ConfigProblem saying what to give instead. Another Hydra config group
    (``~preset``) is Hydra's to handle."""
    if key in GROUPS:
        raise ConfigProblem(f"~{key}: a run needs its {key}; choose one with {key}=<name> "
                            f"(valid choices: {', '.join(_options(conf_dir, key))})")
    if "/" in key or os.path.isdir(os.path.join(conf_dir, key)):
        return
    if not _has_key(cfg, key):
        raise _unknown_key(cfg, key)
    section = key.rpartition(".")[0]
    node = OmegaConf.select(cfg, section) if section else cfg
    if isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node)):
        raise ConfigProblem(f"~{key}: {key} is a setting of {section_name(cfg, section)} and cannot be deleted; "
                            f"give {key}=<value>, or leave it out for its default")


def _has_key(cfg: DictConfig, key: str) -> bool:
    """Whether the dotted ``key`` exists, without resolving its value (it may come from a table that has none)."""
    *parents, last = key.split(".")
    node = OmegaConf.select(cfg, ".".join(parents), default=None) if parents else cfg
    if isinstance(node, ListConfig):
        return last.lstrip("-").isdigit() and -len(node) <= int(last) < len(node)
    return isinstance(node, DictConfig) and last in node.keys()


def check_overrides(argv: list[str], conf_dir: str, training: bool = True) -> list[str]:
    """Validate every combination of the overrides; return argv with ``model=<domain>`` added if absent.
    ``training=False`` (``align.evaluate`` of the base model): the algorithm is not run, so a reward that is not
    differentiable is not refused for it."""
    return check_command(argv, conf_dir, training)[0]


def check_command(argv: list[str], conf_dir: str, training: bool = True) -> tuple[list[str], list[CheckedConfig]]:
    """``check_overrides``, and each combination's config as the refusal pass accepted it (none for ``resume=``,
    whose saved config is checked when the run builds)."""
    prepare_compose()                 # every typed config in ConfigStore and the resolvers, before any compose
    flags, overrides = _split(argv)
    try:
        combos = _combos(overrides)
    except Exception as err:  # the parser's message names the bad token
        raise ConfigProblem(f"could not parse the overrides: {str(err).splitlines()[0]}") from None
    if any(o.partition("=")[0] == "resume" for o in overrides):
        for combo in combos:
            _check_saved(_parsed_value(combo, "resume"))
        return flags + overrides, []      # a resumed run uses its own config.yaml (align/run.py checks the rest)
    user_model = any(o.partition("=")[0] == "model" for o in overrides)
    user_reward = any(o.partition("=")[0] == "reward" for o in overrides)
    if user_model and not user_reward:
        overrides = overrides + [_default_reward(conf_dir, combos)]
        combos = [c + [overrides[-1]] for c in combos]
    domains = set()
    for combo in combos:
        reward = _group_values(combo, "reward") or _default_choice(conf_dir, "reward")
        if reward not in _options(conf_dir, "reward"):
            raise _unknown_group(conf_dir, "reward", reward)
        domains.add(_reward_domain(conf_dir, combo, reward))
    if not user_model:
        if len(domains) > 1:
            raise ConfigProblem(f"the swept rewards score different domains ({', '.join(sorted(domains))}); "
                                "give model= explicitly")
        overrides = overrides + [f"model={domains.pop()}"]
        combos = [c + [overrides[-1]] for c in combos]

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.abspath(conf_dir), version_base=None):
        checked = [_check_combo(conf_dir, [o for o in combo if not o.startswith("hydra.")], training)
                   for combo in combos]
    GlobalHydra.instance().clear()
    return flags + overrides, checked


def _reward_domain(conf_dir: str, combo: list[str], reward: str) -> str:
    """The domain ``reward=`` scores: its class's, or, for a reward whose domain depends on its config (mix: its
    parts'; callable: ``reward.domain``), the composed ``reward`` section's; ``any``: the default model's. A config
    that does not compose here is left to the full check, which reports it."""
    cls = REWARDS.get(reward)
    domain = cls.domain
    if hasattr(cls, "domain_of"):
        overrides = [o for o in combo if o.partition("=")[0].lstrip("+~").split(".")[0] == "reward"]
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=os.path.abspath(conf_dir), version_base=None):
                domain = cls.domain_of(compose(config_name="config", overrides=overrides).reward)
        except Exception:   # reported, with the key, by _check_combo
            pass
        finally:
            GlobalHydra.instance().clear()
    if domain == "any" or domain not in _options(conf_dir, "model"):   # not a model: reported by the full check
        return _default_choice(conf_dir, "model")
    return domain


def _check_saved(run_dir: str) -> None:
    """A resumed run's folder and saved config.yaml: readable, writable, and the config typed and checked again."""
    try:
        typed_config(resumable_config(run_dir))
    except ConfigError as err:
        raise ConfigProblem(f"resume={run_dir}: {err}") from None
    except (ValueError, KeyError) as err:
        raise ConfigProblem(f"resume={run_dir}: its config.yaml: {bad_value_message(err)}") from None


def _default_reward(conf_dir: str, combos: list[list[str]]) -> str:
    """``reward=<the domain's default_reward>`` (its preset) for ``model=X`` given without ``reward=``."""
    rewards = set()
    for combo in combos:
        model = _group_values(combo, "model")
        if model not in _options(conf_dir, "model"):
            raise _unknown_group(conf_dir, "model", model)
        preset = os.path.join(conf_dir, "preset", f"{model}.yaml")
        chosen = OmegaConf.load(preset).get("default_reward") if os.path.isfile(preset) else None
        rewards.add(str(chosen or _default_choice(conf_dir, "reward")))
    if len(rewards) > 1:
        raise ConfigProblem(f"the swept models have different default rewards ({', '.join(sorted(rewards))}); "
                            "give reward= explicitly")
    return f"reward={rewards.pop()}"


def _check_combo(conf_dir: str, combo: list[str], training: bool = True) -> CheckedConfig:
    """One combination: its names (groups, keys), then composed once and through the refusal pass."""
    for g in GROUPS:
        v = _group_values(combo, g)
        if v is not None and v not in _options(conf_dir, g):
            raise _unknown_group(conf_dir, g, v)
    base = _groups_config(conf_dir, [o for o in combo if o.partition("=")[0] in GROUPS])
    for o in combo:
        key = o.partition("=")[0]
        if key.startswith("~"):
            _check_deletion(conf_dir, base, key[1:])
        elif key not in GROUPS and not key.startswith("+") and not _has_key(base, key):
            raise _unknown_key(base, key)        # a +key is checked once composed (check_config: typed sections)
    try:
        cfg = absolute_paths(compose(config_name="config", overrides=combo))
    except Exception as err:
        raise _bad_value(err, combo) from None
    try:
        return check_config(cfg, training, run_dir_given=_group_values(combo, "run_dir") is not None,
                            bad_value=lambda err: _bad_value(err, combo))
    except (ConfigError, ValueError, FileNotFoundError) as err:   # the parts': their message names the key
        raise err if isinstance(err, ConfigProblem) else ConfigProblem(str(err)) from None


def _bad_value(err: Exception, combo: list[str]) -> ConfigProblem:
    missing = find_missing(err)
    if missing is not None:       # no paper setting for this model × reward × algo: say which key to give
        return ConfigProblem(str(missing))
    return ConfigProblem(bad_value_message(err, combo))


_GROUPS_CONFIGS: dict[tuple, DictConfig] = {}


def _groups_config(conf_dir: str, groups_only: list[str]) -> DictConfig:
    """The config of the group choices alone (``algo=``, ``model=``, ``reward=``), in which an override's key is looked
    up: composed once per choice and set of registered parts (a sweep checks many runs of few choices). Read only."""
    key = (os.path.abspath(conf_dir), tuple(groups_only), tuple(len(r) for r in REGISTRIES))
    if key not in _GROUPS_CONFIGS:
        if len(_GROUPS_CONFIGS) >= 256:
            _GROUPS_CONFIGS.clear()
        _GROUPS_CONFIGS[key] = compose(config_name="config", overrides=groups_only)
    return _GROUPS_CONFIGS[key]


_CHOICES = re.compile(r"Invalid value '(.*)', expected one of \[(.*)\]")


def bad_value_message(err: BaseException, combo: list[str] | None = None) -> str:
    """One line naming the key, the bad value and the valid choices, from OmegaConf's ValidationError (or the
    ValueError of a config dataclass's ``validate()``, whose message already names the key)."""
    cause = err
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        if isinstance(err, ValueError):
            return str(err)
        cause = err
    first = str(cause).splitlines()[0].strip() if str(cause).strip() else type(cause).__name__
    key = getattr(cause, "full_key", None)
    if key and (m := _CHOICES.match(first)):
        return f"{key}={m.group(1)} is not a valid choice; valid choices for {key}: {m.group(2)}"
    if key:
        return f"bad value for {key}: {first}"
    where = f" in the overrides {combo}" if combo else ""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    for key, example in _ENTRY_LISTS.items():
        if f"override {key}=" in text:
            return f"bad value for {key}: it is a list of mappings, e.g. '{example}'"
    return f"bad value{where}: {text}"


_ENTRY_LISTS = {"eval.rewards": "eval.rewards=[{name: digits_classifier}, {name: digits_correct, label: correct}]",
                "reward.parts": "reward.parts=[{name: digits_thickness, weight: 1.0}, {name: digits_classifier, "
                                "weight: 0.5}]"}
