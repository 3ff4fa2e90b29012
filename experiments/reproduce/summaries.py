"""The stored summaries a results page is generated from: one ``summary.json`` per section (every run of the
section: the config keys that tell its runs apart, its evaluation rows and compute), and ``study.json`` (the
commits the runs ran at, the wall time, the main job's output). The page never reads a run directory: a fresh
clone regenerates it from these files alone (``experiments.reproduce.page``), and a test compares the result with
the committed page.

Runs are rebuilt from a summary as ``align.report.data.RunData``, so the tables, groups and labels are the ones
``align.report`` makes from the run directories themselves."""
from __future__ import annotations

import json
import math
import os

from align.report.data import FACET_KEYS, NOT_GROUPING, RunData, read_run

SUMMARY = "summary.json"
STUDY = "study.json"
# Config keys kept whatever varies: the facet, the label's usual keys, and what the page's settings line states.
ALWAYS = FACET_KEYS + ("algo.name", "seed", "algo.beta", "train.lr", "train.steps", "train.batch_size")
# Evaluation-row keys kept: the evaluation and the cumulative compute at it.
ROW_PREFIXES = ("eval/", "compute/velocity", "compute/reward_grad")
DROP_ROW_KEYS = ("eval/reward_std", "eval/reward_nonfinite")


def _clean(v):
    """A metrics value as JSON keeps it: non-finite floats as None (as metrics.jsonl stores NaN)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def summarise_runs(dirs: list[str], runs_root: str) -> dict:
    """The summary of one section: its run directories (relative to ``runs_root``), in the order given."""
    runs = [read_run(d) for d in dirs]
    keys = sorted({k for r in runs for k in r.cfg} - set(NOT_GROUPING))
    varying = [k for k in keys if len({json.dumps(r.cfg.get(k), sort_keys=True) for r in runs}) > 1]
    kept = sorted(set(varying) | set(ALWAYS))
    out = []
    for r in runs:
        rows = [{k: _clean(v) for k, v in row.items()
                 if k == "step" or (k.startswith(ROW_PREFIXES) and k not in DROP_ROW_KEYS)} for row in r.evals]
        out.append({"dir": os.path.relpath(r.path, runs_root), "cfg": {k: r.cfg[k] for k in kept if k in r.cfg},
                    "finished": r.finished, "last_step": r.last_step, "steps": r.steps,
                    "first_step": r.first_step, "evals": rows})
    return {"runs": out}


def runs_of(summary: dict) -> list[RunData]:
    """The summary's runs as ``RunData`` (path: the run directory relative to the study's runs)."""
    return [RunData(r["dir"], dict(r["cfg"]), [dict(e) for e in r["evals"]], r["finished"], r["last_step"],
                    r["steps"], r["first_step"]) for r in summary["runs"]]


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
