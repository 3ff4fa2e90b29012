"""Name → class registries for algorithms, models and rewards.

A new algorithm is one file in ``algorithms/`` decorated with ``@register_algorithm("name")`` plus one
config file ``align/conf/algo/name.yaml``; the packages are imported lazily by name, so nothing else
changes.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, TypeVar

T = TypeVar("T")


class Registry:
    def __init__(self, kind: str, packages: tuple[str, ...]):
        self.kind = kind
        self.packages = packages
        self._entries: dict[str, type] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(cls: T) -> T:
            if name in self._entries and self._entries[name] is not cls:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = cls
            return cls

        return deco

    def _import_all(self) -> None:
        for pkg_name in self.packages:
            pkg = importlib.import_module(pkg_name)
            for mod in pkgutil.iter_modules(pkg.__path__):
                if not mod.name.startswith("_"):
                    importlib.import_module(f"{pkg_name}.{mod.name}")

    def get(self, name: str) -> type:
        if name not in self._entries:
            self._import_all()
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._import_all()
        return sorted(self._entries)


ALGORITHMS = Registry("algorithm", ("algorithms",))
MODELS = Registry("model", ("align.models",))
REWARDS = Registry("reward", ("rewards",))

register_algorithm = ALGORITHMS.register
register_model = MODELS.register
register_reward = REWARDS.register
