"""Figures of ``align.report``: convergence curves (against update steps and against cumulative velocity
evaluations, ``*_vs_compute``), Pareto fronts (also of the trained reward against each held-out reward),
held-out reward curves, temperature sweeps (matplotlib figures without pyplot: no backend is chosen or changed).

Sized for a paper: 7 inches wide (a two-column figure), 8-point text, PNG at 200 dpi and a vector PDF.
"""
from __future__ import annotations

import math
import os
import re

import matplotlib
from matplotlib.figure import Figure

from align.report.data import HELDOUT_PREFIXES, METRICS, Group, compute_curve, curve, heldout_metrics

STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
         "ytick.labelsize": 7, "lines.linewidth": 1.2, "axes.spines.top": False, "axes.spines.right": False}
WIDTH = 7.0
NAMES = {key: name for key, name, _ in METRICS}
X_LABELS = {"step": "update step", "compute": "cumulative velocity evaluations"}


def _name(key: str) -> str:
    for prefix, title in HELDOUT_PREFIXES:
        if key.startswith(prefix):
            return title + key[len(prefix):]
    return NAMES.get(key, key)


def pareto_front(xs: list[float], ys: list[float], maximize_x: bool = True, maximize_y: bool = True) -> list[int]:
    """Indices of the non-dominated points, sorted by x. A point is dominated if another is at least as good
    in both coordinates and strictly better in one (equal points do not dominate each other)."""
    sx, sy = (1 if maximize_x else -1), (1 if maximize_y else -1)
    pts = [(sx * x, sy * y) for x, y in zip(xs, ys)]
    keep = []
    for i, (x, y) in enumerate(pts):
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        dominated = any(ox >= x and oy >= y and (ox > x or oy > y) for j, (ox, oy) in enumerate(pts)
                        if j != i and math.isfinite(ox) and math.isfinite(oy))
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: (xs[i], ys[i]))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _save(fig, out: str, stem: str) -> list[str]:
    paths = []
    for ext in ("png", "pdf"):
        path = os.path.join(out, f"{stem}.{ext}")
        fig.savefig(path, dpi=200, bbox_inches="tight")
        paths.append(path)
    return paths


def _colors(labels: list[str]) -> dict[str, tuple]:
    cmap = matplotlib.colormaps.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}


def _facets(groups: list[Group]) -> list[str]:
    return sorted({g.facet for g in groups})


def _metrics(groups: list[Group]) -> list[str]:
    return [k for k, _, _ in METRICS if any(k in row for g in groups for r in g.runs for row in r.evals)]


def _legend(fig, axes) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), frameon=False,
                   bbox_to_anchor=(0.5, 0.0))


def _has_compute(groups: list[Group]) -> bool:
    return any(g.compute_runs()[0] for g in groups)


def _curves_figure(groups: list[Group], keys: list[str], title: str, colors: dict, x: str = "step") -> Figure:
    """One panel per metric, one line per group: mean ± std over seeds against the update step (``x="step"``)
    or the mean cumulative velocity evaluations at each evaluated step (``x="compute"``, the runs with
    compute accounting only)."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(max(WIDTH, 1.8 * len(keys)), 2.2))
        axes = fig.subplots(1, len(keys), squeeze=False)
        axes = axes[0]
        for ax, key in zip(axes, keys):
            for g in groups:
                runs, unfinished = g.curve_runs() if x == "step" else g.compute_runs()
                steps, mean, std = curve(runs, key) if x == "step" else compute_curve(runs, key)
                if not steps:
                    continue
                label = g.label + (" (unfinished)" if unfinished else "") + f" (n={len(runs)})"
                ax.plot(steps, mean, color=colors[g.label], label=label, ls="--" if unfinished else "-",
                        marker="o" if len(steps) <= 12 else None, ms=2.5)
                ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=colors[g.label], alpha=0.2, lw=0)
            ax.set_xlabel(X_LABELS[x])
            ax.set_ylabel(_name(key) + (" ↓" if key == "eval/fid" else " ↑"))
            ax.grid(alpha=0.3, lw=0.5)
        fig.suptitle(title, y=1.02)
        fig.tight_layout()
        _legend(fig, axes)
    return fig


COMPUTE_NOTE = "a CFG-combined velocity is one evaluation"


def _curves_pair(fg: list[Group], keys: list[str], what: str, stem: str, out: str) -> list[str]:
    """``<stem>`` against update steps and, when some run has compute accounting, ``<stem>_vs_compute``."""
    colors = _colors([g.label for g in fg])
    f = fg[0].facet
    paths = _save(_curves_figure(fg, keys, f"{f}: {what} vs update step (mean ± std over seeds)", colors),
                  out, stem)
    if _has_compute(fg):
        fig = _curves_figure(fg, keys, f"{f}: {what} vs cumulative velocity evaluations (rows of v_θ and v_base; "
                                       f"{COMPUTE_NOTE}; mean ± std over seeds)", colors, x="compute")
        paths += _save(fig, out, f"{stem}_vs_compute")
    return paths


def convergence_plots(groups: list[Group], out: str) -> list[str]:
    """convergence_<reward>: reward, diversity, FID vs step, mean ± std over seeds, one line per method; and
    convergence_<reward>_vs_compute, the same against cumulative velocity evaluations (runs with compute/)."""
    paths = []
    for f in _facets(groups):
        fg = [g for g in groups if g.facet == f]
        keys = _metrics(fg)
        if keys:
            paths += _curves_pair(fg, keys, "evaluation", f"convergence_{_slug(f)}", out)
    return paths


def heldout_plots(groups: list[Group], out: str) -> list[str]:
    """heldout_<reward> (and ``_vs_compute``): the trained reward beside each held-out reward and mix part, so a
    trained reward that rises while a held-out one falls (reward hacking) shows."""
    paths = []
    for f in _facets(groups):
        fg = [g for g in groups if g.facet == f]
        held = [k for k, _, _ in heldout_metrics(fg)]
        if held:
            keys = [k for k in ("eval/reward",) if k in _metrics(fg)] + held
            paths += _curves_pair(fg, keys, "trained and held-out rewards", f"heldout_{_slug(f)}", out)
    return paths


def pareto_plots(groups: list[Group], out: str) -> list[str]:
    """pareto_<reward>: reward vs diversity and reward vs FID; pareto_heldout_<reward>: reward vs each held-out
    reward and mix part; one point per evaluated checkpoint (mean over seeds), each method's non-dominated
    front as a line."""
    paths = []
    for f in _facets(groups):
        fg = [g for g in groups if g.facet == f]
        if "eval/reward" not in _metrics(fg):
            continue
        others = [k for k in ("eval/diversity", "eval/fid") if k in _metrics(fg)]
        if others:
            paths += _pareto_figure(fg, others, f"pareto_{_slug(f)}", out)
        held = [k for k, _, _ in heldout_metrics(fg)]
        if held:
            paths += _pareto_figure(fg, held, f"pareto_heldout_{_slug(f)}", out)
    return paths


def _pareto_figure(fg: list[Group], others: list[str], stem: str, out: str) -> list[str]:
    """The trained reward (x) against each of ``others`` (one panel each; FID lower is better, the rest higher)."""
    f, colors = fg[0].facet, _colors([g.label for g in fg])
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(max(WIDTH * len(others) / 2, 3.5), 2.6))
        axes = fig.subplots(1, len(others), squeeze=False)
        axes = axes[0]
        for ax, key in zip(axes, others):
            for g in fg:
                runs, unfinished = g.curve_runs()
                rs, rmean, _ = curve(runs, "eval/reward")
                os_, omean, _ = curve(runs, key)
                common = sorted(set(rs) & set(os_))
                xs = [rmean[rs.index(s)] for s in common]
                ys = [omean[os_.index(s)] for s in common]
                if not xs:
                    continue
                c = colors[g.label]
                ax.scatter(xs, ys, s=8, color=c, alpha=0.45, lw=0)
                front = pareto_front(xs, ys, True, key != "eval/fid")
                ax.plot([xs[i] for i in front], [ys[i] for i in front], color=c, marker="o", ms=3,
                        ls="--" if unfinished else "-", label=g.label + (" (unfinished)" if unfinished else ""))
            ax.set_xlabel("reward →")
            ax.set_ylabel(_name(key) + (" (lower is better)" if key == "eval/fid" else " (higher is better)"))
            ax.grid(alpha=0.3, lw=0.5)
        fig.suptitle(f"{f}: Pareto fronts (points: checkpoints, mean over seeds; lines: non-dominated)", y=1.02)
        fig.tight_layout()
        _legend(fig, axes)
    return _save(fig, out, stem)


def temperature_plots(groups: list[Group], out: str) -> list[str]:
    """temperature_<algo>_<reward>: reward and FID vs step, one line per β, for every algorithm whose β
    varies within a reward."""
    paths = []
    for f in _facets(groups):
        fg = [g for g in groups if g.facet == f]
        for algo in sorted({str(g.cfg.get("algo.name")) for g in fg}):
            ag = [g for g in fg if str(g.cfg.get("algo.name")) == algo and "algo.beta" in g.cfg]
            betas = sorted({float(g.cfg["algo.beta"]) for g in ag})
            if len(betas) < 2:
                continue
            ag = sorted(ag, key=lambda g: (float(g.cfg["algo.beta"]), g.label))
            cmap = matplotlib.colormaps.get_cmap("viridis")
            colors = {g.label: cmap(0.9 * betas.index(float(g.cfg["algo.beta"])) / (len(betas) - 1)) for g in ag}
            keys = [k for k in ("eval/reward", "eval/fid") if k in _metrics(ag)]
            if not keys:
                continue
            fig = _curves_figure(ag, keys, f"{f}: {ag[0].label.split(',')[0]} for each β (mean ± std over seeds)",
                                 colors)
            paths += _save(fig, out, f"temperature_{_slug(algo)}_{_slug(f)}")
    return paths
