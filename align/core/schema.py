"""The runner's root config as typed dataclasses (Hydra structured configs): the top-level keys and the
``train``, ``sampler`` and ``eval`` sections. ``align/conf/config.yaml`` extends ``config_schema``; types and
choices are checked by OmegaConf when a value is set; value checks that a type cannot express are each
dataclass's ``validate()``, run by ``validated(cfg)`` (the command line does so before any work).

The algorithm's, model's and reward's sections are typed by their own dataclasses, registered beside their
classes (``align/core/registry.py``).
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, TypeVar

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from align.core.loading import DTYPES
from align.core.registry import REGISTRIES, register_all
from align.core.run_dir import ABSENT_MEANS, RETIRED_KEYS

ROOT_SCHEMA = "config_schema"
T = TypeVar("T")


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise ValueError ``<key> must be <rule>, got <value>`` unless ``ok`` (a ``validate()``'s one check)."""
    if not ok:
        raise ValueError(f"{key} must be {rule}, got {value}")


def positive(value: float) -> bool:
    """``value`` is finite and > 0 (NaN and inf are not)."""
    return math.isfinite(value) and value > 0


Dtype = enum.StrEnum("Dtype", list(DTYPES))   # a network's dtype: bf16 | bfloat16 | fp16 | float16 | fp32 | float32


class Device(enum.StrEnum):
    auto = "auto"        # cuda if available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class Tracker(enum.StrEnum):
    tensorboard = "tensorboard"  # <run_dir>/tb (always installed)
    wandb = "wandb"              # extra [wandb]; WANDB_MODE=offline works without an account
    mlflow = "mlflow"            # extra [mlflow]; a local SQLite store <run_dir>/mlflow.db unless MLFLOW_TRACKING_URI


class Grid(enum.StrEnum):
    uniform = "uniform"  # t_k = k/N
    sd3 = "sd3"          # SD3's shifted grid, t = 1 − σ
    flux = "flux"        # FluxPipeline's grid with the checkpoint's (resolution-dependent) shift, t = 1 − σ


class FidReference(enum.StrEnum):
    independent = "independent"  # the paper's: base samples of the same prompts from a second fixed noise set
    paired = "paired"            # base samples from the evaluation noise itself (the untouched model scores 0)


@dataclass
class TrainConfig:
    """The optimisation loop (AdamW with the paper's defaults)."""
    steps: int = 200                # optimizer updates (default per domain: align/conf/preset/)
    batch_size: int = 32            # trajectories per update (per process)
    grad_accum: int = 1             # micro-batches per update, each of batch_size / grad_accum trajectories
    lr: float = MISSING             # AdamW learning rate (config.yaml: ${algo.lr}, the paper's: align/setup/paper_settings)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1.0e-2
    adam_eps: float = 1.0e-8
    grad_clip: float = 1.0          # max grad norm, applied to each parameter group separately (θ and φ)
    max_bad_steps: int = 5          # consecutive non-finite updates before the run stops (with an intact checkpoint)
    # An update that leaves a parameter group non-finite, or its norm above this many times its norm at the start
    # of training, stops the run at once (diverged), without checkpointing the broken parameters
    max_param_growth: float = 100.0
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    progress: bool = True           # tqdm bar
    # experiment trackers (accelerate's tracking API): tensorboard (<run_dir>/tb) | wandb | mlflow (extras of
    # the same names); metrics.jsonl is always written (align/train/trackers.py)
    trackers: List[Tracker] = field(default_factory=lambda: [Tracker.tensorboard])
    # Several processes: seconds a collective (gradient all-reduce, gather, barrier) waits for the slowest process
    # before the run fails (torch.distributed's process-group timeout, through accelerate; torch's own default is
    # 1800 s on gloo, 600 s on NCCL). Raise it if one process can lag that long, e.g. the main process writing a
    # checkpoint to a slow disk while the others wait.
    collective_timeout_s: float = 1800.0

    def validate(self) -> None:
        require(self.steps >= 1, "train.steps", self.steps, ">= 1")
        if self.batch_size < 1 or self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a positive multiple of "
                             f"train.grad_accum ({self.grad_accum})")
        require(positive(self.lr), "train.lr", self.lr, "finite and > 0")
        # -1 would reverse the gradient, 0 zero it
        require(positive(self.grad_clip), "train.grad_clip", self.grad_clip, "finite and > 0")
        for key in ("log_every", "checkpoint_every", "max_bad_steps"):
            require(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), ">= 1")
        require(self.max_param_growth > 1, "train.max_param_growth", self.max_param_growth, "> 1")
        require(positive(self.collective_timeout_s), "train.collective_timeout_s", self.collective_timeout_s,
                "finite and > 0")
        for name in self.trackers:
            module = {"wandb": "wandb", "mlflow": "mlflow"}.get(str(name))
            if module and importlib.util.find_spec(module) is None:
                raise ValueError(f"train.trackers includes {name} but the {module} package is not installed: "
                                 f'pip install -e ".[{name}]"')


@dataclass
class SamplerConfig:
    """The Euler ODE (and SDE) sampler's time grid."""
    steps: int = 20                 # Euler steps
    grid: Grid = Grid.uniform       # config.yaml: ${model.grid}, the model's own
    shift: float = 3.0              # shift of the sd3 grid
    # the flux grid's log-shift μ (shift exp(μ)); null: the model's, as FluxPipeline computes it from the number of
    # image tokens and the scheduler config (FLUX.1-dev at 1024²: μ = 1.15), or its static shift (schnell: 1)
    mu: Optional[float] = None


@dataclass
class EvalConfig:
    """Periodic evaluation on fixed noise and prompts, and the final samples."""
    every: int = 50                 # evaluate every this many updates (0: only at the end)
    n_samples: int = 256            # evaluation samples
    group_size: int = 16            # diversity: feature variance over groups of this many samples of one prompt
    # FID's reference set. A 16-sample per-prompt FID is biased upwards (it is not the 50k-sample FID); compare it
    # only within one setting.
    fid_reference: FidReference = FidReference.paired
    final_samples: int = 1000       # samples written to samples_final.pt
    # rows per sampling chunk (evaluation and final samples); several processes split the chunks, and the samples
    # are those of one process whatever the split
    batch_size: int = 32
    # held-out rewards, scored on the evaluation samples beside the trained one and never trained on, each reported
    # as eval/heldout/<label>: entries {name: <reward>, label: <optional, default the name>, ...its own keys}, e.g.
    # 'eval.rewards=[{name: digits_classifier}]' (each typed and checked as reward=<name> is: align/setup/checks.py)
    rewards: List[Dict[str, Any]] = field(default_factory=list)

    def validate(self) -> None:
        for i, entry in enumerate(self.rewards):
            require(isinstance(entry.get("name"), str), f"eval.rewards[{i}]", dict(entry),
                    "a mapping with a reward's name, e.g. {name: digits_classifier}")
        require(self.every >= 0, "eval.every", self.every, ">= 0 (0: only at the end)")
        for key in ("n_samples", "group_size"):
            require(getattr(self, key) >= 2, f"eval.{key}", getattr(self, key), ">= 2")
        require(self.final_samples >= 1, "eval.final_samples", self.final_samples, ">= 1")
        require(self.batch_size >= 1, "eval.batch_size", self.batch_size, ">= 1")


@dataclass
class RootConfig:
    """``python -m align.run key=value ...``: one algorithm × model × reward, and the loop around them."""
    algo: Any = MISSING             # typed by the algorithm's config dataclass (algorithms/<name>.py)
    model: Any = MISSING            # typed by the model's config dataclass (align/models/<name>.py)
    reward: Any = MISSING           # typed by the reward's config dataclass (rewards/<name>.py)
    seed: int = 0
    # Where this run writes config.yaml, metrics.jsonl, tb/, samples_final.pt, checkpoints/ (config.yaml: a new
    # runs/<date>-<time>_<algo>_<model>_<reward>_s<seed>, or the resumed run's own directory).
    run_dir: str = MISSING
    resume: Optional[str] = None    # <run_dir>: continue that run from its last checkpoint (its own config.yaml)
    prompts: Optional[str] = None   # null: the domain's default prompts; file:<path>: one prompt per line
    device: Device = Device.auto
    # torch CPU threads (1 is fastest for the small built-in models and for parallel sweeps on a shared CPU;
    # null: torch's default, all cores)
    threads: Optional[int] = 1
    default_reward: Optional[str] = None  # the reward when only model= is given (the domain's preset)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        require(self.threads is None or self.threads >= 1, "threads", self.threads, ">= 1 (or null: all cores)")
        # an algorithm's settings that depend on the grid: its config's validate_steps(n_steps), if it has one
        algo_schema = OmegaConf.get_type(self.algo) if isinstance(self.algo, DictConfig) else None
        if hasattr(algo_schema, "validate_steps"):
            algo_schema.validate_steps(self.algo, int(self.sampler.steps))
        # ... and on the update's rows per process (e.g. groups of G rows per prompt): validate_batch(batch_size)
        if hasattr(algo_schema, "validate_batch"):
            algo_schema.validate_batch(self.algo, int(self.train.batch_size))
        if self.device == Device.cuda and not torch.cuda.is_available():
            raise ValueError("device=cuda but torch sees no GPU (torch.cuda.is_available() is False); "
                                 "use device=cpu or device=auto")


def store_schemas() -> None:
    """Every typed config in Hydra's ConfigStore, as composing the runner's config needs: the root schema
    (``config_schema``, which align/conf/config.yaml extends) and each registered part's (``register_all``)."""
    register_all()
    ConfigStore.instance().store(name=ROOT_SCHEMA, node=RootConfig)


def check(cfg: DictConfig) -> None:
    """Run ``validate()`` of every typed section of ``cfg`` (on the DictConfig itself: ``validate`` reads the
    fields by attribute, so it serves the dataclass and its DictConfig alike); raises ValueError naming the key."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return
    if hasattr(schema, "validate"):
        schema.validate(cfg)
    for f in dataclasses.fields(schema):
        child = OmegaConf.select(cfg, f.name, throw_on_resolution_failure=False)
        if isinstance(child, DictConfig):
            check(child)


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Each key of a typed section of ``cfg`` that its dataclass has no field for (e.g. one added with Hydra's
    ``+key=value``), as (dotted key, that section's fields). An untyped mapping (a free-form field such as
    ``reward.kwargs``, a part registered without a config dataclass) takes any key; lists are not looked into."""
    if not cfg.keys():            # empty, None or missing: nothing to look at (items_ex refuses the latter two)
        return []
    schema = OmegaConf.get_type(cfg)
    fields = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    found = []
    for key, value in cfg.items_ex(resolve=False):
        if fields is not None and key not in fields:
            found.append((f"{prefix}{key}", fields))
        elif isinstance(value, DictConfig):
            found += unknown_keys(value, f"{prefix}{key}.")
    return found


def unknown_key_message(key: str, valid: Iterable[str], where: str) -> str:
    """One line for a key ``where`` (e.g. ``algo=vggflow``, ``train``) has no setting for: the nearest valid key
    (difflib), then all of them."""
    parent, _, last = key.rpartition(".")
    valid = sorted(str(k) for k in valid)
    near = difflib.get_close_matches(last, valid, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{near[0]}?)" if near else ""
    return f"unknown key '{key}'{hint}; {where} has the keys {', '.join(valid)}"


def validated(cfg: DictConfig) -> Any:
    """``cfg`` as objects (every interpolation resolved, typed sections as their dataclasses), checked."""
    check(cfg)
    return OmegaConf.to_object(cfg)


def typed(schema: type, cfg: Any) -> DictConfig:
    """``cfg`` (a DictConfig or dict, e.g. a saved config.yaml's section or a preset read with OmegaConf.load)
    merged onto the dataclass ``schema`` and checked; a config already of that type (or a subclass) is only
    checked."""
    if isinstance(cfg, DictConfig) and issubclass(OmegaConf.get_type(cfg) or object, schema):
        check(cfg)
        return cfg
    given = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    given.pop("defaults", None)   # a preset file's Hydra defaults list
    cfg = OmegaConf.merge(OmegaConf.structured(schema), given)
    check(cfg)
    return cfg


def typed_config(cfg: Any) -> DictConfig:
    """A saved (untyped, resolved) config, e.g. a run's config.yaml, merged onto the root schema and the typed
    configs of its algorithm, model and reward, and checked again; raises ValueError naming the key."""
    register_all()
    given = OmegaConf.to_container(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg), resolve=False)
    root = OmegaConf.structured(RootConfig)
    for registry in REGISTRIES:
        section = given[registry.group]
        schema = registry.config(section["name"])
        fields = {f.name for f in dataclasses.fields(schema)} if schema is not None else set()
        for key in RETIRED_KEYS:     # retired for the built-ins; a part whose config has the key keeps it
            group, _, name = key.partition(".")
            if group == registry.group and name not in fields:
                section.pop(name, None)
        if schema is not None:
            root[registry.group] = OmegaConf.structured(schema)
    for key, value in ABSENT_MEANS.items():       # a key the run was saved without: the behaviour it had
        group, _, name = key.partition(".")
        section = given.get(group)
        if (key not in RETIRED_KEYS and isinstance(section, dict) and name not in section
                and name in root[group]):
            section[name] = value
    root = OmegaConf.merge(root, given)
    check(root)
    return root


def checked_object(node: DictConfig) -> Any:
    """A typed section the refusal pass checked (``align.setup.checks``), as its dataclass instance, marked so that
    ``config_object`` takes it as it is (each check runs once); an untyped section as a plain dict."""
    obj = OmegaConf.to_object(node)
    if dataclasses.is_dataclass(obj):
        _CHECKED[id(obj)] = obj
    return obj


_CHECKED: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()


def config_object(schema: type[T], cfg: Any = None, overrides: Mapping[str, Any] | None = None,
                  owner: str = "") -> T:
    """``cfg`` as an instance of the config dataclass ``schema``: the object a part's constructor works with.

    ``cfg`` is an instance of ``schema``, a DictConfig (typed or not, e.g. a saved config.yaml's section), a
    mapping, or None (the dataclass's defaults); ``overrides`` (a constructor's keyword arguments) are set on top.
    Interpolations are resolved, types and choices checked by OmegaConf and the values by ``validate()``; an
    instance that ``checked_object`` handed out (the refusal pass checked it) is taken as it is. A key ``schema``
    has no field for raises TypeError naming ``owner`` (e.g. ``model=sd3``) and the valid keys, as a constructor
    does for an unknown keyword."""
    if isinstance(cfg, schema) and not overrides and _CHECKED.get(id(cfg)) is cfg:
        return cfg
    if cfg is None:
        given = {}
    elif isinstance(cfg, schema):
        given = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    elif isinstance(cfg, DictConfig):
        given = OmegaConf.to_container(cfg, resolve=True)
    else:
        given = dict(cfg)
    given.update(overrides or {})
    given.pop("defaults", None)   # a preset file's Hydra defaults list
    fields = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise TypeError(f"{owner or schema.__name__}: unknown setting(s) {', '.join(unknown)}; valid keys: "
                        f"{', '.join(sorted(fields))}")
    node = OmegaConf.merge(OmegaConf.structured(schema), given)
    check(node)
    return OmegaConf.to_object(node)
