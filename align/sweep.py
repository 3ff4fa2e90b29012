"""``python -m align.sweep experiments/<name>.yaml [overrides] [--jobs N] [--dry-run] [--out DIR]``.

A sweep file::

    name: digits_comparison
    out: sweeps/digits_comparison      # optional (default sweeps/<name>), relative to the working directory
    common: [model=digits]             # overrides of every run
    grids:                             # each mapping is a Cartesian product; the sweep is their union
      - algo: [vggflow, refl]
        seed: [0, 1, 2]
      - {algo: [adjoint_matching], algo.beta: [3, 10], seed: [0, 1, 2]}

Every run gets the directory ``<out>/<its grid overrides, sorted, joined by ','>`` (e.g.
``algo=vggflow,seed=0``): exactly the directory Hydra's multirun gives the same job with
``--print-hydra``'s command (``hydra.sweep.subdir: ${hydra.job.override_dirname}``, values normalised by
Hydra's parser, the common keys excluded from the name). Each run is a subprocess
``python -m align.run <overrides> run_dir=<dir> train.progress=false threads=<--threads>``, up to
``--jobs`` at once, each in its own process group, its output appended to ``<dir>/run.log``. Ctrl-C
(SIGINT), SIGTERM or SIGHUP stops the sweep: nothing more starts, the running runs get SIGTERM (SIGKILL after
STOP_GRACE_S), the summary says which runs finished (by their directories: one that finished as the stop
reached it counts as finished), were interrupted or never started, and the exit code is 130 unless every run
finished; running the same command again resumes. Before anything starts, every run's config is
composed (a typo fails at once) and compared with what its directory already holds: finished runs are
skipped, runs with a checkpoint resume, a directory holding another config is an error. A run's marker and the
header of its run.log are written holding the directory's lock: a directory another process writes is left
alone (that run fails, naming the holder). The skip/resume
rule itself lives in ``align.core.run_dir``, which ``align.run`` applies too, so Hydra launchers (SLURM, ...) get it.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from align.setup.checks import yaml_problem
from align.setup.overrides import ConfigProblem
from align.core.run_dir import (RunMismatch, keys_with, last_checkpoint_step, own_run_dir, plan_existing_run,
                                run_status)

LOG_NAME = "run.log"
OUTCOMES = ("ran", "resumed", "skipped", "failed", "interrupted", "not started")
# SIGHUP too: the runs are in their own sessions, so a closed terminal's hangup reaches the sweep alone
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_GRACE_S = 10.0          # after SIGTERM, how long a stopped run may take before SIGKILL


class SweepError(ValueError):
    """A problem with the sweep file or one of its runs, found before any run starts."""


@dataclass
class Run:
    name: str                      # the directory name: the grid overrides, sorted, joined by ','
    overrides: list[str]           # common overrides (minus the grid's keys) + the grid overrides
    dir: str
    action: str = ""               # start | resume | skip (planned)
    outcome: str = ""              # one of OUTCOMES
    seconds: float = 0.0
    log_offset: int = 0            # where this attempt's output starts in <dir>/run.log
    problem: str = ""              # why it failed before it started (else its log's tail tells)


@dataclass
class Sweep:
    name: str
    out: str
    common: list[str]
    grids: list[dict[str, list[str]]]
    runs: list[Run] = field(default_factory=list)


def _render(value) -> str:
    """A YAML value (loaded as text) as a Hydra override value."""
    if isinstance(value, list):
        return "[" + ",".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        raise SweepError(f"grid values cannot be mappings: {value}")
    return str(value)


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def normalise(key: str, values: list[str]) -> list[str]:
    """``key=value`` strings as Hydra's basic sweeper writes them for each job (e.g. 5e4 → 50000.0)."""
    try:
        o = OverridesParser.create().parse_overrides([f"{key}={','.join(values)}"])[0]
    except Exception as err:
        raise SweepError(f"cannot parse grid entry {key}: {values}: {str(err).splitlines()[0]}") from None
    if o.is_sweep_override():
        return [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
    return [f"{o.get_key_element()}={o.get_value_element_as_str()}"]


def load_sweep(path: str, out: str | None = None, extra: list[str] | None = None) -> Sweep:
    """Read a sweep file (all scalars as written) and expand it into runs; ``extra`` overrides join common."""
    spec = _read_spec(path)
    unknown = set(spec) - {"name", "out", "common", "grids"}
    if unknown:
        raise SweepError(f"{path}: unknown top-level keys {sorted(unknown)} (allowed: name, out, common, grids)")
    name = spec.get("name") or os.path.splitext(os.path.basename(path))[0]
    given = spec.get("common") or []
    if not isinstance(given, list) or not all(isinstance(o, str) for o in given):
        raise SweepError(f"{path}: common must be a list of overrides like 'model=digits'")
    common = given + list(extra or [])
    grids = spec.get("grids") or []
    if not isinstance(grids, list) or not grids or not all(isinstance(g, dict) and g for g in grids):
        raise SweepError(f"{path}: grids must be a non-empty list of non-empty mappings key -> list of values")
    for o in common:
        if _key(o) in ("run_dir", "resume") or o.startswith("hydra"):
            raise SweepError(f"{path}: common cannot set {_key(o)} (the sweep sets each run's directory)")
    norm = [{k: normalise(k, [_render(v) for v in (vals if isinstance(vals, list) else [vals])])
             for k, vals in g.items()} for g in grids]
    sweep = Sweep(name, out or spec.get("out") or os.path.join("sweeps", name), common, norm)
    sweep.runs = expand(sweep)
    return sweep


def _read_spec(path: str) -> dict:
    """The sweep file's top-level mapping, every scalar as written (text); SweepError naming the file if it is not
    UTF-8 text, not YAML (with the line) or not a mapping."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise SweepError(f"{path} is not a UTF-8 text file: line {line} has a byte that is not UTF-8; save it as "
                         "UTF-8") from None
    try:
        spec = yaml.load(text, Loader=yaml.BaseLoader) or {}
    except yaml.YAMLError as err:
        raise SweepError(yaml_problem(path, err)) from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with the keys name, out, common, grids; this one is a "
                         f"YAML {'list' if isinstance(spec, list) else 'scalar'}")
    return spec


def run_name(grid_overrides: list[str]) -> str:
    """Hydra's override_dirname: the overrides sorted and joined by ','."""
    return ",".join(sorted(grid_overrides))


def expand(sweep: Sweep) -> list[Run]:
    """The union of the grids' Cartesian products, in file order, without duplicates."""
    import itertools

    runs, seen = [], set()
    for g in sweep.grids:
        for combo in itertools.product(*g.values()):
            name = run_name(list(combo))
            if name in seen:
                continue
            seen.add(name)
            common = [o for o in sweep.common if _key(o) not in g]
            runs.append(Run(name, common + list(combo), os.path.abspath(os.path.join(sweep.out, name))))
    return runs


def plan(sweep: Sweep) -> list[str]:
    """Compose every run's config and decide start / resume / skip; returns the problems found."""
    from align.setup.compose import compose_config
    from align.setup.paths import absolute_paths

    problems = []
    for run in sweep.runs:
        try:
            cfg = compose_config(run.overrides, run_dir=run.dir)
            run.action = plan_existing_run(run.dir, OmegaConf.to_container(cfg, resolve=True), absolute_paths)
        except (ConfigProblem, RunMismatch) as err:
            problems.append(f"{run.name}: {err}")
        except Exception as err:  # a bad value Hydra or OmegaConf rejects
            problems.append(f"{run.name}: {' '.join(str(err).split())}")
        if len(problems) >= 10:           # a typo in common: every run has it; do not compose them all
            break
    return problems


def command(run: Run, threads: int) -> list[str]:
    given = {_key(o) for o in run.overrides}
    runner = [o for o in ("train.progress=false", f"threads={threads}") if _key(o) not in given]
    return [sys.executable, "-m", "align.run", *run.overrides, f"run_dir={quote(run.dir)}", *runner]


def quote(value: str) -> str:
    """A Hydra quoted string (run directories contain '=' and ',')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP reached the sweep."""


@contextmanager
def _interruptible() -> Iterator[None]:
    """In the main thread, the first of STOP_SIGNALS raises Interrupted; later ones are ignored until the end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Children:
    """The running runs' processes. Each is the leader of its own process group, so a Ctrl-C in the terminal
    reaches the sweep alone and the sweep stops them (and whatever they started) itself."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, subprocess.Popen] = {}
        self.stopping = False

    def run(self, cmd: list[str], **kwargs) -> int | None:
        """Run ``cmd`` to its end and return its exit code; None if the sweep is stopping (not started)."""
        with self._lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
            self._running[proc.pid] = proc
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._running.pop(proc.pid, None)

    def stop(self, grace: float) -> None:
        """Start nothing more; SIGTERM every running run's process group, SIGKILL what is left after ``grace``."""
        with self._lock:
            self.stopping = True
            procs = list(self._running.values())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + grace
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    pass
            procs = [p for p in procs if p.poll() is None]
            if not procs:
                return


def _execute(run: Run, threads: int, slots: queue.Queue, gpus: list[str], children: Children) -> Run:
    slot = slots.get()
    try:
        if children.stopping:
            run.outcome = "not started"
            return run
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        cmd = command(run, threads)
        start = time.time()
        try:
            log = _open_log(run, cmd)
        except RunMismatch as err:             # another process writes that run directory
            run.outcome, run.problem = "failed", str(err)
            return run
        with log:
            rc = children.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        run.seconds = time.time() - start
        run.outcome = _outcome(run, rc, children.stopping)
        return run
    finally:
        slots.put(slot)


def _open_log(run: Run, cmd: list[str]):
    """``<run.dir>/run.log``, opened for appending with this attempt's header, written while holding the run
    directory's lock (the marker first: the directory is ours); RunMismatch if another process holds it."""
    with own_run_dir(run.dir):
        log = open(os.path.join(run.dir, LOG_NAME), "a", encoding="utf-8")
        run.log_offset = log.tell()
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd[1:])}\n")
        log.flush()
    return log


def _outcome(run: Run, rc: int | None, stopping: bool) -> str:
    """What became of a run, by its directory first: a finished run (run_status) ran, whatever its exit code
    (a stop may reach it while it exits); else its exit code says."""
    if rc is None:
        return "not started"
    if rc == 0 or run_status(run.dir) == "finished":
        return {"start": "ran", "resume": "resumed", "skip": "skipped"}[run.action]
    return "interrupted" if stopping else "failed"


def _tail(path: str, offset: int, n: int = 3) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            fh.seek(offset)
            return "".join(fh.readlines()[1:][-n:]).rstrip()
    except OSError:
        return ""


def execute(sweep: Sweep, jobs: int = 1, threads: int = 1, gpus: list[str] | None = None) -> dict[str, int]:
    """Run what is not finished, ``jobs`` at once; print one line per run and a summary; return the counts
    of each outcome. On one of STOP_SIGNALS: launch nothing more, stop the running runs, say what became of each."""
    gpus = gpus or []
    todo = [r for r in sweep.runs if r.action != "skip"]
    for r in sweep.runs:
        if r.action == "skip":
            r.outcome = "skipped"
    total, done, start = len(sweep.runs), len(sweep.runs) - len(todo), time.time()
    print(f"align.sweep {sweep.name}: {total} runs in {os.path.abspath(sweep.out)} "
          f"({done} finished already, {sum(r.action == 'resume' for r in todo)} to resume), "
          f"{min(jobs, max(len(todo), 1))} at a time", flush=True)
    slots: queue.Queue = queue.Queue()
    for i in range(jobs):
        slots.put(i)
    children, stopped_by = Children(), ""
    pool = cf.ThreadPoolExecutor(max_workers=jobs)
    try:
        with _interruptible():
            try:
                futures = [pool.submit(_execute, r, threads, slots, gpus, children) for r in todo]
                for fut in cf.as_completed(futures):
                    r = fut.result()
                    done += 1
                    print(f"[{done}/{total}] {r.outcome:8s} {r.name} ({r.seconds:.0f} s)", flush=True)
                    if r.outcome == "failed":
                        why = r.problem or _tail(os.path.join(r.dir, LOG_NAME), r.log_offset)
                        print("    " + why.replace("\n", "\n    "), flush=True)
            except Interrupted as sig:
                stopped_by = str(sig)
                try:
                    print(f"align.sweep {sweep.name}: {stopped_by}, stopping the running runs", flush=True)
                finally:                       # after a hangup, printing may fail: stop the runs all the same
                    children.stop(STOP_GRACE_S)
    finally:
        pool.shutdown(wait=True)
    counts = {k: sum(r.outcome == k for r in sweep.runs) for k in OUTCOMES}
    print(f"align.sweep {sweep.name}: ran {counts['ran']}, resumed {counts['resumed']}, skipped "
          f"{counts['skipped']}, failed {counts['failed']} in {time.time() - start:.0f} s. "
          f"Report: python -m align.report {sweep.out}", flush=True)
    if counts["failed"]:
        print("failed runs (logs): " + ", ".join(os.path.join(r.dir, LOG_NAME) for r in sweep.runs
                                                 if r.outcome == "failed"), flush=True)
    if stopped_by:
        groups = {"finished": ("ran", "resumed", "skipped"), "interrupted": ("interrupted",),
                  "never started": ("not started",)}
        print(f"align.sweep {sweep.name}: stopped by {stopped_by}. " + "; ".join(
            f"{label}: {', '.join(r.name for r in sweep.runs if r.outcome in kinds) or '-'}"
            for label, kinds in groups.items()) + ". Run the same command again to resume.", flush=True)
    return counts


def hydra_commands(sweep: Sweep) -> list[str]:
    """One ``python -m align.run -m ...`` per grid whose job directories are this sweep's run directories."""
    cmds = []
    for g in sweep.grids:
        common = [o for o in sweep.common if _key(o) not in g]
        exclude = sorted(({_key(o) for o in common} | set(keys_with("name")) | {"model", "reward"}) - set(g))
        grid = [f"{k}={','.join(v.partition('=')[2] for v in vals)}" for k, vals in g.items()]
        args = ["python", "-m", "align.run", "-m", *common, *grid, "train.progress=false",
                f"hydra.sweep.dir={os.path.abspath(sweep.out)}",
                f"hydra.job.config.override_dirname.exclude_keys=[{','.join(exclude)}]"]
        cmds.append(shlex.join(args))
    return cmds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m align.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="sweep file (experiments/*.yaml)")
    p.add_argument("overrides", nargs="*", help="extra overrides for every run (join common:)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (default 1)")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids, one per concurrent run (round robin)")
    p.add_argument("--out", default=None, help="sweep directory (default: the file's out, or sweeps/<name>)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; run nothing")
    p.add_argument("--print-hydra", action="store_true",
                   help="print the equivalent Hydra multirun command(s) (add hydra/launcher=... for a cluster)")
    a = p.parse_intermixed_args(argv)
    try:
        sweep = load_sweep(a.file, a.out, a.overrides)
    except (SweepError, OSError, yaml.YAMLError) as err:
        print(f"align.sweep: {err}", file=sys.stderr)
        return 2
    problems = plan(sweep)
    if problems:
        print(f"align.sweep: {'at least ' if len(problems) >= 10 else ''}{len(problems)} of {len(sweep.runs)} "
              "runs cannot start; nothing was run.\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if a.print_hydra:
        print("\n".join(hydra_commands(sweep)))
        return 0
    if a.dry_run:
        for r in sweep.runs:
            note = f" (from step {last_checkpoint_step(r.dir)})" if r.action == "resume" else ""
            print(f"{r.action:6s} {r.name}{note}  [{run_status(r.dir)}]")
        n = {k: sum(r.action == k for r in sweep.runs) for k in ("start", "resume", "skip")}
        print(f"align.sweep {sweep.name}: {len(sweep.runs)} runs valid; would start {n['start']}, resume "
              f"{n['resume']}, skip {n['skip']} (out: {os.path.abspath(sweep.out)})")
        return 0
    counts = execute(sweep, max(1, a.jobs), a.threads, [g for g in a.gpus.split(",") if g])
    if counts["interrupted"] or counts["not started"]:
        return 130
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
