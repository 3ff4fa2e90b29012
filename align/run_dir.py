"""The run directory, a contract that the trainer writes and that runs, sweeps and reports read::

    <run_dir>/config.yaml                          the fully resolved config
    <run_dir>/metrics.jsonl                        one JSON object per line ({"step", ...}; eval rows add "eval/*")
    <run_dir>/tb/                                  TensorBoard events
    <run_dir>/samples/step_XXXXXXX.png             sample grids (and latest.png)
    <run_dir>/samples_final.pt                     the final model's samples; written last, so it marks a finished run
    <run_dir>/checkpoints/step_XXXXXXX/state.pt    atomic, resumable checkpoints

Here too: a run's status, what a re-run into an existing directory does (start, resume or skip), and the one
table of bookkeeping keys (config keys that do not make two runs different experiments).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Literal

from omegaconf import OmegaConf

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
SAMPLES_DIR = "samples"
FINISHED_FILE = "samples_final.pt"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.pt"
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
    "run_dir": ("rerun", "group", "name"),
    "resume": ("rerun", "group", "name"),
    "threads": ("rerun", "group", "name"),
    "train.steps": ("resume", "rerun"),
    "train.progress": ("resume", "rerun", "group", "name"),
    "train.checkpoint_every": ("resume", "rerun", "group"),
    "train.keep_checkpoints": ("resume", "rerun", "group"),
    "device": ("resume", "rerun", "group", "name"),
}


def keys_with(role: Role) -> tuple[str, ...]:
    """The bookkeeping keys that have ``role`` (see ROLES), in table order."""
    return tuple(k for k, roles in BOOKKEEPING.items() if role in roles)


RESUMABLE_KEYS = keys_with("resume")
# Keys added after runs were saved without them: an absent key equals the behaviour those runs had.
ABSENT_MEANS = {"eval.fid_reference": "paired", "model.fid_reference": "paired"}


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
    """``flatten(cfg)`` with the keys a run saved before they existed filled in as ABSENT_MEANS says."""
    return {**ABSENT_MEANS, **flatten(cfg)}


def read_config(run_dir: str, resolve: bool = True) -> dict:
    """``<run_dir>/config.yaml`` as a plain nested dict."""
    return OmegaConf.to_container(OmegaConf.load(os.path.join(run_dir, CONFIG_FILE)), resolve=resolve)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The rows of ``<run_dir>/metrics.jsonl``, up to a line cut short by an interrupted run."""
    rows = []
    with open(os.path.join(run_dir, METRICS_FILE), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return rows


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


# ---- an existing run directory: skip, resume or start afresh --------------------------------------------------
RunStatus = Literal["new", "partial", "checkpoint", "finished"]


class RunMismatch(ValueError):
    """The run directory holds a run of a different config."""


def run_status(run_dir: str) -> RunStatus:
    """``new`` (nothing there), ``partial`` (started, no checkpoint), ``checkpoint`` or ``finished``."""
    if os.path.exists(os.path.join(run_dir, FINISHED_FILE)):
        return "finished"
    if list_checkpoints(run_dir):
        return "checkpoint"
    if any(os.path.exists(os.path.join(run_dir, f)) for f in PARTIAL_FILES):
        return "partial"
    return "new"


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


def plan_existing_run(run_dir: str, requested: dict) -> Literal["start", "skip", "resume"]:
    """What to do with ``run_dir`` for the (resolved) ``requested`` config: ``start``, ``skip`` or ``resume``.

    Raises RunMismatch if the directory holds a run of another config, or one trained beyond train.steps."""
    status = run_status(run_dir)
    if status in ("new", "partial"):
        return "start"
    if not os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
        raise RunMismatch(f"{run_dir} has checkpoints but no {CONFIG_FILE}; move it away or delete it")
    saved = read_config(run_dir)
    diffs = config_differences(saved, requested)
    if diffs:
        shown = "; ".join(diffs[:5]) + ("; ..." if len(diffs) > 5 else "")
        raise RunMismatch(f"{run_dir} holds a run of a different config ({shown}). Use another run_dir "
                          f"(or sweep out=), or delete that directory to redo it")
    want, done = int(requested["train"]["steps"]), int(saved["train"]["steps"])
    ckpt = last_checkpoint_step(run_dir) or 0
    if want < ckpt:
        raise RunMismatch(f"{run_dir} is already trained to step {ckpt}, beyond the requested train.steps={want}")
    if status == "finished" and want == done:
        return "skip"
    return "resume"


def clear_partial_run(run_dir: str) -> None:
    """Remove what an interrupted run without a checkpoint left behind (a fresh start appends to nothing)."""
    for f in PARTIAL_FILES:
        p = os.path.join(run_dir, f)
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.exists(p):
            os.remove(p)
