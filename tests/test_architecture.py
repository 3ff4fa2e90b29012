"""The import rules of ARCHITECTURE.md, read from the source (every import statement, also inside functions), as
folder rules: each package may import itself and the packages its rule lists. Every module is on a rule, and
importing any module (apart from the plugins, which register themselves) changes no global state."""
import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("align", "algorithms", "rewards", "samplers", "experiments")


def _modules() -> dict[str, str]:
    """module name -> file, for every .py file of our packages."""
    out = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Our modules that ``name`` imports (``from a.b import c`` counts as a.b.c when that is a module)."""
    tree = ast.parse(open(MODULES[name], encoding="utf-8").read())
    package = name if MODULES[name].endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


CORE, METRICS, TRAIN, SETUP = "align.core", "align.metrics", "align.train", "align.setup"
CONF, PROMPT_SETS, MODELS = "align.conf", "align.prompt_sets", "align.models"
# A folder (the package and everything under it; the longest matching folder decides) -> what it may import
# besides itself. ARCHITECTURE.md, "Who may import whom", is this table.
FOLDER_RULES = {
    "samplers": (),                                                   # the time convention stands alone
    CONF: (),                                                         # data: the yaml presets
    PROMPT_SETS: (),                                                  # data: the named prompt sets
    CORE: ("samplers", CONF),
    METRICS: (CORE,),
    MODELS: (CORE, METRICS, PROMPT_SETS, "samplers"),                 # never rewards
    "rewards": (CORE, METRICS),                                       # never align.models
    "algorithms.common": (CORE, "samplers"),
    "algorithms": ("algorithms.common", CORE, "samplers"),            # never a model or a reward
    TRAIN: (CORE, METRICS, "samplers"),                               # handed objects (see below)
    SETUP: (CORE, METRICS, TRAIN, CONF, PROMPT_SETS, "samplers"),     # parts by name, through the registries
    "align.report": (CORE,),
    "align.bench": ("align", "algorithms", "rewards", "samplers"),     # the cost benchmark's command, in parts
    "experiments": PACKAGES,                                          # scripts and exact references: anything
}
# The commands (python -m align.<name>) and the top package: anything of the library, nothing of experiments/.
ENTRY_POINTS = ("align", "align.__main__", "align.run", "align.sweep", "align.evaluate", "align.bench", "align.pretrain",
                "align.fetch")
LIBRARY = ("align", "algorithms", "rewards", "samplers")
# Modules that register themselves (a class with the registries) when imported: that is how a part is found.
PLUGINS = ("align.models", "rewards", "algorithms")


def _rule(module: str) -> tuple[str, tuple[str, ...]] | None:
    """(the rule's name, what the module may import besides its own folder), or None if no rule covers it."""
    if module in ENTRY_POINTS:
        return "entry points", LIBRARY
    folders = [f for f in FOLDER_RULES if _in(module, f)]
    if not folders:
        return None
    folder = max(folders, key=len)
    return folder, FOLDER_RULES[folder]


def _allowed(module: str, target: str) -> bool:
    name, allowed = _rule(module)
    own = name if name != "entry points" else module
    return _in(target, own) or any(_in(target, a) for a in allowed)


def test_every_module_is_on_a_rule():
    """A new module (or a folder) has to be placed in the layers: a module at the top of align/ that is not a
    command, or a folder without a rule, fails here."""
    assert not sorted(m for m in MODULES if _rule(m) is None)


@pytest.mark.parametrize("rule", sorted(FOLDER_RULES) + ["entry points"])
def test_each_folder_imports_only_what_its_rule_allows(rule):
    bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if _rule(m) and _rule(m)[0] == rule
                 for t in ts if not _allowed(m, t))
    assert not bad, bad


@pytest.mark.parametrize("a, b", [(MODELS, "rewards"), ("rewards", MODELS)])
def test_models_and_rewards_do_not_import_each_other(a, b):
    bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if _in(m, a) for t in ts if _in(t, b))
    assert not bad, bad


def test_the_loop_is_handed_objects():
    """The loop never looks a part up by name: no registry, no assembly, no algorithm, model or reward module."""
    forbidden = ("align.core.registry", SETUP, "algorithms", MODELS, "rewards")
    bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if _in(m, TRAIN) for t in ts
                 if any(_in(t, f) for f in forbidden))
    assert not bad, bad


def test_the_sweep_and_the_report_do_not_import_the_entry_point():
    """The run-directory rules are align.core.run_dir's."""
    users = [m for m in MODULES if m == "align.sweep" or _in(m, "align.report")]
    assert len(users) > 1 and not [m for m in users if "align.run" in GRAPH[m]]


def test_no_import_cycle():
    """Tarjan's strongly connected components over the module graph: every component is one module."""
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_graph_is_read():
    """Not vacuous: known edges are found, and the rules refuse an edge they do not list."""
    assert "align.train.trainer" in GRAPH["align.setup.assemble"] and "samplers" in GRAPH["align.core.interfaces"]
    assert not _allowed("align.core.schema", "align.setup.build") and not _allowed("rewards.digits", MODELS)
    assert _allowed("align.models.digits", "align.metrics.digits_classifier")


# ---- importing a module changes nothing ----------------------------------------------------------------------
def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(GRAPH[m])
    return seen


def _is_plugin(module: str) -> bool:
    return any(_in(module, p) for p in PLUGINS) and not _in(module, "algorithms.common")


# Plugins register themselves, and so does whatever imports one; every other module must change nothing.
PLAIN = sorted(m for m in MODULES if not m.endswith("__main__") and not any(_is_plugin(c) for c in _closure(m)))
REGISTERING = sorted(m for m in MODULES if not m.endswith("__main__") and m not in PLAIN)

_STATE = r'''
import sys

import hydra, hydra.conf, hydra.core.config_store, matplotlib  # noqa: E401,F401  (Hydra stores its own configs)
from omegaconf.basecontainer import BaseContainer


def state(with_registries):
    """OmegaConf's resolvers, matplotlib's backend (None: not chosen yet), and (with_registries) what the registries
    and Hydra's ConfigStore hold (read without importing anything of ours)."""
    out = {"resolvers": sorted(BaseContainer._resolvers),
           "matplotlib backend": matplotlib.rcParams._get_backend_or_none()}
    if with_registries:
        registry = sys.modules.get("align.core.registry")
        out["registries"] = sorted(f"{r.kind}:{n}" for r in (registry.REGISTRIES if registry else ()) for n in r._entries)
        repo = sys.modules["hydra.core.config_store"].ConfigStore.instance().repo
        out["config store"] = sorted(f"{g}/{n}" for g, v in repo.items() for n in (v if isinstance(v, dict) else [""]))
    return out
'''

_IMPORT_EACH = _STATE + r'''
import importlib, json
plain, registering = json.loads(sys.argv[1])
changed = []
for names, with_registries in ((plain, True), (registering, False)):
    for name in names:
        before = state(with_registries)
        importlib.import_module(name)
        after = state(with_registries)
        if after != before:
            changed.append([name, {k: [before.get(k), after.get(k)] for k in after if after.get(k) != before.get(k)}])
print(json.dumps(changed))
'''


def test_importing_a_module_has_no_side_effect():
    """One fresh interpreter imports every module in turn, the plain ones first: a plain module must leave the
    resolvers, the matplotlib backend, the registries and the config store as they were; a plugin, or a module that
    imports one, registers parts by design, but must register no resolver and choose no backend."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("ALIGN_PLUGINS", None)
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps([PLAIN, REGISTERING])], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    changed = json.loads(done.stdout.strip().splitlines()[-1])
    assert not changed, changed


def test_the_side_effect_check_sees_what_it_looks_for():
    """Not vacuous: the plain modules are most of the library, and a resolver registered on import is caught."""
    assert {"align.core.schema", "align.setup.compose", "align.train.trainer", "algorithms.common.adjoint",
            "align.report.plots", "align.sweep"} <= set(PLAIN)
    assert {"rewards.mix", "algorithms.vggflow", "align.models.gmm", "align.pretrain"} <= set(REGISTERING)
    probe = _STATE + r'''
from omegaconf import OmegaConf
before = state(False)
OmegaConf.register_new_resolver("probe_on_import", lambda: 0)
print(before != state(False))
'''
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stderr[-2000:]
