"""Compose the runner's config from overrides in Python (tests, benchmarks, notebooks)."""
from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from align.setup.overrides import check_command
from align.setup.paths import absolute_paths
from align.conf import CONF_DIR


def compose_config(overrides: list[str] | None = None, run_dir: str | None = None,
                   training: bool = True) -> DictConfig:
    """The config ``python -m align.run <overrides>`` would use (model defaults to the reward's domain;
    β, α and lr not given are the paper's for the model × reward × algorithm, ``align/setup/paper_settings.py``;
    ``align.setup.paper_settings.describe(cfg)`` is the line the runner prints about them), composed once and
    checked (``training=False``: as for evaluation, no algorithm runs); relative paths made absolute
    (``align.setup.paths``)."""
    overrides, checked = check_command(list(overrides or []), CONF_DIR, training)   # also registers what compose needs
    if len(checked) == 1:
        cfg = checked[0].cfg
    else:           # resume=, or a sweep's overrides (which compose refuses, as Hydra does)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = absolute_paths(compose(config_name="config", overrides=overrides))
        GlobalHydra.instance().clear()
    if run_dir is not None:
        with open_dict(cfg):
            cfg.run_dir = run_dir
    return cfg
