"""The refusal pass: ``check_config(cfg)`` checks a composed config once, before any work, from the classes and
configs alone (no weights looked for, nothing built): its keys (a typed section takes none its dataclass lacks,
e.g. from Hydra's ``+key=``), its values (the typed configs' ``validate()``, with the algorithm's grid- and
batch-dependent rules), the algorithm's groups against the update's micro-batches, the
reward's and ``eval.rewards``' domains against the model, a reward gradient for an algorithm that differentiates
the reward, the prompts against the model and a given ``run_dir``. The command line (``align.setup.overrides``),
``align.sweep --dry-run``, ``align.evaluate`` and ``align.setup.assemble.build_trainer`` / ``build_parts`` all run
it; what it found that the build needs again (the typed config, the ``train`` and ``eval`` sections, the prompts,
the held-out rewards' entries) is handed on in its ``CheckedConfig``: ``checked_config(cfg)`` returns the one this
process made for an equal config (the command line checks before Hydra composes the job's config again) or runs
the pass."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import yaml
from omegaconf import DictConfig, OmegaConf

from align.core.registry import ALGORITHMS, MODELS, REWARDS
from align.core.run_dir import CONFIG_FILE
from align.core.reward_mix import MixReward, RewardEntry, domain_of, is_differentiable, parse_entries
from align.core.schema import (EvalConfig, RootConfig, TrainConfig, check, typed_config, unknown_key_message,
                               unknown_keys)
from align.setup.prompts import load_prompts


class ConfigError(ValueError):
    """A configuration problem found before any work started; the message says how to fix it."""


@dataclass
class CheckedConfig:
    """A config the refusal pass accepted, and what it worked out on the way that the build needs."""
    cfg: DictConfig                    # typed (a saved, untyped config.yaml: merged onto the typed configs)
    train: TrainConfig
    evaluation: EvalConfig
    prompts: list[str] | None          # ``prompts=``'s, loaded; None: the built model's default prompts
    eval_rewards: list[RewardEntry]    # ``eval.rewards``, typed and checked
    training: bool


def check_config(cfg: DictConfig, training: bool = True, run_dir_given: bool = False,
                 bad_value: Callable[[Exception], Exception] | None = None) -> CheckedConfig:
    """Every check of ``cfg``, each once, in this order (the first problem is the one reported). ``training=False``
    (``align.evaluate``): no algorithm runs, so neither its reward gradient nor its groups are checked.
    ``run_dir_given``: ``run_dir`` was given and must be creatable. ``bad_value``: how the caller words a bad value
    (the command line: one line naming the key); without it, OmegaConf's or ``validate()``'s error is raised."""
    try:
        typed = check_values(cfg)
    except Exception as err:
        if bad_value is None:
            raise
        raise bad_value(err) from None
    check_domain(str(typed.reward.name), str(typed.model.name), typed.reward)
    if training:
        check_reward_gradient(typed)
    entries = check_eval_rewards(typed)
    prompts = check_prompts(typed)
    if run_dir_given:
        check_run_dir(str(typed.run_dir))
    if training:
        check_groups(typed)
    checked = CheckedConfig(typed, OmegaConf.to_object(typed.train), OmegaConf.to_object(typed.eval), prompts,
                            entries, training)
    for given in {id(cfg): cfg, id(typed): typed}.values():   # as given, and typed (a saved config's)
        _remember(given, checked)
    return checked


def checked_config(cfg: DictConfig, training: bool = True) -> CheckedConfig:
    """``cfg`` through the refusal pass, or the pass's result for an equal config handed on by an earlier
    ``check_config`` in this process (taken once; ``run_dir`` and ``resume`` aside, which the job sets)."""
    return _recall(cfg, training) or check_config(cfg, training)


# ---- the checks ------------------------------------------------------------------------------------------------

def check_values(cfg: DictConfig) -> DictConfig:
    """Every interpolation resolves and every typed section's ``validate()`` passes (``align/core/schema.py``:
    RootConfig's runs the algorithm's ``validate_steps`` and ``validate_batch``); returns ``cfg`` typed (a saved,
    untyped config: merged onto the typed configs first)."""
    if not issubclass(OmegaConf.get_type(cfg) or object, RootConfig):
        return typed_config(cfg)
    check_known_keys(cfg)
    OmegaConf.to_container(cfg, resolve=True)
    check(cfg)
    return cfg


def check_known_keys(cfg: DictConfig) -> None:
    """ConfigError for the first key a typed section has no setting for (Hydra's ``+key=value`` adds one to any
    section, e.g. ``+algo.betaa=3``), naming the nearest valid key; free-form mappings take any key."""
    unknown = unknown_keys(cfg)
    if unknown:
        key, valid = unknown[0]
        raise ConfigError(unknown_key_message(key, valid, section_name(cfg, key.rpartition(".")[0])))


def section_name(cfg: DictConfig, section: str) -> str:
    """How a message names the section ``section`` (dotted) of ``cfg``: ``algo=vggflow`` for a part's own,
    ``the run's config`` for the root."""
    if not section:
        return "the run's config"
    name = OmegaConf.select(cfg, f"{section}.name", default=None) if section in ("algo", "model", "reward") else None
    return f"{section}={name}" if isinstance(name, str) else section


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


def check_reward_gradient(cfg: DictConfig) -> None:
    """ConfigError if the algorithm differentiates the reward and the reward is not differentiable (a mix: any of
    its parts; a callable: ``reward.differentiable``); the message names the algorithms that accept it."""
    name, algo = str(cfg.reward.name), str(cfg.algo.name)
    try:
        differentiable = is_differentiable(REWARDS.get(name), cfg.reward)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if differentiable or not ALGORITHMS.get(algo).uses_reward_gradient:
        return
    accept = gradient_free_algorithms()
    raise ConfigError(f"algo={algo} differentiates the reward, but reward={name}{_black_box_detail(name, cfg.reward)}"
                      f" is not differentiable (a black-box score); algorithms that accept it: "
                      f"{', '.join(f'algo={a}' for a in accept) if accept else 'none is registered yet'}")


def _black_box_detail(name: str, reward_cfg: Any) -> str:
    if REWARDS.get(name) is MixReward:
        return f" (its part{'s' if len(MixReward.black_box_parts(reward_cfg)) > 1 else ''} " \
               f"{', '.join(MixReward.black_box_parts(reward_cfg))})"
    if name == "callable":
        return f" (reward.target={reward_cfg.get('target')}, reward.differentiable=false)"
    return ""


def check_eval_rewards(cfg: DictConfig) -> list[RewardEntry]:
    """``eval.rewards`` checked: each entry typed as its reward's config, labels distinct, each reward of the
    model's domain (held-out rewards are never differentiated: a black-box one is fine)."""
    model = str(cfg.model.name)
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


def check_prompts(cfg: DictConfig) -> list[str] | None:
    """``prompts=``'s set, loaded and checked against the model's class (ValueError or FileNotFoundError naming
    ``prompts=``); None: the model's default prompts, which the built model gives."""
    if cfg.prompts is None:
        return None
    return load_prompts(cfg.prompts, MODELS.get(str(cfg.model.name)))


def check_run_dir(run_dir: str) -> None:
    """``run_dir`` is a directory, or can be made, and is writable (Hydra creates it before the job starts)."""
    problem = unwritable(run_dir)
    if problem:
        advice = "; give a directory" if problem.endswith("is a file") else ""
        raise ConfigError(f"run_dir={run_dir} {problem}{advice}")


def unwritable(path: str) -> str | None:
    """Why the directory ``path`` cannot be written, worded to follow its name (``is a file``, ``cannot be created:
    <parent> is not writable``, ...); None if it is a directory, or can be made, and a file can be created in it."""
    path = os.path.abspath(os.path.expanduser(path))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    where = "is" if existing == path else f"cannot be created: {existing} is"
    if not os.path.isdir(existing):
        return f"{where} a file"
    try:
        with tempfile.NamedTemporaryFile(dir=existing):   # a real write (os.access says yes to root, even on /proc)
            pass
    except OSError:
        return f"{where} not writable"
    return None


def read_saved_config(path: str) -> DictConfig:
    """A saved config.yaml as OmegaConf reads it; ConfigError naming the file (and a YAML error's line) if it is not
    a readable YAML mapping."""
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(yaml_problem(path, err) + "; fix it by hand or restore it from a copy") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file; restore it from a copy") from None
    except OSError as err:
        raise ConfigError(f"{path} cannot be read ({err.strerror})") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} is not a run's config (a YAML mapping of keys); restore it from a copy")
    return cfg


def yaml_problem(path: str, err: yaml.YAMLError) -> str:
    """One line for a YAML syntax error in the file ``path``: where (line and column, counted from 1), what, and
    where the construct it was reading started."""
    mark = getattr(err, "problem_mark", None)
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    started = f" ({context}, which starts at line {start.line + 1})" if context and start is not None else ""
    return f"{path} is not valid YAML{where}: {what}{started}"


def resumable_config(run_dir: str) -> DictConfig:
    """The saved config of the run ``run_dir`` that ``resume=`` continues, read (not yet typed); ConfigError if it
    is missing or not YAML, or if the folder cannot be written (the resumed run writes its lock, checkpoints and
    metrics there)."""
    saved = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(saved):
        raise ConfigError(f"{saved} does not exist (is this a run directory?)")
    cfg = read_saved_config(saved)
    problem = unwritable(run_dir)
    if problem:
        raise ConfigError(f"{run_dir} {problem}: a resumed run writes its lock, checkpoints and metrics.jsonl there; "
                          "make it writable, or copy the run to a writable folder and resume the copy")
    return cfg


def check_groups(cfg: DictConfig) -> None:
    """The update splits into the algorithm's groups of G = ``algo.group_size`` rows (1 without one): G divides
    ``train.batch_size`` (an algorithm with ``validate_batch`` states that rule itself, in ``check_values``), and
    each group lies within one micro-batch unless the algorithm's groups may span micro-batches."""
    G = int(OmegaConf.select(cfg, "algo.group_size", default=1) or 1)
    rows, name = int(cfg.train.batch_size), str(cfg.algo.name)
    if rows % G and not hasattr(OmegaConf.get_type(cfg.algo), "validate_batch"):
        raise ValueError(f"train.batch_size={rows} does not split into groups of algo.group_size={G}")
    micro = rows // int(cfg.train.grad_accum)
    if micro % G and not ALGORITHMS.get(name).groups_span_micro_batches:
        raise ValueError(f"algo={name}'s groups of algo.group_size={G} must lie within one "
                         f"micro-batch (here train.batch_size / train.grad_accum = {micro})")


# ---- handing the result on -------------------------------------------------------------------------------------

_CHECKED: dict[tuple[bool, str], CheckedConfig] = {}
_UNKEYED = ("run_dir", "resume")   # set by the job after the check (Hydra's output directory; a run it resumes)


def _key(cfg: DictConfig, training: bool) -> tuple[bool, str] | None:
    try:
        flat = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception:   # does not resolve: the pass reports it
        return None
    for k in _UNKEYED:
        flat.pop(k, None)
    return training, json.dumps(flat, sort_keys=True, default=str)


def _remember(cfg: DictConfig, checked: CheckedConfig) -> None:
    key = _key(cfg, checked.training)
    if key is not None:
        if len(_CHECKED) >= 512:      # a sweep checks many runs; a process builds few
            _CHECKED.clear()
        _CHECKED[key] = checked


def _recall(cfg: DictConfig, training: bool) -> CheckedConfig | None:
    key = _key(cfg, training)
    return _CHECKED.pop(key, None) if key is not None else None
