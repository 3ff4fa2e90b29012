"""The import rules of ARCHITECTURE.md, read from the source (every import statement, also inside functions)."""
import ast
import os

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


@pytest.mark.parametrize("a, b", [("align.models", "rewards"), ("rewards", "align.models")])
def test_models_and_rewards_do_not_import_each_other(a, b):
    bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if _in(m, a) for t in ts if _in(t, b))
    assert not bad, bad


LOOP = ("align.train.trainer", "align.train.evaluation", "align.train.run_logging", "align.train.trackers", "align.train.checkpoint")
CORE = ("align.core.interfaces", "align.core.batching", "align.core.registry", "align.core.schema", "align.core.weights", "align.core.loading",
        "align.metrics.clip", "align.metrics.features", "align.metrics.dreamsim", "align.metrics.digits_classifier", "align.metrics.paper_metrics", "align.core.run_dir",
        "align.train.sharding", "align.core.params")


@pytest.mark.parametrize("package, forbidden", [
    ("samplers", PACKAGES),                                                    # the time convention stands alone
    ("algorithms", ("align.models", "rewards")),                               # algorithms see only interfaces
    ("align.train.trainer", ("align.core.registry", "align.setup.build", "align.setup.assemble", "align.setup.compose", "algorithms",
                       "align.models", "rewards")),                            # the loop is handed objects
])
def test_layers_import_only_downwards(package, forbidden):
    bad = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() if _in(m, package) for t in ts
                 if any(_in(t, f) for f in forbidden) and not _in(t, package))
    assert not bad, bad


@pytest.mark.parametrize("module", LOOP + CORE)
def test_the_loop_and_the_core_reach_no_entry_point_and_no_assembly(module):
    up = ("align.run", "align.sweep", "align.report", "align.evaluate", "align.bench", "align.setup.assemble",
          "align.setup.build", "align.setup.compose", "align.setup.checks", "experiments")
    assert not [t for t in GRAPH[module] if any(_in(t, u) for u in up)]


def test_the_sweep_and_the_report_do_not_import_the_entry_point():
    for m in ("align.sweep", "align.report"):
        assert "align.run" not in GRAPH[m]


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
    """Not vacuous: known edges are found."""
    assert "align.train.trainer" in GRAPH["align.setup.assemble"] and "samplers" in GRAPH["align.core.interfaces"]
