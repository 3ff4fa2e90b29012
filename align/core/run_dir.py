"""The run directory, a contract that the trainer writes and that runs, sweeps and reports read::

    <run_dir>/.align-run                           our marker, written first: {"format", "created", "pid", "host"}
    <run_dir>/.align-run.lock, .align-run.pid      the writer's lock (held for the life of a run) and its holder
    <run_dir>/config.yaml                          the fully resolved config
    <run_dir>/metrics.jsonl                        one JSON object per line ({"step", ...}; eval rows add "eval/*")
    <run_dir>/tb/                                  TensorBoard events
    <run_dir>/samples/step_XXXXXXX.png             sample grids (and latest.png)
    <run_dir>/samples_final.pt                     the final model's samples, written last
    <run_dir>/checkpoints/step_XXXXXXX/state.pt    atomic, resumable checkpoints (+ state.pt.sha256)

Only a directory of ours is ever cleared: one with the marker, or one written before the marker existed (a
config.yaml and a checkpoint). A run is finished when samples_final.pt exists and the run reached config.yaml's
train.steps: metrics.jsonl has the evaluation row of that step, or the newest checkpoint is at that step. So a
finished run stays finished when its checkpoints are deleted (a re-run skips it; it cannot be extended).

One process decides about a directory at a time: a run takes the writer's lock before it looks at what the
directory holds (own_run_dir), and only the holder of the lock changes or removes anything in it.

Here too: a run's status, what a re-run into an existing directory does (start, resume or skip), and the one
table of bookkeeping keys (config keys that do not make two runs different experiments).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal

import yaml
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
SAMPLES_DIR = "samples"
FINISHED_FILE = "samples_final.pt"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.pt"
MARKER_FILE = ".align-run"
MARKER_FORMAT = 1
LOCK_FILE = ".align-run.lock"
HOLDER_FILE = ".align-run.pid"
# What a partial run leaves behind; removed before a fresh start (anything else, e.g. a sweep's log, is kept).
PARTIAL_FILES = (METRICS_FILE, CONFIG_FILE, TB_DIR, SAMPLES_DIR, CHECKPOINTS_DIR, FINISHED_FILE + ".tmp")
_STEP_DIR = re.compile(r"^step_(\d+)$")

# ---- bookkeeping keys ---------------------------------------------------------------------------------------
Role = Literal["resume", "rerun", "group", "name"]
ROLES: dict[Role, str] = {
    "resume": "may be changed when resuming (resume=<run_dir> key=value)",
    "rerun": "ignored when a re-run is compared with the saved config.yaml (a larger train.steps extends the run)",
    "group": "ignored when the report groups runs into experiments (the seeds of one experiment are averaged)",
    "name": "left out of a run's directory name (Hydra's override_dirname.exclude_keys, align.sweep)",
}
BOOKKEEPING: dict[str, tuple[Role, ...]] = {
    "seed": ("group",),
    "default_reward": ("rerun", "group"),     # the domain preset's; only chooses reward= (compared itself)
    "run_dir": ("rerun", "group", "name"),
    "resume": ("rerun", "group", "name"),
    "threads": ("rerun", "group", "name"),
    "train.steps": ("resume", "rerun"),
    "train.progress": ("resume", "rerun", "group", "name"),
    "train.checkpoint_every": ("resume", "rerun", "group"),
    "train.keep_checkpoints": ("resume", "rerun", "group"),
    "train.max_bad_steps": ("resume", "rerun", "group"),       # the divergence guard's advice, on resume
    "train.max_param_growth": ("resume", "rerun", "group"),
    "device": ("resume", "rerun", "group", "name"),
    "train.collective_timeout_s": ("resume", "rerun", "group", "name"),
    "eval.batch_size": ("resume", "rerun", "group", "name"),     # rows per sampling chunk: the same samples
}


def keys_with(role: Role) -> tuple[str, ...]:
    """The bookkeeping keys that have ``role`` (see ROLES), in table order."""
    return tuple(k for k, roles in BOOKKEEPING.items() if role in roles)


RESUMABLE_KEYS = keys_with("resume")
# Keys added after runs were saved without them: an absent key equals the behaviour those runs had.
ABSENT_MEANS = {"eval.fid_reference": "paired", "model.fid_reference": "paired",
                "algo.fd_terms": "separate"}     # VGG-Flow before the space-time difference
# Keys that configs saved by earlier versions carry and that are no longer settings (the domain presets,
# align/conf/preset/, align/setup/paper_settings.py and the root's prompts / sampler.shift hold them now): dropped when
# such a config.yaml is typed again (align.core.schema.typed_config) or compared with a re-run (flat_config).
RETIRED_KEYS = tuple(f"model.{k}" for k in ("default_reward", "train_steps", "batch_size", "eval_every",
                                            "eval_samples", "vggflow_beta", "vggflow_alpha", "am_beta",
                                            "fid_reference", "prompts", "sampler_shift")) + ("reward.domain",)


# ---- reading ------------------------------------------------------------------------------------------------
def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config as one level of dotted keys (``{"train": {"lr": 1}}`` → ``{"train.lr": 1}``)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def flat_config(cfg: dict) -> dict:
    """``flatten(cfg)`` with the keys a run saved before they existed filled in as ABSENT_MEANS says, and the
    RETIRED_KEYS left out."""
    return {k: v for k, v in {**ABSENT_MEANS, **flatten(cfg)}.items() if k not in RETIRED_KEYS}


def read_config(run_dir: str, resolve: bool = True) -> dict:
    """``<run_dir>/config.yaml`` as a plain nested dict."""
    return OmegaConf.to_container(OmegaConf.load(os.path.join(run_dir, CONFIG_FILE)), resolve=resolve)


def _metric_lines(run_dir: str) -> Iterator[tuple[dict[str, Any], str]]:
    """Each row of metrics.jsonl with its line, up to a line cut short by an interrupted run."""
    with open(os.path.join(run_dir, METRICS_FILE), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return
                yield row, line if line.endswith("\n") else line + "\n"


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The rows of ``<run_dir>/metrics.jsonl``, up to a line cut short by an interrupted run."""
    return [row for row, _ in _metric_lines(run_dir)]


def truncate_metrics(run_dir: str, step: int) -> None:
    """Keep the rows up to ``step`` (a resume from that checkpoint writes the rest again), drop a torn line."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        fh.writelines(line for row, line in _metric_lines(run_dir) if row["step"] <= step)
    os.replace(path + ".tmp", path)


def checkpoint_path(run_dir: str, step: int) -> str:
    """``<run_dir>/checkpoints/step_XXXXXXX`` (the checkpoint's directory)."""
    return os.path.join(run_dir, CHECKPOINTS_DIR, f"step_{step:07d}")


def list_checkpoints(run_dir: str) -> list[int]:
    """The steps of the complete checkpoints (a ``state.pt`` in ``checkpoints/step_*/``), ascending."""
    root = os.path.join(run_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(root) if (m := _STEP_DIR.match(name))
                  and os.path.exists(os.path.join(root, name, STATE_FILE)))


def last_checkpoint_step(run_dir: str) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    steps = list_checkpoints(run_dir)
    return steps[-1] if steps else None


# ---- whose directory: the marker and the writer's lock -----------------------------------------------------
class RunMismatch(ValueError):
    """The run directory cannot take this run: another config, trained beyond it, not ours, or being written."""


def is_ours(run_dir: str) -> bool:
    """The marker is there, or a run of before the marker: a config.yaml and a checkpoint."""
    return (os.path.exists(os.path.join(run_dir, MARKER_FILE))
            or (os.path.isfile(os.path.join(run_dir, CONFIG_FILE)) and bool(list_checkpoints(run_dir))))


def run_files(run_dir: str) -> list[str]:
    """What ``run_dir`` holds besides the marker and the lock's files (``.align-run*``: a folder holding only
    those is empty, one that another process may be claiming right now); [] if it does not exist."""
    if not os.path.isdir(run_dir):
        return []
    return [name for name in os.listdir(run_dir) if not name.startswith(MARKER_FILE)]


def check_ours(run_dir: str) -> None:
    """RunMismatch if ``run_dir`` is a non-empty folder (see run_files) that align did not write."""
    if run_files(run_dir) and not is_ours(run_dir):
        raise RunMismatch(f"run_dir={run_dir} is a non-empty folder that align did not create (no {MARKER_FILE}); "
                          "nothing was changed. Use a new or empty run_dir, or move its files away")


def claim_run_dir(run_dir: str) -> None:
    """Create ``run_dir`` (or adopt an empty or older one of ours) and write the marker first; see check_ours."""
    check_ours(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    marker = os.path.join(run_dir, MARKER_FILE)
    if not os.path.exists(marker):
        _write_json(marker, {"format": MARKER_FORMAT, **_whoami()})


def _write_json(path: str, obj: dict) -> None:
    """Write ``path`` whole or not at all (a reader never sees half of it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


@contextmanager
def own_run_dir(run_dir: str) -> Iterator[bool]:
    """Be the one process that decides about ``run_dir`` for the block: refuse a user's folder (before anything
    is written into it), take the writer's lock (RunMismatch naming the holder if another process has it), and
    only then look at the folder again and write the marker. Yields whether this process claimed an empty
    folder (no marker, no run files): only then may it discard it, and only inside the block."""
    check_ours(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with hold_run_dir(run_dir):
        claimed = not run_files(run_dir) and not os.path.exists(os.path.join(run_dir, MARKER_FILE))
        claim_run_dir(run_dir)          # checks again, now that no other run can be writing it
        yield claimed


def discard_if_unused(run_dir: str) -> None:
    """Remove ``run_dir`` if it holds nothing but the marker and the lock (a run that failed before any work).

    Only for a folder this process claimed empty, while it still holds the lock (inside own_run_dir): a directory
    that another process holds, has claimed or has written into is never removed."""
    if os.path.isdir(run_dir) and not run_files(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)


def _whoami() -> dict[str, Any]:
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), "host": socket.gethostname()}


@contextmanager
def hold_run_dir(run_dir: str) -> Iterator[None]:
    """Hold ``run_dir``'s writer lock for the block; RunMismatch naming the holder's pid if another process has
    it. The kernel releases the lock when its process dies, also on kill -9. Take it in one process per run
    (rank 0): the lock is per process, and the other ranks follow rank 0's decisions (align.run.SharedPlan)."""
    lock = FileLock(os.path.join(run_dir, LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunMismatch(f"{run_dir} is being written by {_holder(run_dir)}; one writer per run directory: "
                          "wait for it to end or stop it") from None
    holder = os.path.join(run_dir, HOLDER_FILE)
    try:
        _write_json(holder, _whoami())
        yield
    finally:
        if os.path.exists(holder):
            os.remove(holder)
        lock.release()


def _holder(run_dir: str) -> str:
    try:
        with open(os.path.join(run_dir, HOLDER_FILE), encoding="utf-8") as fh:
            h = json.load(fh)
        return f"pid {h['pid']} on {h['host']} (since {h['created']})"
    except (OSError, ValueError, KeyError):
        return "another process (its pid is not written yet)"


# ---- an existing run directory: skip, resume or start afresh --------------------------------------------------
RunStatus = Literal["new", "partial", "checkpoint", "finished"]


def run_status(run_dir: str) -> RunStatus:
    """``new`` (nothing there), ``partial`` (started, no checkpoint), ``checkpoint`` or ``finished``
    (is_finished, with or without checkpoints)."""
    if is_finished(run_dir):
        return "finished"
    if last_checkpoint_step(run_dir) is not None:
        return "checkpoint"
    if any(os.path.exists(os.path.join(run_dir, f)) for f in PARTIAL_FILES):
        return "partial"
    return "new"


def is_finished(run_dir: str, rows: list[dict[str, Any]] | None = None) -> bool:
    """samples_final.pt exists (written last) and the run reached config.yaml's train.steps: metrics.jsonl
    (``rows``, if already read) has that step's evaluation row, or the newest checkpoint is at that step."""
    steps = _saved_steps(run_dir)
    if steps is None or not os.path.exists(os.path.join(run_dir, FINISHED_FILE)):
        return False
    if last_checkpoint_step(run_dir) == steps:
        return True
    if rows is None:
        rows = read_metrics(run_dir) if os.path.exists(os.path.join(run_dir, METRICS_FILE)) else []
    return any(row.get("step") == steps and any(k.startswith("eval/") for k in row) for row in rows)


def _saved_steps(run_dir: str) -> int | None:
    try:
        return int(OmegaConf.select(OmegaConf.load(os.path.join(run_dir, CONFIG_FILE)), "train.steps"))
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        return None


def config_differences(saved: dict, requested: dict) -> list[str]:
    """``key: saved X, requested Y`` for every key that differs, except the ``rerun`` bookkeeping keys."""
    a, b = flat_config(saved), flat_config(requested)
    ignored = keys_with("rerun")
    diffs = []
    for k in sorted(set(a) | set(b), key=lambda k: (not k.endswith(".name"), k)):   # algo/model/reward first
        if k in ignored:
            continue
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb and not (isinstance(va, (int, float)) and isinstance(vb, (int, float)) and float(va) == float(vb)):
            diffs.append(f"{k}: saved {va!r}, requested {vb!r}")
    return diffs


def plan_existing_run(run_dir: str, requested: dict,
                      saved_paths: Callable[[DictConfig], DictConfig] | None = None) -> Literal["start", "skip", "resume"]:
    """What to do with ``run_dir`` for the (resolved) ``requested`` config: ``start``, ``skip`` or ``resume``.

    ``saved_paths`` reads the saved config's relative paths as the requested config's were read
    (``align.setup.paths.absolute_paths``: against this working directory), so that a run saved by a version
    that kept relative paths is still the same config when re-run from the directory it was started in.
    Raises RunMismatch if the directory is not ours, or holds a run of another config, one trained beyond
    train.steps, or a finished run without a checkpoint to extend."""
    check_ours(run_dir)
    status = run_status(run_dir)
    if status in ("new", "partial"):
        refuse_restarting(run_dir)
        return "start"
    if not os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
        raise RunMismatch(f"{run_dir} has checkpoints but no {CONFIG_FILE}; move it away or delete it")
    saved = read_config(run_dir)
    if saved_paths is not None:
        saved = OmegaConf.to_container(saved_paths(OmegaConf.create(saved)), resolve=True)
    diffs = config_differences(saved, requested)
    if diffs:
        shown = "; ".join(diffs[:5]) + ("; ..." if len(diffs) > 5 else "")
        raise RunMismatch(f"{run_dir} holds a run of a different config ({shown}). Use another run_dir "
                          f"(or sweep out=), or delete that directory to redo it")
    want, done = int(requested["train"]["steps"]), int(saved["train"]["steps"])
    if status == "finished" and want == done:
        return "skip"
    refuse_shrinking(run_dir, want)
    refuse_extending_without_checkpoint(run_dir, want)
    return "resume"


def refuse_restarting(run_dir: str) -> None:
    """RunMismatch if a start from step 0 would overwrite a finished run's samples_final.pt: a run whose checkpoints
    and the end of its metrics.jsonl were removed no longer counts as finished (is_finished) and looks partial."""
    if os.path.exists(os.path.join(run_dir, FINISHED_FILE)):
        raise RunMismatch(f"{run_dir} has the {FINISHED_FILE} of a finished run, but neither a checkpoint nor the "
                          f"{METRICS_FILE} rows up to its train.steps; nothing was changed. Move {FINISHED_FILE} "
                          "away to train it again from step 0, or use another run_dir")


def trained_to(run_dir: str) -> int:
    """The step ``run_dir`` is trained to: its newest checkpoint's, or train.steps if it is finished without one."""
    last = last_checkpoint_step(run_dir) or 0
    return max(last, _saved_steps(run_dir) or 0) if is_finished(run_dir) else last


def refuse_shrinking(run_dir: str, steps: int) -> None:
    """RunMismatch if ``run_dir`` is trained beyond ``steps`` (trained_to)."""
    done = trained_to(run_dir)
    if steps < done:
        raise RunMismatch(f"{run_dir} is already trained to step {done}, beyond the requested train.steps={steps}")


def refuse_extending_without_checkpoint(run_dir: str, steps: int) -> None:
    """RunMismatch if ``run_dir`` is finished without a checkpoint and ``steps`` goes beyond it: the extension
    would train it again from step 0 and overwrite its metrics.jsonl."""
    done = trained_to(run_dir)
    if steps > done and last_checkpoint_step(run_dir) is None and is_finished(run_dir):
        raise RunMismatch(f"{run_dir} finished at step {done} and keeps no checkpoint ({CHECKPOINTS_DIR}/ was "
                          f"removed), so it cannot be extended to train.steps={steps}: that would train it again "
                          f"from step 0 over its {METRICS_FILE}; nothing was changed. Train the longer run into a "
                          f"new run_dir (or sweep out=)")


def prepare_resume(run_dir: str, steps: int) -> int | None:
    """Ready ``run_dir`` for a resume to ``steps`` before the trainer starts; the newest checkpoint's step.

    Without a checkpoint the run starts afresh (clear_partial_run), unless it is finished (RunMismatch: its
    metrics are never overwritten); else metrics.jsonl keeps the rows up to the checkpoint, and an extended
    finished run loses samples_final.pt first, so an interrupted extension is not finished. RunMismatch if
    ``steps`` is below what the run is trained to (config.yaml is left as it is)."""
    refuse_shrinking(run_dir, steps)
    refuse_extending_without_checkpoint(run_dir, steps)
    last = last_checkpoint_step(run_dir)
    if last is None:
        if is_finished(run_dir):
            raise RunMismatch(f"{run_dir} is finished and keeps no checkpoint to resume from; nothing was changed. "
                              f"Its results are complete (re-run it with run_dir= to skip it), or train again into "
                              f"a new run_dir")
        clear_partial_run(run_dir)
        return None
    truncate_metrics(run_dir, last)
    final = os.path.join(run_dir, FINISHED_FILE)
    if steps > last and os.path.exists(final):
        os.remove(final)
    return last


def clear_partial_run(run_dir: str) -> None:
    """Remove what an interrupted run without a checkpoint left behind (a fresh start appends to nothing): only
    the files a run writes (PARTIAL_FILES), only in a directory of ours (RunMismatch otherwise), and never next
    to a finished run's samples_final.pt (RunMismatch: a finished run whose metrics.jsonl lost its end)."""
    check_ours(run_dir)
    refuse_restarting(run_dir)
    for f in PARTIAL_FILES:
        p = os.path.join(run_dir, f)
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.exists(p):
            os.remove(p)
