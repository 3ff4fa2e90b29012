"""``python -m align.report <sweep_dir> [--out DIR]``: the comparison table and figures of a sweep.

Reads every run directory under ``sweep_dir`` (a directory with ``config.yaml`` and ``metrics.jsonl``) and
writes into ``--out`` (default ``<sweep_dir>/report``):

* ``table.md``, ``table.csv`` — like the paper's Table 1, one table per reward: the final evaluation (the last
  ``eval/*`` row of each finished run: reward, diversity, diversity ÷ the run's step-0 diversity, when logged
  the paper's diversity unit (mean pairwise 1 − cos within a prompt, ×10⁻²: ``eval/diversity_cos``), FID) as
  mean ± sample standard deviation (ddof = 1) over seeds, in table.md rounded to the std's precision
  (``3.68 ± 0.06``); best per column marked (highest reward, highest diversity, lowest FID; the Base row, the
  step-0 evaluation of the untouched model, is not a candidate). table.csv has one row per reward and method,
  at full precision. Unfinished runs (no ``samples_final.pt``) are listed, not averaged.
* ``convergence_<reward>.png/.pdf`` — reward, diversity, FID vs update step, mean ± std band over seeds.
* ``pareto_<reward>.png/.pdf`` — reward vs diversity and reward vs FID, one point per evaluated checkpoint
  (mean over seeds), each method's non-dominated front drawn.
* ``temperature_<algo>_<reward>.png/.pdf`` — reward and FID vs step for each β, when β varies.

Runs are grouped by their config minus ``seed`` and the run bookkeeping (``align.run_dir.BOOKKEEPING``); a
group is labelled by the algorithm and the config keys that tell groups of one reward apart (β, η, ...).
"""
from __future__ import annotations

import argparse
import os
import sys

from align import report_plots as plots
from align.report_data import discover, group_runs, label_keys
from align.report_table import write_table


def report(sweep_dir: str, out: str | None = None) -> dict[str, list[str]]:
    """Write the table and figures; returns {"table": [...], "figures": [...]} (paths)."""
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
