"""``python -m align.report <sweep_dir> [--out DIR]``: the comparison table and figures of a sweep.

Reads every run directory under ``sweep_dir`` (a directory with ``config.yaml`` and ``metrics.jsonl``) and
writes into ``--out`` (default ``<sweep_dir>/report``):

* ``table.md``, ``table.csv`` — like the paper's Table 1: per reward, the final evaluation (the last
  ``eval/*`` row of each finished run: reward, diversity, diversity ÷ the run's step-0 diversity, when logged
  the paper's diversity unit (mean pairwise 1 − cos within a prompt, ×10⁻²: ``eval/diversity_cos``), FID) as
  mean ± sample standard deviation (ddof = 1) over seeds; best per column marked (highest reward,
  highest diversity, lowest FID; the Base row, the step-0 evaluation of the
  untouched model, is not a candidate). Unfinished runs (no ``samples_final.pt``) are listed, not averaged.
* ``convergence_<reward>.png/.pdf`` — reward, diversity, FID vs update step, mean ± std band over seeds.
* ``pareto_<reward>.png/.pdf`` — reward vs diversity and reward vs FID, one point per evaluated checkpoint
  (mean over seeds), each method's non-dominated front drawn.
* ``temperature_<algo>_<reward>.png/.pdf`` — reward and FID vs step for each β, when β varies.

Runs are grouped by their config minus ``seed`` (and run bookkeeping: run_dir, resume, threads, ...); a
group is labelled by the algorithm and the config keys that tell groups of one reward apart (β, η, ...).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field

from omegaconf import OmegaConf

# (metrics.jsonl key, column name, better) — the table's columns, in order.
METRICS = (("eval/reward", "reward", "max"), ("eval/diversity", "diversity", "max"),
           ("eval/diversity_rel", "diversity ÷ base", "max"),
           ("eval/diversity_cos", "diversity (1 − cos, ×10⁻²)", "max"), ("eval/fid", "FID", "min"))
# Config keys that do not make runs different experiments.
NOT_GROUPING = ("seed", "run_dir", "resume", "threads", "device", "train.progress", "train.checkpoint_every",
                "train.keep_checkpoints")
FACET_KEYS = ("model.name", "reward.name")
# Config keys added later, and what their absence in an older run's config.yaml means.
ABSENT_MEANS = {"eval.fid_reference": "paired", "model.fid_reference": "paired"}
ALGO_ORDER = ("refl", "draft", "adjoint_matching", "vggflow_pmp", "vggflow")
ALGO_NAMES = {"vggflow": "VGG-Flow", "vggflow_pmp": "VGG-Flow-PMP", "refl": "ReFL", "draft": "DRaFT",
              "adjoint_matching": "Adjoint Matching"}
KEY_NAMES = {"algo.beta": "β", "algo.eta": "η", "algo.subsample_bins": "bins", "train.lr": "lr"}
LABEL_PRIORITY = ("algo.name", "algo.beta", "algo.eta", "algo.subsample_bins")


@dataclass
class RunData:
    path: str
    cfg: dict                    # flattened config (dotted keys)
    evals: list[dict]            # the metrics.jsonl rows with eval/ keys
    finished: bool               # samples_final.pt exists (written last)
    last_step: int
    steps: int                   # train.steps

    @property
    def seed(self):
        return self.cfg.get("seed")


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


# ---- reading ------------------------------------------------------------------------------------------------
def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _num(v) -> float:
    """A metrics.jsonl value as a float (NaN is stored as null, ±inf as a string)."""
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def read_run(path: str) -> RunData:
    cfg = flatten(OmegaConf.to_container(OmegaConf.load(os.path.join(path, "config.yaml")), resolve=False))
    for k, v in ABSENT_MEANS.items():    # runs saved before the key existed had that behaviour
        cfg.setdefault(k, v)
    rows = []
    with open(os.path.join(path, "metrics.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:      # a line cut short by an interrupted run
                    break
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    add_relative_diversity(evals)
    return RunData(path, cfg, evals, os.path.exists(os.path.join(path, "samples_final.pt")),
                   int(rows[-1]["step"]) if rows else 0, int(cfg.get("train.steps", 0) or 0))


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
        if "config.yaml" in files and "metrics.jsonl" in files:
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


# ---- the table ------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    mean: float | None = None
    std: float | None = None
    n: int = 0
    best: bool = False
    note: str = ""               # "unfinished (step k/N)" when no run of the group has finished


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def build_table(groups: list[Group]) -> tuple[list[str], list[str], dict, dict]:
    """Facets, metric columns per facet, and cells[(row label, facet, metric)] (row "Base" included)."""
    facets = sorted({g.facet for g in groups})
    columns = {f: [m for m in METRICS if any(m[0] in row for g in groups if g.facet == f
                                            for r in g.runs for row in r.evals)] for f in facets}
    cells: dict = {}
    for f in facets:
        fg = [g for g in groups if g.facet == f]
        for key, name, better in columns[f]:
            base = base_values(fg, key)
            if base:
                m, s = mean_std(base)
                cells[("Base", f, name)] = Cell(m, s, len(base))
            candidates = []
            for g in fg:
                vals = final_values(g, key)
                if vals:
                    m, s = mean_std(vals)
                    cells[(g.label, f, name)] = c = Cell(m, s, len(vals))
                    candidates.append(c)
                elif g.runs:
                    far = max(g.runs, key=lambda r: r.last_step)
                    note = f"unfinished (step {far.last_step}/{far.steps})" if not g.finished else "–"
                    cells[(g.label, f, name)] = Cell(note=note)
            if candidates:
                best = (max if better == "max" else min)(c.mean for c in candidates)
                for c in candidates:
                    c.best = abs(c.mean - best) <= 1e-12 * max(1.0, abs(best))
    return facets, columns, cells


def _rows(groups: list[Group]) -> list[str]:
    labels = []
    for g in groups:
        if g.label not in labels:
            labels.append(g.label)
    return ["Base"] + labels


def write_table(groups: list[Group], out: str, keys: list[str]) -> tuple[str, str]:
    facets, columns, cells = build_table(groups)
    rows = _rows(groups)
    n_max = {f: max([c.n for (_, ff, _), c in cells.items() if ff == f] or [0]) for f in facets}
    arrow = {"max": "↑", "min": "↓"}
    header = ["Method"] + [f"{f} {name} {arrow[b]}" for f in facets for _, name, b in columns[f]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        out_cells = []
        for f in facets:
            for _, name, _ in columns[f]:
                c = cells.get((row, f, name))
                if c is None:
                    out_cells.append("–")
                elif c.mean is None:
                    out_cells.append(c.note)
                else:
                    text = _fmt(c.mean) + (f" ± {_fmt(c.std)}" if c.std is not None else "")
                    text = f"**{text}**" if c.best else text
                    out_cells.append(text + (f" (n={c.n})" if c.n != n_max[f] else ""))
        if row == "Base" and not any(k[0] == "Base" for k in cells):
            continue
        lines.append("| " + " | ".join([row] + out_cells) + " |")
    notes = ["", f"Final evaluation (the last eval row of each finished run) as mean ± sample standard deviation "
                 f"(ddof = 1) over seeds; n = {', '.join(f'{n_max[f]} ({f})' for f in facets)} unless noted. "
                 "Best per column in bold: highest reward, highest diversity, lowest FID (Base, the step-0 "
                 "evaluation of the untouched model, excluded).",
             f"Rows are told apart by: {', '.join(keys)}."]
    unfinished = [(g, r) for g in groups for r in g.unfinished]
    if unfinished:
        notes.append("")
        notes.append(f"Unfinished runs ({len(unfinished)}), not in the means:")
        notes += [f"- {g.label} / {g.facet}: {r.path} (step {r.last_step} of {r.steps})" for g, r in unfinished]
    md = os.path.join(out, "table.md")
    with open(md, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines + notes) + "\n")

    path = os.path.join(out, "table.csv")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        head = ["method"]
        for f in facets:
            for _, name, _ in columns[f]:
                head += [f"{f}/{name}_mean", f"{f}/{name}_std", f"{f}/{name}_best", f"{f}/{name}_n"]
            head += [f"{f}/unfinished"]
        w.writerow(head)
        for row in rows:
            line = [row]
            for f in facets:
                for _, name, _ in columns[f]:
                    c = cells.get((row, f, name)) or Cell()
                    line += ["" if c.mean is None else repr(c.mean), "" if c.std is None else repr(c.std),
                             int(c.best), c.n]
                line.append(sum(len(g.unfinished) for g in groups if g.label == row and g.facet == f))
            w.writerow(line)
    return md, path


# ---- entry point ----------------------------------------------------------------------------------------------
def report(sweep_dir: str, out: str | None = None) -> dict[str, list[str]]:
    """Write the table and figures; returns {"table": [...], "figures": [...]} (paths)."""
    from align import report_plots as plots

    out = out or os.path.join(sweep_dir, "report")
    runs = discover(sweep_dir, skip=out)
    if not runs:
        raise FileNotFoundError(f"no run directories (config.yaml + metrics.jsonl) under {sweep_dir}")
    groups = group_runs(runs)
    keys = label_keys(groups)
    os.makedirs(out, exist_ok=True)
    written = {"table": list(write_table(groups, out, keys)), "figures": []}
    written["figures"] += plots.convergence_plots(groups, out)
    written["figures"] += plots.pareto_plots(groups, out)
    written["figures"] += plots.temperature_plots(groups, out)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m align.report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=None, help="output directory (default <sweep_dir>/report)")
    a = p.parse_args(argv)
    try:
        written = report(a.sweep_dir, a.out)
    except FileNotFoundError as err:
        print(f"align.report: {err}", file=sys.stderr)
        return 2
    print(f"align.report: {written['table'][0]}\n              {written['table'][1]}\n              "
          f"{len(written['figures'])} figures in {os.path.dirname(written['table'][0])}")
    with open(written["table"][0], encoding="utf-8") as fh:
        print(fh.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
