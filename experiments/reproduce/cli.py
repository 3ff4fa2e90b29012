"""``python -m experiments.reproduce digits [--jobs N] [--runs DIR] [--page-only | --check]``.

1. Runs the study (``experiments.reproduce.study``): the README's main job, then every run of every sweep the page
   reports, ``--jobs`` at once with one thread each, skipping finished runs and resuming interrupted ones; a
   configuration two sweeps list runs once. Runs live in ``--runs`` (default ``sweeps/<study>``).
2. Writes each sweep's ``summary.json`` and the study's ``study.json`` into ``docs/results/<study>/``, and the
   figures (PNG) beside them.
3. Writes the page (``docs/results.md``) and the README's example output from those summaries alone.

``--page-only`` does step 3 from the committed summaries; ``--check`` compares step 3's text with the committed
page and README and exits 1 with the difference (what ``tests/test_results_page.py`` asserts). Exit 2: bad input
or a run that cannot start; 1: a run failed or the study was stopped (nothing is written from an unfinished study).
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import time

from experiments.reproduce import figures, page, study as study_mod
from experiments.reproduce.summaries import STUDY, SUMMARY, summarise_runs, write_json


def write_summaries(p: study_mod.Plan, entry_log: list[dict], main_output: str) -> dict:
    """Every section's summary.json and figures, then study.json; returns study.json's content."""
    s = p.study
    out_root = page.docs_dir(s)
    sums = {}
    for sec in s.sections:
        sums[sec.name] = summarise_runs(p.members[sec.name], p.runs_root)
        write_json(os.path.join(out_root, sec.name, SUMMARY), sums[sec.name])
    panel = None
    for sec in s.sections:
        groups = page.groups_of(sums[sec.name])
        out = os.path.join(out_root, sec.name)
        figures.report_figures(groups, out)
        if sec.name == "digits_temperature":
            both = page.groups_of({"runs": sums["digits_comparison"]["runs"] + sums[sec.name]["runs"]})
            figures.temperature_front(both, page._facet(groups), out)
        if sec.name == "digits_equal_lr":
            panel = figures.matched_samples(groups, p.runs_root, out)
    first = sums[s.sections[0].name]["runs"][0]["cfg"]
    ran_main = next((e for e in entry_log if e.get("main_job_seconds")), entry_log[-1] if entry_log else {})
    meta = {"study": s.name, "runs": len(p.sweep.runs), "seeds": len({r["cfg"]["seed"] for v in sums.values()
                                                                     for r in v["runs"]}),
            "steps": first["train.steps"], "batch_size": first["train.batch_size"],
            "invocations": entry_log, "sample_panel": panel,
            "main_job": {"command": "python -m align.run",
                         "output": main_output.replace(os.path.join(p.runs_root, study_mod.MAIN_JOB),
                                                       "/path/to/align"),
                         **{k: ran_main[k] for k in ("cpu_kernels", "kernel_env") if k in ran_main}}}
    write_json(os.path.join(out_root, STUDY), meta)
    return meta


def write_page(s: study_mod.Study) -> list[str]:
    """The page and the README block from the stored summaries; returns the paths written."""
    written = []
    for path, text in _generated(s):
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(path + ".tmp", path)
        written.append(path)
    return written


def _generated(s: study_mod.Study) -> list[tuple[str, str]]:
    readme = os.path.join(s.root, s.readme)
    with open(readme, encoding="utf-8") as fh:
        current = fh.read()
    return [(os.path.join(s.root, s.page), page.render_page(s)), (readme, page.render_readme(s, current))]


def check(s: study_mod.Study) -> list[str]:
    """The unified diff of every generated file against the committed one (empty: they agree)."""
    diffs = []
    for path, text in _generated(s):
        with open(path, encoding="utf-8") as fh:
            committed = fh.read()
        if committed != text:
            rel = os.path.relpath(path, s.root)
            diffs += list(difflib.unified_diff(committed.splitlines(), text.splitlines(), f"{rel} (committed)",
                                               f"{rel} (generated)", lineterm=""))
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__.split("\n\n")[0])
    ap.add_argument("study", choices=sorted(study_mod.STUDIES))
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each (default 1)")
    ap.add_argument("--runs", default=None, help="where the runs live (default sweeps/<study>)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--page-only", action="store_true", help="regenerate the page from the committed summaries")
    mode.add_argument("--check", action="store_true", help="exit 1 if the committed page or README differ from "
                                                           "what the committed summaries give")
    a = ap.parse_args(argv)
    s = study_mod.STUDIES[a.study]
    if a.check:
        diff = check(s)
        print("\n".join(diff) if diff else f"experiments.reproduce: {s.page} and {s.readme} are up to date")
        return 1 if diff else 0
    if not a.page_only:
        if a.jobs < 1:
            print("experiments.reproduce: --jobs must be at least 1", file=sys.stderr)
            return 2
        start = time.time()
        try:
            p = study_mod.make_plan(s, a.runs or os.path.join("sweeps", s.name))
            entry = study_mod.run_study(p, a.jobs)
        except ValueError as err:
            print(f"experiments.reproduce: {err}", file=sys.stderr)
            return 2
        except RuntimeError as err:           # the main job failed: its output says why
            print(f"experiments.reproduce: {err}", file=sys.stderr)
            return 1
        if entry["failed"] or entry["stopped"]:
            print(f"experiments.reproduce: {entry['failed']} failed, {entry['stopped']} stopped; the page is not "
                  "written from an unfinished study. Run the same command again to resume.", file=sys.stderr)
            return 1
        output, _ = study_mod.run_main_job(p.runs_root)
        write_summaries(p, study_mod.read_log(p.runs_root), output)
        print(f"experiments.reproduce: runs, summaries and figures in {time.time() - start:.0f} s")
    for path in write_page(s):
        print(f"experiments.reproduce: wrote {os.path.relpath(path, s.root)}")
    return 0
