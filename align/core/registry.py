"""Name → class registries for algorithms, models and rewards, and their typed configs.

``@register_algorithm("name", config=NameConfig)`` (``register_model``, ``register_reward`` alike) registers the
class and stores its config dataclass with Hydra's ConfigStore as ``algo/name_schema``, which a preset
``align/conf/algo/name.yaml`` may extend (``defaults: [name_schema, _self_]``, for values that are
interpolations); without a preset the dataclass is stored as ``algo/name`` too, so a new algorithm is one file.
The packages are imported lazily by name, and so are plugin modules from outside the source tree:
``ALIGN_PLUGINS=module[,module...]`` (importable, e.g. through ``PYTHONPATH``). Composing the runner's config
needs every typed config stored first: ``register_all()``, through ``align.setup.registration.prepare_compose``
(``align.setup.compose.compose_config`` and the command line call it).
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from typing import Callable, TypeVar

from hydra.core.config_store import ConfigStore

from align.conf import CONF_DIR

T = TypeVar("T")
SCHEMA_SUFFIX = "_schema"
PLUGINS_ENV = "ALIGN_PLUGINS"


class Registry:
    def __init__(self, kind: str, group: str, packages: tuple[str, ...]):
        self.kind, self.group, self.packages = kind, group, packages
        self._entries: dict[str, type] = {}
        self._configs: dict[str, type] = {}

    def register(self, name: str, config: type | None = None) -> Callable[[T], T]:
        """Register a class under ``name``; ``config``: its config dataclass (see the module docstring)."""
        def deco(cls: T) -> T:
            if name in self._entries and self._entries[name] is not cls:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = cls
            if "name" not in vars(cls):        # the registered name is the part's name (logs, messages)
                cls.name = name
            if config is not None:
                self._configs[name] = config
                cls.config_class = config
                store = ConfigStore.instance().store
                store(group=self.group, name=name + SCHEMA_SUFFIX, node=config)
                if not os.path.isfile(os.path.join(CONF_DIR, self.group, f"{name}.yaml")):
                    store(group=self.group, name=name, node=config)
            return cls

        return deco

    def _import_all(self) -> None:
        for pkg_name in self.packages:
            pkg = importlib.import_module(pkg_name)
            for mod in pkgutil.iter_modules(pkg.__path__):
                if not mod.name.startswith("_"):
                    importlib.import_module(f"{pkg_name}.{mod.name}")
        import_plugins()

    def get(self, name: str) -> type:
        if name not in self._entries:
            self._import_all()
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}")
        return self._entries[name]

    def config(self, name: str) -> type | None:
        """The config dataclass registered with ``name`` (None: the class has none)."""
        self.get(name)
        return self._configs.get(name)

    def names(self) -> list[str]:
        self._import_all()
        return sorted(self._entries)

    def __len__(self) -> int:
        """How many classes are registered so far (without importing the packages)."""
        return len(self._entries)


def import_plugins() -> None:
    """Import the modules named in ``$ALIGN_PLUGINS`` (comma-separated); they register themselves."""
    for mod in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        importlib.import_module(mod)


ALGORITHMS = Registry("algorithm", "algo", ("algorithms",))
MODELS = Registry("model", "model", ("align.models",))
REWARDS = Registry("reward", "reward", ("rewards",))
REGISTRIES = (ALGORITHMS, MODELS, REWARDS)

register_algorithm = ALGORITHMS.register
register_model = MODELS.register
register_reward = REWARDS.register


def register_all() -> None:
    """Import every algorithm, model, reward and plugin module, so that ConfigStore holds all their typed configs
    (call before composing a config)."""
    for registry in REGISTRIES:
        registry._import_all()
