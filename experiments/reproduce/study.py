"""A study: the sweep files one results page reports, run as one sweep in which a configuration that two files
both list (VGG-Flow at β = 10 is the comparison's run and the temperature sweep's) runs once, and the main job
(``python -m align.run`` as the README gives it) whose output the README quotes.

Each section's runs live in ``<runs>/<sweep name>/<run name>`` as ``align.sweep`` would put them; a run that an
earlier section already lists (the same composed config, minus the keys that do not change what a run computes:
``align.core.run_dir.keys_with("name")``) is that section's directory. Every invocation appends what it did to
``<runs>/study.json`` (commit, start, seconds, runs ran and skipped), so the page can state the commit and the wall
time of the runs however many invocations it took to finish them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from align.core.run_dir import flatten, keys_with, run_status
from align.sweep import Sweep, execute, load_sweep, plan
from experiments.reproduce import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOG = "study.json"
MAIN_JOB = "main_job"


@dataclass(frozen=True)
class Section:
    name: str            # the sweep's name: its runs' directory under <runs>, its page section's files
    sweep_file: str      # relative to the repository root


@dataclass(frozen=True)
class Study:
    name: str
    sections: tuple[Section, ...]
    docs: str            # where the summaries and figures go, relative to the repository root
    page: str            # the generated page
    readme: str = "README.md"
    root: str = ROOT     # the repository the paths above are relative to


STUDIES = {
    "digits": Study("digits", (
        Section("digits_comparison", "experiments/digits_comparison.yaml"),
        Section("digits_temperature", "experiments/digits_temperature.yaml"),
        Section("digits_equal_lr", "experiments/digits_equal_lr.yaml"),
        Section("digits_vggflow_forms", "experiments/digits_vggflow_forms.yaml"),
    ), docs="docs/results", page="docs/results.md"),
}


@dataclass
class Plan:
    study: Study
    runs_root: str
    sweep: Sweep                                    # every distinct run once
    members: dict[str, list[str]] = field(default_factory=dict)   # section -> its run directories


def _identity(overrides: list[str], run_dir: str) -> str:
    from align.setup.compose import compose_config

    cfg = OmegaConf.to_container(compose_config(overrides, run_dir=run_dir), resolve=True)
    ignored = set(keys_with("name"))
    return json.dumps({k: v for k, v in flatten(cfg).items() if k not in ignored}, sort_keys=True, default=str)


def make_plan(study: Study, runs_root: str) -> Plan:
    """Load every section's sweep file, with its runs under ``<runs_root>/<sweep name>``, and merge them: a
    configuration listed twice runs once, in the directory of the section that lists it first."""
    runs_root = os.path.abspath(runs_root)
    merged = Sweep(study.name, runs_root, [], [])
    p = Plan(study, runs_root, merged)
    first: dict[str, str] = {}
    for section in study.sections:
        sweep = load_sweep(os.path.join(study.root, section.sweep_file), out=os.path.join(runs_root, section.name))
        dirs = []
        for run in sweep.runs:
            key = _identity(run.overrides, run.dir)
            if key not in first:
                first[key] = run.dir
                run.name = f"{section.name}/{run.name}"
                merged.runs.append(run)
            dirs.append(first[key])
        p.members[section.name] = dirs
    return p


def commit() -> str:
    """The repository's commit, with ``+changes`` if tracked files differ from it (``unknown`` outside git)."""
    def git(*args):
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, check=False)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+changes" if dirty else "")


def read_log(runs_root: str) -> list[dict]:
    path = os.path.join(runs_root, LOG)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _append_log(runs_root: str, entry: dict) -> None:
    entries = read_log(runs_root) + [entry]
    tmp = os.path.join(runs_root, LOG + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(entries, fh, indent=1)
    os.replace(tmp, os.path.join(runs_root, LOG))


def run_main_job(runs_root: str) -> tuple[str, bool]:
    """``python -m align.run`` exactly as the README's first command runs it (default threads, a timestamped run
    directory under ``runs/`` of its working directory ``<runs>/main_job``); its output is kept in
    ``<runs>/main_job/output.txt``. Returns the output, and whether it ran now (False: a finished one was there)."""
    cwd = os.path.join(runs_root, MAIN_JOB)
    out = os.path.join(cwd, "output.txt")
    if os.path.exists(out):
        with open(out, encoding="utf-8") as fh:
            text = fh.read()
        done = [ln for ln in text.splitlines() if ln.startswith("align: run directory ")]
        if done and run_status(done[0].split("align: run directory ", 1)[1].strip()) == "finished":
            return text, False
    os.makedirs(cwd, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "align.run"], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"the main job failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(proc.stdout)
    os.replace(tmp, out)
    return proc.stdout, True


def run_study(p: Plan, jobs: int) -> dict:
    """Run the main job, then every run not finished (``jobs`` at once, one thread each), all with the CPU kernels
    ``experiments.reproduce.kernels`` pins; log the invocation. Returns the log entry (``failed`` > 0 or
    ``stopped``: not every run finished)."""
    problems = plan(p.sweep)
    if problems:
        raise ValueError(f"{len(problems)} of {len(p.sweep.runs)} runs cannot start; nothing was run:\n  "
                         + "\n  ".join(problems))
    os.makedirs(p.runs_root, exist_ok=True)
    os.environ.update(kernels.pinned())      # the main job and every run inherit it
    entry = {"commit": commit(), "cpu_kernels": kernels.kernel_set(dict(os.environ)),
             "kernel_env": kernels.stated(dict(os.environ))}
    start = time.time()
    entry.update(started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), jobs=jobs)
    _, ran_main = run_main_job(p.runs_root)
    entry["main_job_seconds"] = round(time.time() - start, 1) if ran_main else 0.0
    counts = execute(p.sweep, jobs=jobs, threads=1)
    entry.update(seconds=round(time.time() - start, 1), ran=counts["ran"] + counts["resumed"] + int(ran_main),
                 skipped=counts["skipped"], failed=counts["failed"],
                 stopped=counts["interrupted"] + counts["not started"])
    _append_log(p.runs_root, entry)
    return entry
