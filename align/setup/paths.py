"""The relative filesystem paths of a run's config made absolute, against the working directory it was composed
in, so that the saved config.yaml names the same files from anywhere: ``resume=<run_dir>`` and
``align.evaluate <run_dir>`` work from any directory. A re-run from the same directory with the same relative
path composes the same absolute path, so it is still the same config as the saved one (``align.core.run_dir``'s
comparison, a sweep's plan); Hydra's overrides, and so a multirun's job directory names, keep what was typed.

The path-valued keys: ``prompts=file:<path>`` and, per built-in model and reward (``PATH_KEYS``; also in each
``reward.parts`` and ``eval.rewards`` entry), their weight files and folders, a callable reward's
``<file>.py:<name>``, and the checkpoints that may instead be a hub id ``owner/name`` (made absolute only where
``align.core.weights.looks_local`` reads them as a local path, as loading does). A value that is not a string, is
empty or is an interpolation is left as it is, and so are the keys of parts not in the table (a plugin's).
"""
from __future__ import annotations

import os
from typing import Callable

from omegaconf import DictConfig, ListConfig, OmegaConf, read_write

from align.core.weights import looks_local

REWARD_ENTRIES = ("reward.parts", "eval.rewards")      # lists of reward configs, each named by its ``name``


def absolute(path: str) -> str:
    """``path`` (``~`` expanded) as an absolute path, against the working directory."""
    return os.path.abspath(os.path.expanduser(path))


def _local_or_hub(value: str) -> str:
    """A local checkpoint folder made absolute; a hub id ``owner/name`` as it is."""
    return absolute(value) if looks_local(os.path.expanduser(value)) else value


def _target_file(target: str) -> str:
    """``<file>.py:<name>`` with the file absolute; a module's callable (``pkg.module:name``) as it is."""
    where, sep, attr = target.strip().rpartition(":")
    return f"{absolute(where)}:{attr}" if sep and where.endswith(".py") else target


def _prompts_file(spec: str) -> str:
    """``file:<path>`` with the path absolute; a named set (or a ``file:`` without a path) as it is."""
    path = spec[len("file:"):] if spec.startswith("file:") else ""
    return "file:" + absolute(path) if path.strip() else spec


# (group, registered name) -> {dotted key in that section: how its value is made absolute}
PATH_KEYS: dict[tuple[str, str], dict[str, Callable[[str], str]]] = {
    ("model", "digits"): {"weights": absolute, "classifier_weights": absolute},
    ("model", "sd3"): {"pretrained": _local_or_hub, "taesd3_path": _local_or_hub, "features.weights": absolute},
    ("model", "flux"): {"pretrained": _local_or_hub, "taef1_path": _local_or_hub, "features.weights": absolute},
    ("reward", "digits_classifier"): {"weights": absolute},
    ("reward", "digits_correct"): {"weights": absolute},
    ("reward", "hpsv2"): {"weights": absolute},
    ("reward", "aesthetic"): {"clip_weights": absolute, "head_weights": absolute},
    ("reward", "pickscore"): {"model": absolute, "processor": absolute},
    ("reward", "callable"): {"target": _target_file},
}


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the relative paths of its path-valued keys (see the module docstring) made absolute, in place;
    returns ``cfg``."""
    with read_write(cfg):
        _rewrite(cfg, "prompts", _prompts_file)
        for group in ("model", "reward"):
            _rewrite_part(cfg.get(group), group)
        for key in REWARD_ENTRIES:
            entries = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
            for entry in entries if isinstance(entries, ListConfig) else ():
                _rewrite_part(entry, "reward")
    return cfg


def _rewrite_part(node: object, group: str) -> None:
    """The path-valued keys of one model's or reward's section (or reward entry), by its ``name``."""
    if isinstance(node, DictConfig):
        for key, to_absolute in PATH_KEYS.get((group, str(node.get("name"))), {}).items():
            parent, _, last = key.rpartition(".")
            _rewrite(OmegaConf.select(node, parent, default=None) if parent else node, last, to_absolute)


def _rewrite(node: object, key: str, to_absolute: Callable[[str], str]) -> None:
    """``node[key] = to_absolute(node[key])`` for a non-empty string value that is not an interpolation."""
    if not isinstance(node, DictConfig) or key not in node or OmegaConf.is_interpolation(node, key):
        return
    value = node[key]
    if isinstance(value, str) and value.strip():
        node[key] = to_absolute(value)
