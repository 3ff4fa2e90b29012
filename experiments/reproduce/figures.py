"""The figures of a study's page, PNG only, into each section's folder: ``align.report``'s figures drawn from the
section's summary (convergence and reward vs compute, Pareto fronts per checkpoint, held-out against trained
reward, temperatures), the Pareto front over temperatures (one point per algorithm × temperature at the end of
training), and the sample grids of every method at a matched reward (from the run directories' sample grids)."""
from __future__ import annotations

import glob
import os

import matplotlib
from matplotlib.figure import Figure

from align.report import plots
from align.report.data import ALGO_NAMES, Group, final_values, mean_std
from experiments.reproduce import matched
from experiments.sample_panel import sample_panel


def report_figures(groups: list[Group], out: str) -> list[str]:
    """``align.report``'s figures of these groups, PNG only."""
    os.makedirs(out, exist_ok=True)
    for old in glob.glob(os.path.join(out, "*.png")):
        os.remove(old)
    paths = (plots.convergence_plots(groups, out) + plots.pareto_plots(groups, out) + plots.heldout_plots(groups, out)
             + plots.temperature_plots(groups, out))
    for p in paths:
        if p.endswith(".pdf"):
            os.remove(p)
    return [p for p in paths if p.endswith(".png")]


def temperature_front(groups: list[Group], facet: str, out: str) -> str:
    """``pareto_temperature_<facet>.png``: the final reward (x) against diversity ÷ base and FID, one point per
    group (mean ± std over seeds), the groups of one algorithm joined in order of β."""
    keys = [("eval/diversity_rel", "diversity ÷ base (higher is better)"), ("eval/fid", "FID (lower is better)")]
    lines = _lines(groups)
    colors = plots._colors(list(lines))
    with matplotlib.rc_context(plots.STYLE):
        fig = Figure(figsize=(plots.WIDTH, 2.8))
        axes = fig.subplots(1, len(keys), squeeze=False)[0]
        for ax, (key, name) in zip(axes, keys):
            for label, lg in lines.items():
                pts = []
                for g in sorted(lg, key=lambda g: float(g.cfg.get("algo.beta") or 0)):
                    xs, ys = final_values(g, "eval/reward"), final_values(g, key)
                    if xs and ys:
                        (mx, sx), (my, sy) = mean_std(xs), mean_std(ys)
                        pts.append((mx, sx or 0.0, my, sy or 0.0, g))
                if not pts:
                    continue
                ax.errorbar([p[0] for p in pts], [p[2] for p in pts], xerr=[p[1] for p in pts],
                            yerr=[p[3] for p in pts], color=colors[label], marker="o", ms=3, lw=1, capsize=1.5,
                            label=label)
                if len(pts) > 1:
                    for mx, _, my, _, g in pts:
                        ax.annotate(f"β={float(g.cfg['algo.beta']):g}", (mx, my), fontsize=6, xytext=(2, 2),
                                    textcoords="offset points")
            ax.set_xlabel("final reward →")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3, lw=0.5)
        fig.suptitle(f"{facet}: every algorithm × temperature after training (mean ± std over seeds)", y=1.02)
        fig.tight_layout()
        plots._legend(fig, axes)
    path = os.path.join(out, f"pareto_temperature_{plots._slug(facet)}.png")
    fig.savefig(path, dpi=200, bbox_inches="tight")
    return path


def _lines(groups: list[Group]) -> dict[str, list[Group]]:
    """The groups of each algorithm (and learning rate, where one algorithm ran at several), by legend label."""
    lrs: dict[str, set] = {}
    for g in groups:
        lrs.setdefault(str(g.cfg.get("algo.name")), set()).add(g.cfg.get("train.lr"))
    out: dict[str, list[Group]] = {}
    for g in groups:
        algo = str(g.cfg.get("algo.name"))
        label = ALGO_NAMES.get(algo, algo)
        if len(lrs[algo]) > 1:
            label += f", lr {float(g.cfg['train.lr']):.0e}".replace("e-0", "e-")
        out.setdefault(label, []).append(g)
    return out


def matched_samples(groups: list[Group], runs_root: str, out: str, seed: int = 0) -> dict | None:
    """``samples_matched_reward.png``: for seed ``seed``, each method's evaluation grid at its checkpoint closest
    to the reward every method reaches (``matched.matched_checkpoint``), the base's (update 0) first. Returns
    what was chosen, for the page's caption; None if a method has no run of that seed or its grid is missing."""
    runs = {}
    for g in groups:
        of_seed = [r for r in g.finished if r.seed == seed]
        if not of_seed:
            return None
        runs[g.label] = of_seed[0]
    level, chosen = matched.matched_checkpoint(runs)
    first = next(iter(runs.values()))
    panels = [("Base", os.path.join(runs_root, first.path, "samples", "step_0000000.png"))]
    for c in chosen:
        panels.append((f"{c['label']}\nupdate {c['step']}, reward {c['reward']:.3g}",
                       os.path.join(runs_root, runs[c['label']].path, "samples", f"step_{c['step']:07d}.png")))
    if not all(os.path.exists(p) for _, p in panels):
        return None
    file = "samples_matched_reward.png"
    sample_panel(os.path.join(out, file), panels, side_by_side=True)
    return {"seed": seed, "level": level, "chosen": chosen, "file": file}
