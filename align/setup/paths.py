"""The relative filesystem paths of a run's config made absolute, against the working directory it was composed
in, so that the saved config.yaml names the same files from anywhere: ``resume=<run_dir>`` and
``align.evaluate <run_dir>`` work from any directory. A re-run from the same directory with the same relative
path composes the same absolute path, so it is still the same config as the saved one (``align.core.run_dir``'s
comparison, a sweep's plan).

The path-valued keys: ``prompts=file:<path>``, ``reward.target=<file>.py:<name>`` (reward=callable), the weight
files and folders of the model (``model.weights``, ``model.classifier_weights``, ``model.features.weights``) and of
the reward (``reward.weights``, ``reward.clip_weights``, ``reward.head_weights``, ``reward.model``,
``reward.processor``), the reward's also in each ``reward.parts`` and ``eval.rewards`` entry, and the model's
checkpoints that may instead be a hub id (``model.pretrained``, ``model.taesd3_path``, ``model.taef1_path``: made
absolute only where ``align.core.weights.looks_local`` reads them as a local path, as loading does). A value that is
not a string (gmm's ``model.weights`` are mixture weights) or is an interpolation is left as it is.
"""
from __future__ import annotations

import os
from typing import Callable

from omegaconf import DictConfig, ListConfig, OmegaConf, read_write

from align.core.weights import looks_local

FILE_KEYS = {"model": ("weights", "classifier_weights"),
             "reward": ("weights", "clip_weights", "head_weights", "model", "processor")}
HUB_OR_LOCAL_KEYS = {"model": ("pretrained", "taesd3_path", "taef1_path")}
REWARD_ENTRIES = ("reward.parts", "eval.rewards")      # lists of reward configs, each with the reward's keys


def absolute(path: str) -> str:
    """``path`` (``~`` expanded) as an absolute path, against the working directory."""
    return os.path.abspath(os.path.expanduser(path))


def absolute_paths(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the relative paths of its path-valued keys (see the module docstring) made absolute, in place;
    returns ``cfg``."""
    with read_write(cfg):
        _rewrite(cfg, "prompts", _prompts_file)
        _rewrite_part(cfg.get("model"), "model")
        _rewrite_part(cfg.get("reward"), "reward")
        for key in REWARD_ENTRIES:
            entries = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
            for entry in entries if isinstance(entries, ListConfig) else ():
                _rewrite_part(entry, "reward")
    return cfg


def _rewrite_part(node: object, group: str) -> None:
    """The path-valued keys of one model's or reward's config section (or reward entry)."""
    if not isinstance(node, DictConfig):
        return
    for key in FILE_KEYS[group]:
        _rewrite(node, key, absolute)
    for key in HUB_OR_LOCAL_KEYS.get(group, ()):
        _rewrite(node, key, _local_or_hub)
    if group == "reward":
        _rewrite(node, "target", _target_file)
    else:
        _rewrite(node.get("features"), "weights", absolute)   # the diversity/FID features' weights


def _rewrite(node: object, key: str, to_absolute: Callable[[str], str]) -> None:
    """``node[key] = to_absolute(node[key])`` for a non-empty string value that is not an interpolation."""
    if not isinstance(node, DictConfig) or key not in node or OmegaConf.is_interpolation(node, key):
        return
    value = node[key]
    if isinstance(value, str) and value.strip():
        node[key] = to_absolute(value)


def _prompts_file(spec: str) -> str:
    """``file:<path>`` with the path absolute; a named set (or a ``file:`` without a path) as it is."""
    path = spec[len("file:"):] if spec.startswith("file:") else ""
    return "file:" + absolute(path) if path.strip() else spec


def _target_file(target: str) -> str:
    """``<file>.py:<name>`` with the file absolute; a module's callable (``pkg.module:name``) as it is."""
    where, sep, attr = target.strip().rpartition(":")
    return f"{absolute(where)}:{attr}" if sep and where.endswith(".py") else target


def _local_or_hub(value: str) -> str:
    """A local checkpoint folder made absolute; a hub id ``owner/name`` as it is."""
    return absolute(value) if looks_local(os.path.expanduser(value)) else value
