"""The data of ``align.report``: the run directories of a sweep, grouped into experiments (one per config
minus the seed and the run bookkeeping, ``align.core.run_dir.BOOKKEEPING``), and their statistics over seeds.

Columns: the fixed ``METRICS``, then the held-out rewards a sweep logged (``eval/heldout/<name>``, evaluation-only
rewards, and ``eval/reward/<part>``, the unweighted parts of a mix reward; higher is better), then the compute a
run spent (``COMPUTE``: cumulative from step 0, align/train/compute.py; only runs whose every row from step 0 carries
it, so an old run, one resumed from a checkpoint older than compute accounting, or one whose metrics.jsonl lost its
first rows, is left out of these, each with its reason: ``RunData.why_no_compute``). A run is finished as
``align.core.run_dir.is_finished`` says (samples_final.pt, and the evaluation row or checkpoint of train.steps)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from align.core.run_dir import (CONFIG_FILE, METRICS_FILE, flat_config, is_finished, keys_with, read_config,
                                 read_metrics)

# (metrics.jsonl key, column name, better) — the table's columns, in order.
METRICS = (("eval/reward", "reward", "max"), ("eval/diversity", "diversity", "max"),
           ("eval/diversity_rel", "diversity ÷ base", "max"),
           ("eval/diversity_cos", "diversity (1 − cos, ×10⁻²)", "max"), ("eval/fid", "FID", "min"))
HELDOUT_PREFIXES = (("eval/heldout/", "held-out: "), ("eval/reward/", "reward part: "))
# (key, column name, None: a cost, never marked best) — compute/velocity is the x-axis of the vs-compute figures.
COMPUTE = (("compute/velocity", "velocity evals", None), ("compute/reward_grad", "reward-grad evals", None))
COMPUTE_X = "compute/velocity"
# Config keys that do not make runs different experiments.
NOT_GROUPING = keys_with("group")
FACET_KEYS = ("model.name", "reward.name")
ALGO_ORDER = ("flow_grpo", "diffusion_nft", "refl", "draft", "adjoint_matching", "vggflow_pmp", "vggflow",
              "vggflow_authors")
ALGO_NAMES = {"vggflow": "VGG-Flow", "vggflow_pmp": "VGG-Flow-PMP", "refl": "ReFL", "draft": "DRaFT",
              "adjoint_matching": "Adjoint Matching", "flow_grpo": "Flow-GRPO", "diffusion_nft": "DiffusionNFT",
              "vggflow_authors": "VGG-Flow (authors' code)"}
KEY_NAMES = {"algo.beta": "β", "algo.eta": "η", "algo.subsample_bins": "bins", "train.lr": "lr"}
LABEL_PRIORITY = ("algo.name", "algo.beta", "algo.eta", "algo.subsample_bins")


@dataclass
class RunData:
    path: str
    cfg: dict                    # flattened config (dotted keys)
    evals: list[dict]            # the metrics.jsonl rows with eval/ keys
    finished: bool               # align.core.run_dir.is_finished: samples_final.pt, and train.steps reached
    last_step: int
    steps: int                   # train.steps
    first_step: int | None = None    # the first metrics.jsonl row's step (None: no rows)

    @property
    def seed(self):
        return self.cfg.get("seed")

    @property
    def has_compute(self) -> bool:
        """Every evaluation row, from the step-0 one on, carries the cumulative compute (``COMPUTE_X``)."""
        return bool(self.evals) and self.evals[0].get("step") == 0 and all(COMPUTE_X in r for r in self.evals)

    def why_no_compute(self) -> str:
        """Why the run has no compute accounting from step 0 ("" if it has): its metrics.jsonl lost the rows
        before some step, it logged no ``compute/`` keys, or it logged them only from a resume on."""
        if self.has_compute:
            return ""
        if self.first_step is None or self.first_step > 0:
            start = "has no rows" if self.first_step is None else f"starts at step {self.first_step}"
            return (f"its {METRICS_FILE} {start}: the rows before were deleted or cut off (a resume writes only "
                    "the steps after its checkpoint)")
        counted = [int(r["step"]) for r in self.evals if COMPUTE_X in r]
        if not counted:
            return "its rows have no compute/ keys (written before compute accounting)"
        return (f"its compute/ counts start at step {counted[0]} (resumed from a checkpoint written before compute "
                "accounting)")


@dataclass
class Group:
    cfg: dict                    # the shared config (NOT_GROUPING keys removed)
    facet: str
    runs: list[RunData] = field(default_factory=list)
    label: str = ""
    sort_key: tuple = ()

    @property
    def finished(self) -> list[RunData]:
        return [r for r in self.runs if r.finished]

    @property
    def unfinished(self) -> list[RunData]:
        return [r for r in self.runs if not r.finished]

    def curve_runs(self) -> tuple[list[RunData], bool]:
        """The runs the curves average: the finished ones, or (flagged) all of them if none has finished."""
        return (self.finished, False) if self.finished else (self.runs, True)

    def compute_runs(self) -> tuple[list[RunData], bool]:
        """``curve_runs`` restricted to the runs with compute accounting (``RunData.has_compute``)."""
        runs, unfinished = self.curve_runs()
        return [r for r in runs if r.has_compute], unfinished


# ---- reading ------------------------------------------------------------------------------------------------
def _num(v) -> float:
    """A metrics.jsonl value as a float (NaN is stored as null, ±inf as a string)."""
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def read_run(path: str) -> RunData:
    """One run directory: its config (flattened), evaluation rows and progress."""
    cfg = flat_config(read_config(path, resolve=False))
    rows = read_metrics(path)
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    add_relative_diversity(evals)
    return RunData(path, cfg, evals, is_finished(path, rows), int(rows[-1]["step"]) if rows else 0,
                   int(cfg.get("train.steps", 0) or 0), int(rows[0]["step"]) if rows else None)


def add_relative_diversity(evals: list[dict]) -> None:
    """``eval/diversity_rel`` = diversity / the run's step-0 diversity (the untouched model on the same
    evaluation noise and prompts: every backend starts at the base, e.g. LoRA B = 0). Removes the
    seed-to-seed spread of the evaluation set, which dominates the absolute diversity's ± on small domains."""
    start = [r for r in evals if r.get("step") == 0 and "eval/diversity" in r]
    base = _num(start[0]["eval/diversity"]) if start else math.nan
    if not (math.isfinite(base) and base > 0):
        return
    for r in evals:
        if "eval/diversity" in r and "eval/diversity_rel" not in r:
            r["eval/diversity_rel"] = _num(r["eval/diversity"]) / base


def discover(sweep_dir: str, skip: str | None = None) -> list[RunData]:
    """Every run directory (config.yaml + metrics.jsonl) under ``sweep_dir``, sorted by path."""
    runs = []
    for root, dirs, files in os.walk(sweep_dir):
        if skip and os.path.abspath(root) == os.path.abspath(skip):
            dirs[:] = []
            continue
        if CONFIG_FILE in files and METRICS_FILE in files:
            runs.append(read_run(root))
            dirs[:] = []
        dirs.sort()
    return sorted(runs, key=lambda r: r.path)


# ---- grouping and labels ------------------------------------------------------------------------------------
def _hashable(v):
    return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _sortable(v):
    return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))


def group_runs(runs: list[RunData]) -> list[Group]:
    """Group runs by config minus NOT_GROUPING; facet = reward (prefixed by the model if several)."""
    models = {r.cfg.get("model.name") for r in runs}
    groups: dict = {}
    for r in runs:
        cfg = {k: v for k, v in r.cfg.items() if k not in NOT_GROUPING}
        key = tuple(sorted((k, _hashable(v)) for k, v in cfg.items()))
        if key not in groups:
            facet = str(cfg.get("reward.name", "?"))
            if len(models) > 1:
                facet = f"{cfg.get('model.name')}/{facet}"
            groups[key] = Group(cfg, facet)
        groups[key].runs.append(r)
    out = list(groups.values())
    label_groups(out)
    return sorted(out, key=lambda g: g.sort_key)


def label_keys(groups: list[Group]) -> list[str]:
    """algo.name, then (greedily, in LABEL_PRIORITY then alphabetical order) each key that still tells apart
    two groups of the same facet that agree on the keys chosen so far."""
    keys = sorted({k for g in groups for k in g.cfg} - set(FACET_KEYS))
    varying = [k for k in keys if len({_hashable(g.cfg.get(k)) for g in groups}) > 1]
    order = [k for k in LABEL_PRIORITY if k in varying] + \
            sorted((k for k in varying if k not in LABEL_PRIORITY), key=lambda k: (not k.startswith("algo."), k))
    chosen = ["algo.name"]
    for k in order:
        if k in chosen:
            continue
        seen: dict = {}
        for g in groups:
            ident = (g.facet, tuple(_hashable(g.cfg.get(c)) for c in chosen))
            seen.setdefault(ident, set()).add(_hashable(g.cfg.get(k)))
        if any(len(v) > 1 for v in seen.values()):
            chosen.append(k)
    return chosen


def label_groups(groups: list[Group]) -> list[str]:
    keys = label_keys(groups)
    short = {k: KEY_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in keys}
    if len(set(short.values())) < len(short):
        short = {k: KEY_NAMES.get(k, k) for k in keys}
    for g in groups:
        algo = str(g.cfg.get("algo.name", "?"))
        parts = [ALGO_NAMES.get(algo, algo)]
        parts += [f"{short[k]}={_fmt_value(g.cfg[k])}" for k in keys[1:] if k in g.cfg]
        g.label = ", ".join(parts)
        rank = ALGO_ORDER.index(algo) if algo in ALGO_ORDER else len(ALGO_ORDER)
        g.sort_key = (rank, algo, tuple(_sortable(g.cfg.get(k)) for k in keys[1:]), g.facet)
    return keys


# ---- statistics -----------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def final_values(group: Group, key: str) -> list[float]:
    """The metric of each finished run's last evaluation row (non-finite values dropped)."""
    vals = []
    for r in group.finished:
        rows = [row for row in r.evals if key in row]
        if rows and math.isfinite(_num(rows[-1][key])):
            vals.append(_num(rows[-1][key]))
    return vals


def heldout_metrics(groups: list[Group]) -> list[tuple[str, str, str]]:
    """(key, column name, "max") of every held-out reward and mix part the runs logged: the held-out ones first,
    each kind sorted by name (``_std`` companions are not columns)."""
    logged = {k for g in groups for r in g.runs for row in r.evals for k in row}
    out = []
    for prefix, title in HELDOUT_PREFIXES:
        names = sorted(k[len(prefix):] for k in logged if k.startswith(prefix) and not k.endswith("_std"))
        out += [(prefix + n, title + n, "max") for n in names if n]
    return out


def table_metrics(groups: list[Group]) -> list[tuple[str, str, str]]:
    """The outcome columns of these groups, in order: ``METRICS`` logged by any run, then ``heldout_metrics``."""
    logged = {k for g in groups for r in g.runs for row in r.evals for k in row}
    return [m for m in METRICS if m[0] in logged] + heldout_metrics(groups)


def compute_values(group: Group, key: str) -> list[float]:
    """``final_values`` over the finished runs with compute accounting."""
    return final_values(Group(group.cfg, group.facet, [r for r in group.runs if r.has_compute]), key)


def base_values(groups: list[Group], key: str) -> list[float]:
    """Step-0 evaluations (the untouched model): one value per seed, averaged over that seed's runs."""
    per_seed: dict = {}
    for g in groups:
        for r in g.runs:
            rows = [row for row in r.evals if row.get("step") == 0 and key in row]
            if rows and math.isfinite(_num(rows[0][key])):
                per_seed.setdefault(r.seed, []).append(_num(rows[0][key]))
    return [sum(v) / len(v) for _, v in sorted(per_seed.items(), key=lambda kv: str(kv[0]))]


def curve(runs: list[RunData], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and std (ddof = 1, 0 for one run) over the runs that evaluated ``key`` at each step."""
    at: dict = {}
    for r in runs:
        for row in r.evals:
            if key in row and math.isfinite(_num(row[key])):
                at.setdefault(int(row["step"]), []).append(_num(row[key]))
    steps = sorted(at)
    ms = [mean_std(at[s]) for s in steps]
    return steps, [m for m, _ in ms], [s or 0.0 for _, s in ms]


def compute_curve(runs: list[RunData], key: str, x_key: str = COMPUTE_X
                  ) -> tuple[list[float], list[float], list[float]]:
    """``curve`` against compute: at each evaluated step, x = the mean over the runs of ``x_key`` (cumulative
    velocity evaluations) and the mean and std of ``key`` over the same runs (those with both in the row)."""
    at: dict = {}
    for r in runs:
        for row in r.evals:
            if key in row and x_key in row and math.isfinite(_num(row[key])) and math.isfinite(_num(row[x_key])):
                at.setdefault(int(row["step"]), []).append((_num(row[x_key]), _num(row[key])))
    xs, means, stds = [], [], []
    for s in sorted(at):
        xs.append(sum(x for x, _ in at[s]) / len(at[s]))
        m, sd = mean_std([y for _, y in at[s]])
        means.append(m)
        stds.append(sd or 0.0)
    return xs, means, stds
