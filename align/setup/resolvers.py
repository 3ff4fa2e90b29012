"""The config resolvers the runner's yaml uses, registered explicitly (``register_resolvers``) by whoever composes
a config: ``${align_paper:<setting>}`` (β, α, lr per model × reward × algorithm, align/setup/paper_settings.py)
and ``${align_run_dir:...}`` (the default run directory, align/conf/config.yaml)."""
from __future__ import annotations

from datetime import datetime

from omegaconf import OmegaConf

from align.setup import paper_settings

RUN_DIR = "align_run_dir"


def default_run_dir(resume, algo, model, reward, seed) -> str:
    if resume not in (None, "None", "null", ""):
        return str(resume)
    return f"runs/{datetime.now():%Y%m%d-%H%M%S}_{algo}_{model}_{reward}_s{seed}"


def register_resolvers() -> None:
    """Register both resolvers with OmegaConf (once; later calls do nothing)."""
    for name, fn in ((paper_settings.RESOLVER, paper_settings.resolve), (RUN_DIR, default_run_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
