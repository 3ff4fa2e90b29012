"""The tables of ``align.report``: one per reward, the final evaluation of each method as mean ± std over seeds,
written as ``table.md`` (one Markdown table per reward) and ``table.csv`` (one row per reward and method)."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field

from align.report.data import (COMPUTE, Group, RunData, base_values, compute_values, final_values, mean_std,
                               table_metrics)


@dataclass
class Cell:
    mean: float | None = None
    std: float | None = None
    n: int = 0
    best: bool = False
    note: str = ""               # "unfinished (step k/N)" when no run of the group has finished


@dataclass
class Table:
    """One reward's table: Base (the step-0 evaluation, when logged) and one row per method."""
    facet: str
    columns: list[tuple[str, str, str | None]]    # the outcome columns this reward's runs logged, then COMPUTE
    rows: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)   # (row, column name) -> cell
    unfinished: dict[str, int] = field(default_factory=dict)          # row -> runs left out of the means

    @property
    def n(self) -> int:
        """The usual number of seeds per cell (cells with fewer say so)."""
        return max([c.n for c in self.cells.values()] or [0])


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _fixed(x: float, places: int) -> str:
    text = f"{x:.{places}f}" if places >= 0 else f"{round(x, places):.0f}"
    return text.lstrip("-") if float(text) == 0 else text


def format_mean_std(mean: float, std: float | None) -> str:
    """``mean ± std``, the std to one significant digit (two if it starts with 1) and the mean to the same
    decimal place: (3.678, 0.05539) → ``3.68 ± 0.06``. Without a std (one run) the mean to 4 digits."""
    if std is None:
        return _fmt(mean)
    if not (math.isfinite(std) and std > 0):
        return f"{_fmt(mean)} ± {_fmt(std)}"
    digits = 2 if f"{std:e}".startswith("1") else 1
    exponent = int(f"{std:.{digits - 1}e}".split("e")[1])   # after rounding: 0.096 → 0.1, not 0.10
    places = digits - 1 - exponent
    return f"{_fixed(mean, places)} ± {_fixed(std, places)}"


def format_count(mean: float, std: float | None) -> str:
    """A count's ``mean ± std`` as ``format_mean_std``, but a count without spread as the integer (``21120``)."""
    if std is None or std == 0:
        return f"{mean:.0f}" + ("" if std is None else " ± 0")
    return format_mean_std(mean, std)


def build_table(groups: list[Group], facet: str) -> Table:
    """The table of one facet (a reward, prefixed by the model if a sweep has several): the outcome columns
    (``table_metrics``), then, when any run has compute accounting, the ``COMPUTE`` columns (the final row's
    cumulative counts; no Base value, never marked best)."""
    fg = [g for g in groups if g.facet == facet]
    columns = table_metrics(fg)
    if any(r.has_compute for g in fg for r in g.runs):
        columns += list(COMPUTE)
    table = Table(facet, columns)
    for key, name, better in columns:
        base = base_values(fg, key) if better is not None else []
        if base:
            table.cells[("Base", name)] = Cell(*mean_std(base), len(base))
        candidates = []
        for g in fg:
            vals = final_values(g, key) if better is not None else compute_values(g, key)
            if vals:
                table.cells[(g.label, name)] = c = Cell(*mean_std(vals), len(vals))
                candidates.append(c)
            elif g.runs:
                far = max(g.runs, key=lambda r: r.last_step)
                note = f"unfinished (step {far.last_step}/{far.steps})" if not g.finished else "–"
                table.cells[(g.label, name)] = Cell(note=note)
        if candidates and better is not None:
            best = (max if better == "max" else min)(c.mean for c in candidates)
            for c in candidates:
                c.best = abs(c.mean - best) <= 1e-12 * max(1.0, abs(best))
    has_base = any(row == "Base" for row, _ in table.cells)
    table.rows = (["Base"] if has_base else []) + [g.label for g in fg]
    table.unfinished = {g.label: len(g.unfinished) for g in fg}
    return table


def markdown_table(table: Table, heading: bool = True) -> list[str]:
    """The table as Markdown lines (after a ``## <reward>`` heading unless ``heading`` is False)."""
    arrow = {"max": " ↑", "min": " ↓", None: ""}
    header = ["Method"] + [f"{name}{arrow[better]}" for _, name, better in table.columns]
    lines = ([f"## {table.facet}", ""] if heading else []) + ["| " + " | ".join(header) + " |",
                                                              "|" + "---|" * len(header)]
    for row in table.rows:
        texts = []
        for _, name, better in table.columns:
            c = table.cells.get((row, name))
            if c is None:
                texts.append("–")
            elif c.mean is None:
                texts.append(c.note)
            else:
                text = (format_count if better is None else format_mean_std)(c.mean, c.std)
                text = f"**{text}**" if c.best else text
                texts.append(text + (f" (n={c.n})" if c.n != table.n else ""))
        lines.append("| " + " | ".join([row] + texts) + " |")
    return lines + [""]


COMPUTE_CAPTION = (
    "Compute: cumulative over training from step 0 to the final row, summed over processes, mean ± std over "
    "seeds. velocity evals: rows of v_θ (without and with grad) and of v_base outside v_θ; under classifier-free "
    "guidance a CFG-combined velocity is one row although the network sees two (conditional and unconditional). "
    "reward-grad evals: rows of ∇r. The periodic evaluation, the final samples and the scoring of r(x_1) for "
    "the log are not counted (align/train/compute.py).")


def compute_notes(groups: list[Group]) -> list[str]:
    """The compute columns' caption, or why there are none; the runs left out of them, each with its reason."""
    runs = [r for g in groups for r in g.runs]
    missing = [r for r in runs if not r.has_compute]
    if not missing:
        return [COMPUTE_CAPTION]
    if len(missing) == len(runs):
        return [no_compute_note(runs)] + _missing_compute(missing)
    return [COMPUTE_CAPTION, "", f"Runs without compute accounting from step 0 ({len(missing)}), not in the compute "
            "columns and vs-compute figures:"] + _missing_compute(missing)


def no_compute_note(runs: list[RunData]) -> str:
    """Why there are no compute columns and figures at all, from the runs' own reasons (RunData.why_no_compute)."""
    reasons = sorted({r.why_no_compute() for r in runs})
    why = reasons[0] if len(reasons) == 1 else "see each run below"
    return f"No compute columns and no vs-compute figures: no run logged compute/ keys from step 0 ({why})."


def _missing_compute(runs: list[RunData]) -> list[str]:
    return [f"- {r.path}: {r.why_no_compute()}" for r in runs]


def write_table(groups: list[Group], out: str, keys: list[str]) -> tuple[str, str]:
    """``<out>/table.md`` and ``<out>/table.csv``; returns their paths."""
    tables = [build_table(groups, f) for f in sorted({g.facet for g in groups})]
    notes = [f"Final evaluation (the last eval row of each finished run) as mean ± sample standard deviation "
             f"(ddof = 1) over seeds, rounded to the standard deviation's precision; "
             f"n = {', '.join(f'{t.n} ({t.facet})' for t in tables)} unless noted. "
             "Best per column in bold: highest reward, highest diversity, lowest FID, highest held-out reward "
             "(Base, the step-0 evaluation of the untouched model, excluded).",
             f"Rows are told apart by: {', '.join(keys)}."]
    names = {name for t in tables for _, name, _ in t.columns}
    if any(n.startswith("held-out: ") for n in names):
        notes.append("held-out: an evaluation-only reward (eval.rewards), scored on the evaluation samples, never "
                     "trained on (a trained reward that rises while a held-out one falls is reward hacking).")
    if any(n.startswith("reward part: ") for n in names):
        notes.append("reward part: one part of the trained mix reward, unweighted, in its own units.")
    notes += compute_notes(groups)
    unfinished = [(g, r) for g in groups for r in g.unfinished]
    if unfinished:
        notes.append("")
        notes.append(f"Unfinished runs ({len(unfinished)}), not in the means:")
        notes += [f"- {g.label} / {g.facet}: {r.path} (step {r.last_step} of {r.steps})" for g, r in unfinished]
    md = os.path.join(out, "table.md")
    with open(md, "w", encoding="utf-8") as fh:
        fh.write("\n".join([line for t in tables for line in markdown_table(t)] + notes) + "\n")

    names = list(dict.fromkeys(name for t in tables for _, name, _ in t.columns))
    path = os.path.join(out, "table.csv")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["reward", "method"] + [f"{n}_{s}" for n in names for s in ("mean", "std", "best", "n")]
                   + ["unfinished"])
        for t in tables:
            logged = {name for _, name, _ in t.columns}
            for row in t.rows:
                line = [t.facet, row]
                for name in names:
                    c = t.cells.get((row, name)) or Cell()
                    line += (["" if c.mean is None else repr(c.mean), "" if c.std is None else repr(c.std),
                              int(c.best), c.n] if name in logged else ["", "", "", ""])
                w.writerow(line + [t.unfinished.get(row, 0)])
    return md, path
