"""What composing the runner's config needs registered first, done explicitly by whoever composes
(``prepare_compose``): the typed configs in Hydra's ConfigStore, and the resolvers the yaml uses,
``${align_paper:<setting>}`` (β, α, lr per model × reward × algorithm, align/setup/paper_settings.py) and
``${align_run_dir:...}`` (the default run directory, align/conf/config.yaml)."""
from __future__ import annotations

from datetime import datetime

from omegaconf import OmegaConf

from align.core.schema import store_schemas
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


def prepare_compose() -> None:
    """Everything a compose of the runner's config needs: every typed config stored (this imports every algorithm,
    model, reward and plugin module) and the resolvers registered."""
    store_schemas()
    register_resolvers()
