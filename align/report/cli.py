"""``python -m align.report <sweep_dir> [--out DIR]``: the comparison table and figures of a sweep.

Reads every run directory under ``sweep_dir`` (a directory with ``config.yaml`` and ``metrics.jsonl``) and
writes into ``--out`` (default ``<sweep_dir>/report``):

* ``table.md``, ``table.csv`` — like the paper's Table 1, one table per reward: the final evaluation (the last
  ``eval/*`` row of each finished run: reward, diversity, diversity ÷ the run's step-0 diversity, when logged
  the paper's diversity unit (mean pairwise 1 − cos within a prompt, ×10⁻²: ``eval/diversity_cos``), FID) as
  mean ± sample standard deviation (ddof = 1) over seeds, in table.md rounded to the std's precision
  (``3.68 ± 0.06``); best per column marked (highest reward, highest diversity, lowest FID; the Base row, the
  step-0 evaluation of the untouched model, is not a candidate). table.csv has one row per reward and method,
  at full precision. Unfinished runs are listed, not averaged (finished: ``samples_final.pt``, and the
  evaluation row or checkpoint of train.steps, ``align.core.run_dir.is_finished``). Held-out rewards, when
  logged, are columns too (``held-out: <name>`` from ``eval/heldout/<name>``, an evaluation-only reward;
  ``reward part: <part>`` from ``eval/reward/<part>``, a part of a mix reward; higher is better, best in bold).
  Compute columns (runs that logged ``compute/`` from step 0): the cumulative velocity evaluations
  (``compute/velocity``: rows of v_θ and of v_base outside v_θ; a CFG-combined velocity is one row although the
  network sees two) and reward-gradient evaluations at the final row, mean ± std over seeds. Runs without them
  from step 0 (older runs, or a metrics.jsonl that lost its first rows) still report, without those columns and
  figures; the table and the output say so, and why for each run.
* ``convergence_<reward>.png/.pdf`` — reward, diversity, FID vs update step, mean ± std band over seeds;
  ``convergence_<reward>_vs_compute.png/.pdf`` — the same against cumulative velocity evaluations (x: their mean
  over seeds at each evaluated step), so methods of very different per-update cost compare at equal compute.
* ``pareto_<reward>.png/.pdf`` — reward vs diversity and reward vs FID, one point per evaluated checkpoint
  (mean over seeds), each method's non-dominated front drawn; ``pareto_heldout_<reward>`` — the trained reward
  vs each held-out reward and mix part.
* ``heldout_<reward>.png/.pdf`` (and ``_vs_compute``) — the trained reward beside each held-out reward and mix
  part: reward hacking shows as a trained reward that rises while a held-out one falls.
* ``temperature_<algo>_<reward>.png/.pdf`` — reward and FID vs step for each β, when β varies.

Runs are grouped by their config minus ``seed`` and the run bookkeeping (``align.core.run_dir.BOOKKEEPING``); a
group is labelled by the algorithm and the config keys that tell groups of one reward apart (β, η, ...).
"""
from __future__ import annotations

import argparse
import os
import sys

from align.report import plots
from align.report.data import discover, group_runs, label_keys
from align.report.tables import no_compute_note, write_table


def report(sweep_dir: str, out: str | None = None) -> dict[str, list[str]]:
    """Write the table and figures; returns {"table": [...], "figures": [...]} (paths) and "notes" (why the
    compute columns and figures are missing, if they are)."""
    out = out or os.path.join(sweep_dir, "report")
    runs = discover(sweep_dir, skip=out)
    if not runs:
        raise FileNotFoundError(f"no run directories (config.yaml + metrics.jsonl) under {sweep_dir}")
    groups = group_runs(runs)
    keys = label_keys(groups)
    os.makedirs(out, exist_ok=True)
    written = {"table": list(write_table(groups, out, keys)), "figures": [],
               "notes": [] if any(r.has_compute for r in runs) else [no_compute_note(runs)]}
    written["figures"] += plots.convergence_plots(groups, out)
    written["figures"] += plots.pareto_plots(groups, out)
    written["figures"] += plots.heldout_plots(groups, out)
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
    for note in written["notes"]:
        print(f"align.report: {note}")
    with open(written["table"][0], encoding="utf-8") as fh:
        print(fh.read())
    return 0

