"""The results page and the README's example output, generated from the stored summaries alone
(``experiments.reproduce.summaries``): every number on the page is computed here from ``summary.json`` and
``study.json``; every figure in the study's docs folder is linked, and every link names a file that is there.

``render_page(study)`` and ``render_readme(study, readme_text)`` are pure: the same summaries give the same text, so
a test regenerates both and compares them with what is committed."""
from __future__ import annotations

import math
import os
import re

from align.report.data import ALGO_NAMES, Group, _num, base_values, final_values, group_runs, mean_std
from align.report.tables import build_table, format_mean_std, markdown_table
from experiments.reproduce import matched
from experiments.reproduce.study import Study
from experiments.reproduce.summaries import STUDY, SUMMARY, read_json, runs_of

COMMAND = "python -m experiments.reproduce {name} --jobs 2"
README_BEGIN = "<!-- experiments.reproduce: the main job's output (generated; do not edit) -->"
README_END = "<!-- /experiments.reproduce -->"
HELD_OUT = "eval/heldout/classifier"
AT_LEVEL_KEYS = ("compute/velocity", "eval/diversity_rel", "eval/fid", HELD_OUT)


# ---- reading ------------------------------------------------------------------------------------------------
def docs_dir(study: Study) -> str:
    return os.path.join(study.root, study.docs, study.name)


def load(study: Study) -> tuple[dict, dict[str, dict]]:
    """study.json and each section's summary.json."""
    d = docs_dir(study)
    return read_json(os.path.join(d, STUDY)), {s.name: read_json(os.path.join(d, s.name, SUMMARY))
                                               for s in study.sections}


def groups_of(summary: dict) -> list[Group]:
    return group_runs(runs_of(summary))


def _link(study: Study, section: str, file: str) -> str:
    """A path from the page to a file in the section's folder."""
    page_dir = os.path.dirname(os.path.join(study.root, study.page))
    return os.path.relpath(os.path.join(docs_dir(study), section, file), page_dir).replace(os.sep, "/")


def figures(study: Study, section: str) -> list[str]:
    """The PNG files in the section's folder, sorted."""
    d = os.path.join(docs_dir(study), section)
    return sorted(f for f in os.listdir(d) if f.endswith(".png")) if os.path.isdir(d) else []


# ---- formatting ---------------------------------------------------------------------------------------------
def _g(x: float, digits: int = 3) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{x:.{digits}g}"


def _lr(x: float) -> str:
    """A learning rate as written in the configs: 0.0005 → 5e-4."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}" if x else "0"


def _k(x: float) -> str:
    return f"{x / 1000:.1f} k"


def _range(stat, fmt=_g) -> str:
    if stat is None:
        return "–"
    mean, lo, hi = stat
    return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]" if hi > lo else fmt(mean)


def _ms(values: list[float]) -> str:
    return format_mean_std(*mean_std(values)) if values else "–"


def _table(groups: list[Group], facet: str) -> list[str]:
    return markdown_table(build_table(groups, facet), heading=False)


def _facet(groups: list[Group]) -> str:
    facets = sorted({g.facet for g in groups})
    if len(facets) != 1:
        raise ValueError(f"a section of the page has one trained reward; these runs have {facets}")
    return facets[0]


def _n(groups: list[Group]) -> int:
    return max(len(g.finished) for g in groups)


def _embed(study: Study, section: str, file: str, alt: str) -> str:
    if file not in figures(study, section):
        raise FileNotFoundError(f"{os.path.join(docs_dir(study), section, file)}: the page links it but it is not "
                                "there (run python -m experiments.reproduce to write the figures)")
    return f"![{alt}]({_link(study, section, file)})"


# ---- sections -----------------------------------------------------------------------------------------------
def _provenance(study: Study, meta: dict) -> list[str]:
    log = meta["invocations"]
    ran = [e for e in log if e.get("ran")]
    commits = sorted({e["commit"] for e in ran})
    wall = sum(e["seconds"] for e in ran)
    n_runs, seeds = meta["runs"], meta["seeds"]
    one = len(commits) == 1 and not commits[0].endswith("+changes")
    where = (f"all at commit `{commits[0]}`" if one else
             "**not from one commit**: " + ", ".join(f"`{c}`" for c in commits))
    dates = sorted({e["started"][:10] for e in ran})
    kernel_sets = sorted({e.get("cpu_kernels") or "unrecorded" for e in ran})
    envs = sorted({e.get("kernel_env") or "" for e in ran})
    if len(kernel_sets) > 1:
        kernels = "**with different CPU kernels**: " + ", ".join(kernel_sets)
    elif kernel_sets == ["unrecorded"]:
        kernels = "with CPU kernels that were not recorded"
    else:
        kernels = f"with PyTorch's {kernel_sets[0]} CPU kernels"
        if envs[0] and len(envs) == 1:
            kernels += (f" (`{envs[0]}`, which the command sets on x86-64 unless you set them, so that a CPU with "
                        "AVX-512 computes the same numbers as one with AVX2)")
    main_s = sum(e.get("main_job_seconds", 0.0) for e in ran)
    return [
        "Every table and figure on this page comes from one command:", "", "```",
        COMMAND.format(name=study.name), "```", "",
        f"It ran the {n_runs} runs below ({seeds} seeds of every setting) and the README's main job, {where}, on "
        f"{' to '.join(dates[:1] + dates[1:][-1:]) or '–'}, {kernels}: {wall / 60:.0f} min of wall time on 2 shared "
        "CPU cores "
        f"(the main job {main_s:.0f} s of it{f', over {len(ran)} invocations' if len(ran) > 1 else ''}). Then it "
        "wrote this page, its "
        f"figures and the summaries they come from ([{study.docs}/{study.name}/]"
        f"({_link(study, '', '')})): one `summary.json` per sweep and [study.json]({_link(study, '', STUDY)}) (the "
        "invocations, the commits and the main job's output). Run again, it skips the "
        "finished runs and regenerates the page; `--page-only` regenerates the page from the committed summaries. "
        "A run that two sweeps list (VGG-Flow at its default settings) runs once.", "",
        "The study is sized to finish in about an hour on 2 CPU cores: one trained reward (ink mass; "
        "`reward=digits_symmetry` or `reward=digits_classifier` on the comparison's sweep file trains on another), "
        "the main job's budget for every run, and an evaluation of 160 samples (16 per digit) every 20 updates.", "",
        "Numbers are the final evaluation after "
        f"{meta['steps']} updates of {meta['batch_size']} trajectories: mean ± sample standard deviation (ddof = 1) "
        f"over n = {seeds} seeds, rounded to the standard deviation's precision; bold: the best per column (Base, "
        "the step-0 evaluation of the untouched model, excluded). Compute: cumulative rows of v_θ and v_base over "
        "the training (a CFG-combined velocity counts once) and of ∇r; the evaluations are not counted. Intervals "
        "[min, max] are over the seeds."]


DOMAIN = """## The `digits` domain (a real pretrained image flow, on a laptop)

`model=digits` is a small class-conditional `SD3Transformer2DModel` (diffusers, 4 layers, 0.58 M parameters)
trained by rectified flow on scikit-learn's bundled 8×8 handwritten digits, run through the same backend code as
SD3 (`align/models/flow_transformer.py`: peft LoRA rank 8 on `to_q, to_k, to_v, to_out.0`, CFG scale 2, SD3's
shifted 20-step grid). The checkpoint ships in `align/models/weights/`; `python -m align.pretrain model=digits`
regenerates it. Prompts are the class names ("zero" … "nine").

![digits samples](digits_samples.png)

The trained reward is `digits_thickness` (ink mass: a style property that invites hacking). Every run also scores
the evaluation samples with `digits_classifier` (the log-probability of the prompted class under a classifier
trained on the real digits) without training on it: the **held-out** reward, so a trained reward that rises while
the held-out one falls shows reward hacking. Diversity (feature variance over the 16 samples of one prompt; ÷ base:
divided by the same run's step-0 value) and FID (per prompt, finetuned against base samples from the same noise)
use the classifier's 32-d features."""


def _settings(groups: list[Group]) -> str:
    parts = []
    for g in groups:
        bits = [f"lr {_lr(_num(g.cfg['train.lr']))}"] if "train.lr" in g.cfg else []
        if g.cfg.get("algo.beta") is not None:
            bits.append(f"β {_num(g.cfg['algo.beta']):g}")
        parts.append(f"{g.label} ({', '.join(bits)})")
    return "; ".join(parts)


def _opening(summary: dict, heading: str, intro) -> tuple[list[Group], str, list[str]]:
    """A section's groups, its trained reward, and its first lines: the heading, ``intro(groups)`` and the table."""
    groups = groups_of(summary)
    facet = _facet(groups)
    return groups, facet, [heading, "", intro(groups), ""] + _table(groups, facet)


def _comparison(study: Study, summary: dict) -> list[str]:
    s = "digits_comparison"
    groups, facet, out = _opening(summary, "## The comparison", lambda gs: (
        f"`experiments/{s}.yaml`: the seven algorithms at their paper settings on the ink-mass reward, the "
        f"classifier held out, {_n(gs)} seeds. Settings: {_settings(gs)}. Flow-GRPO and DiffusionNFT sample groups "
        "of G = 4 per prompt; ReFL and DRaFT train on the raw reward (`algo.objective=raw`)."))
    out += ["", _embed(study, s, f"convergence_{facet}.png", "convergence"), "",
            "Reward, diversity and FID against the update step (mean ± std band over the seeds). The same runs "
            "against the compute they spent:", "",
            _embed(study, s, f"convergence_{facet}_vs_compute.png", "reward vs compute"), "",
            "The Pareto fronts, one point per evaluated checkpoint (mean over seeds):", "",
            _embed(study, s, f"pareto_{facet}.png", "Pareto fronts"), ""]
    out += _at_levels(groups)
    out += _hacking(study, s, groups, facet)
    return out


def _at_levels(groups: list[Group]) -> list[str]:
    base = base_values(groups, "eval/reward")
    finals = {g.label: final_values(g, "eval/reward") for g in groups}
    if not base:
        return []
    b = sum(base) / len(base)
    lv = matched.levels(b, [sum(v) / len(v) for v in finals.values() if v])
    if not lv:
        return []
    out = ["### At matched reward", "",
           f"Where each method reaches a reward level (base {_g(b)}), read off each seed's evaluations (linear "
           "between the two around the crossing): the compute spent by then and what the model looks like there. "
           "Mean [min, max] over the seeds that reached it; a method none of whose seeds got there is not listed.",
           ""]
    for level in lv:
        out += [f"Reward {level:g}:", "",
                "| Method | seeds there | update | velocity evals | diversity ÷ base | FID | held-out: classifier |",
                "|---|---|---|---|---|---|---|"]
        missing = []
        for g in groups:
            a = matched.at_level(g.finished, level, AT_LEVEL_KEYS)
            if not a.reached:
                missing.append(f"{g.label} ({_ms(finals[g.label])})")
                continue
            out.append(f"| {g.label} | {a.reached}/{a.n} | {_range(a.stat('step'), lambda x: f'{x:.0f}')} | "
                       f"{_range(a.stat('compute/velocity'), _k)} | {_range(a.stat('eval/diversity_rel'))} | "
                       f"{_range(a.stat('eval/fid'))} | {_range(a.stat(HELD_OUT))} |")
        steps = max(r.steps for g in groups for r in g.runs)
        out += ["", f"Not there within {steps} updates (final reward): "
                + (", ".join(missing) if missing else "none") + ".", ""]
    return out


def _hacking(study: Study, s: str, groups: list[Group], facet: str) -> list[str]:
    rows = []
    for g in groups:
        d_r, d_h = [], []
        for r in g.finished:
            ev = [e for e in r.evals if math.isfinite(_num(e.get(HELD_OUT))) and math.isfinite(_num(e.get("eval/reward")))]
            if len(ev) >= 2:
                d_r.append(_num(ev[-1]["eval/reward"]) - _num(ev[0]["eval/reward"]))
                d_h.append(_num(ev[-1][HELD_OUT]) - _num(ev[0][HELD_OUT]))
        if d_h:
            fell = sum(x < 0 for x in d_h)
            rows.append(f"| {g.label} | {_ms(d_r)} | {_ms(d_h)} | {fell}/{len(d_h)} |")
    if not rows:
        return []
    return ["### The held-out reward", "",
            "The change from each run's step-0 evaluation to its final one, mean ± std over seeds: the trained reward "
            "and the held-out classifier (never trained on), and in how many seeds the held-out one fell.", "",
            "| Method | trained reward change | held-out change | seeds where it fell |", "|---|---|---|---|"] + rows + [
            "", _embed(study, s, f"pareto_heldout_{facet}.png", "held-out against trained reward"), "",
            "The held-out classifier against the trained reward, one point per checkpoint (mean over seeds); and both "
            "against the update step:", "", _embed(study, s, f"heldout_{facet}.png", "held-out reward"), ""]


def _trend(xs: list[float], ys: list[float]) -> str:
    pairs = sorted(zip(xs, ys))
    ys = [y for _, y in pairs]
    if all(b > a for a, b in zip(ys, ys[1:])):
        return "rises with β"
    if all(b < a for a, b in zip(ys, ys[1:])):
        return "falls as β rises"
    return "is not monotone in β"


def _temperature(study: Study, summary: dict) -> list[str]:
    s = "digits_temperature"
    groups, facet, out = _opening(summary, "## Temperature", lambda gs: (
        f"`experiments/{s}.yaml`: VGG-Flow's β (1/λ of the relaxed control problem: larger is hotter) and "
        "Flow-GRPO's KL coefficient β (larger is colder: it holds the policy to the base; at lr 1e-3, since at its "
        f"paper lr 3e-4 it barely moves in these updates), ink mass, the classifier held out, {_n(gs)} seeds."))
    out += [""]
    for algo in ("vggflow", "flow_grpo"):
        ag = [g for g in groups if g.cfg.get("algo.name") == algo and "algo.beta" in g.cfg]
        if len(ag) < 2:
            continue
        betas = [_num(g.cfg["algo.beta"]) for g in ag]
        rew = [sum(v) / len(v) for v in (final_values(g, "eval/reward") for g in ag)]
        fid = [sum(v) / len(v) for v in (final_values(g, "eval/fid") for g in ag)]
        pairs = sorted(zip(betas, rew, fid))
        listed = ", ".join(f"β = {b:g}: {_g(r)} (FID {_g(f, 2)})" for b, r, f in pairs)
        out += [f"- **{ALGO_NAMES[algo]}**: the final reward {_trend(betas, rew)}, the FID {_trend(betas, fid)} "
                f"({listed}).", ""]
        out += [_embed(study, s, f"temperature_{algo}_{facet}.png", f"temperature, {ALGO_NAMES[algo]}"), ""]
    out += ["The final point of every algorithm × temperature (this sweep and the comparison; mean ± std over seeds; "
            "lines join one algorithm's temperatures):", "",
            _embed(study, s, f"pareto_temperature_{facet}.png", "Pareto fronts over temperatures"), "",
            _embed(study, s, f"pareto_heldout_{facet}.png", "held-out against trained reward, temperatures"), ""]
    return out


def _equal_lr(study: Study, summary: dict, meta: dict) -> list[str]:
    s = "digits_equal_lr"
    groups, facet, out = _opening(summary, "## Equal learning rates", lambda gs: (
        f"`experiments/{s}.yaml`: every algorithm at lr "
        f"{', '.join(_lr(x) for x in sorted({_num(g.cfg['train.lr']) for g in gs}))} (VGG-Flow's) instead of its "
        "paper learning rate, so that those that barely move at theirs travel far enough to be compared at equal "
        f"reward; ink mass, the classifier held out, {_n(gs)} seeds."))
    out += ["", _embed(study, s, f"pareto_{facet}.png", "Pareto fronts, equal learning rates"), "",
            _embed(study, s, f"pareto_heldout_{facet}.png", "held-out against trained reward, equal learning rates"),
            ""]
    out += _at_levels(groups)
    pick = meta.get("sample_panel")
    if pick:
        chosen = ", ".join(f"{c['label']} update {c['step']} ({_g(c['reward'])})" for c in pick["chosen"])
        out += ["### Samples at matched reward", "",
                f"Seed {pick['seed']}'s evaluation grid (8 samples of each prompt per row, the same noise for every "
                f"method) at the evaluated checkpoint whose reward is closest to {_g(pick['level'])}, the best that "
                f"every method reaches at some checkpoint: {chosen}; Base: update 0.", "",
                _embed(study, s, pick["file"], "samples at matched reward"), ""]
    return out


def _forms(study: Study, summary: dict) -> list[str]:
    s = "digits_vggflow_forms"
    _, facet, out = _opening(summary, "## VGG-Flow as the paper writes it and as its authors ran it", lambda gs: (
        f"`experiments/{s}.yaml`: `algo=vggflow` (the paper) against `algo=vggflow_authors` (every choice of the "
        "authors' code at once: the boundary weighed α·β⁴/6 against the consistency, lr 1e-3, η = t, their finite "
        "differences; [vggflow.md](vggflow.md#the-paper-the-authors-code-and-algovggflow)), and the consistency "
        "residual enforced inside each Euler step (`algo.consistency_times=within_step`) instead of at the grid "
        f"states; ink mass, the classifier held out, {_n(gs)} seeds. The sweep changes several choices at once and "
        "does not separate them."))
    out += ["", _embed(study, s, f"convergence_{facet}.png", "convergence, VGG-Flow forms"), ""]
    return out


def _files(study: Study) -> list[str]:
    out = ["## Files", "", "Every figure, by sweep (PNG; the summaries they and the tables come from are the "
           "`summary.json` beside them):", ""]
    for sec in study.sections:
        links = ", ".join(f"[{f[:-4]}]({_link(study, sec.name, f)})" for f in figures(study, sec.name))
        out.append(f"- `{sec.name}` ([summary.json]({_link(study, sec.name, SUMMARY)})): {links}")
    return out + [""]


def render_page(study: Study) -> str:
    meta, sums = load(study)
    lines = [f"# Results on `{study.name}`", "",
             f"<!-- Generated by `python -m experiments.reproduce {study.name}` from {study.docs}/{study.name}/ "
             "(tests/test_results_page.py fails on a hand edit: change the generator or the runs instead). -->", ""]
    lines += _provenance(study, meta) + ["", DOMAIN, ""]
    lines += _comparison(study, sums["digits_comparison"])
    lines += _temperature(study, sums["digits_temperature"])
    lines += _equal_lr(study, sums["digits_equal_lr"], meta)
    lines += _forms(study, sums["digits_vggflow_forms"])
    lines += _files(study)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"


def readme_block(meta: dict) -> str:
    job = meta["main_job"]
    return "\n".join([README_BEGIN, "```", job["output"].rstrip("\n"), "```", "", _main_job_kernels(job),
                      README_END])


def _main_job_kernels(job: dict) -> str:
    kernels, env = job.get("cpu_kernels"), job.get("kernel_env")
    if not kernels:
        return "(Which CPU kernels printed these figures was not recorded.)"
    said = f"Printed with PyTorch's {kernels} CPU kernels"
    if not env:
        return said + " (on another CPU, floating-point sums in another order change the last digits)."
    return (f"{said}; on a CPU with AVX-512, `{env} python -m align.run` prints these exact figures (plain, "
            "its kernels sum in another order: the third digit differs).")


def render_readme(study: Study, readme: str) -> str:
    """``readme`` with the text between the markers replaced by the main job's stored output."""
    meta, _ = load(study)
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{study.readme} has no block between '{README_BEGIN}' and '{README_END}'")
    return readme[:begin] + readme_block(meta) + readme[end + len(README_END):]
