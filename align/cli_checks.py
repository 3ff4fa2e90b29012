"""Check command-line overrides before Hydra starts any job: unknown groups or keys get a one-paragraph
message with the valid choices (no traceback); ``model=`` defaults to the reward's domain and, when only
``model=`` is given, ``reward=`` to the model's ``default_reward``."""
from __future__ import annotations

import itertools
import os
from datetime import datetime

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from align.paper_settings import find_missing   # registers ${align_paper:...} (β, lr per model × reward × algo)

GROUPS = ("algo", "model", "reward")
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp",
                "--config-dir", "-cd", "--experimental-rerun"}
_MAX_COMBOS = 512
_MISSING = object()


class ConfigProblem(ValueError):
    pass


def _default_run_dir(resume, algo, model, reward, seed) -> str:
    if resume not in (None, "None", "null", ""):
        return str(resume)
    return f"runs/{datetime.now():%Y%m%d-%H%M%S}_{algo}_{model}_{reward}_s{seed}"


if not OmegaConf.has_resolver("align_run_dir"):
    OmegaConf.register_new_resolver("align_run_dir", _default_run_dir)


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
    d = os.path.join(conf_dir, group)
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".yaml"))


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


def _unknown_group(conf_dir: str, group: str, value: str) -> ConfigProblem:
    opts = _options(conf_dir, group)
    return ConfigProblem(f"unknown {group} '{value}'. Valid choices for {group}=: {', '.join(opts)}. "
                         f"Example: python -m align.run {group}={opts[0]}")


def _unknown_key(cfg: DictConfig, key: str) -> ConfigProblem:
    parts = key.split(".")
    parent, node = [], cfg
    for p in parts[:-1]:
        nxt = node.get(p, _MISSING) if isinstance(node, DictConfig) else _MISSING
        if not isinstance(nxt, DictConfig):
            break
        parent.append(p)
        node = nxt
    where = ".".join(parent) or "the top level"
    keys = ", ".join(sorted(str(k) for k in node.keys()))
    return ConfigProblem(f"unknown key '{key}'. Valid keys under {where}: {keys}. "
                         f"(To add a key the config does not have, write +{key}=...)")


def check_overrides(argv: list[str], conf_dir: str) -> list[str]:
    """Validate every combination of the overrides; return argv with ``model=<domain>`` added if absent."""
    flags, overrides = _split(argv)
    try:
        combos = _combos(overrides)
    except Exception as err:  # the parser's message names the bad token
        raise ConfigProblem(f"could not parse the overrides: {str(err).splitlines()[0]}") from None
    if any(o.partition("=")[0] == "resume" for o in overrides):
        return flags + overrides          # a resumed run uses its own config.yaml (align/run.py checks the rest)
    user_model = any(o.partition("=")[0] == "model" for o in overrides)
    user_reward = any(o.partition("=")[0] == "reward" for o in overrides)
    if user_model and not user_reward:
        overrides = overrides + [_default_reward(conf_dir, combos)]
        combos = [c + [overrides[-1]] for c in combos]
    domains = set()
    for combo in combos:
        reward = _group_values(combo, "reward") or _default_choice(conf_dir, "reward")
        path = os.path.join(conf_dir, "reward", f"{reward}.yaml")
        if not os.path.isfile(path):
            raise _unknown_group(conf_dir, "reward", reward)
        domains.add(str(OmegaConf.load(path).get("domain", "")))
    if not user_model:
        if len(domains) > 1:
            raise ConfigProblem(f"the swept rewards score different domains ({', '.join(sorted(domains))}); "
                                "give model= explicitly")
        overrides = overrides + [f"model={domains.pop()}"]
        combos = [c + [overrides[-1]] for c in combos]

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.abspath(conf_dir), version_base=None):
        for combo in combos:
            _check_combo(conf_dir, [o for o in combo if not o.startswith("hydra.")])
    GlobalHydra.instance().clear()
    return flags + overrides


def _default_reward(conf_dir: str, combos: list[list[str]]) -> str:
    """``reward=<the model's default_reward>`` for ``model=X`` given without ``reward=``."""
    rewards = set()
    for combo in combos:
        model = _group_values(combo, "model")
        path = os.path.join(conf_dir, "model", f"{model}.yaml")
        if not os.path.isfile(path):
            raise _unknown_group(conf_dir, "model", model)
        rewards.add(str(OmegaConf.load(path).get("default_reward", _default_choice(conf_dir, "reward"))))
    if len(rewards) > 1:
        raise ConfigProblem(f"the swept models have different default rewards ({', '.join(sorted(rewards))}); "
                            "give reward= explicitly")
    return f"reward={rewards.pop()}"


def _check_combo(conf_dir: str, combo: list[str]) -> None:
    for g in GROUPS:
        v = _group_values(combo, g)
        if v is not None and v not in _options(conf_dir, g):
            raise _unknown_group(conf_dir, g, v)
    groups_only = [o for o in combo if o.partition("=")[0] in GROUPS]
    base = compose(config_name="config", overrides=groups_only)
    for o in combo:
        key = o.partition("=")[0]
        if key in GROUPS or key.startswith(("+", "~")):
            continue
        if OmegaConf.select(base, key, default=_MISSING, throw_on_missing=False) is _MISSING:
            raise _unknown_key(base, key)
    try:
        cfg = compose(config_name="config", overrides=combo)
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:
        missing = find_missing(err)
        if missing is not None:       # no paper setting for this model × reward × algo: say which key to give
            raise ConfigProblem(str(missing)) from None
        msg = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise ConfigProblem(f"bad value in the overrides {combo}: {msg}") from None
