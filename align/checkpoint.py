"""Atomic, resumable checkpoints: <run_dir>/checkpoints/step_XXXXXXX/{state.pt, finetuned/}.

Each checkpoint is written into a temporary directory and renamed into place, so a crash leaves either
the previous complete checkpoint or the new one, never a half-written one. The last ``keep`` are kept.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

import torch

from align.run_dir import STATE_FILE, checkpoint_path, list_checkpoints


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], keep: int,
                    export: Any = None) -> str:
    """Write ``state`` (torch.save) and, if given, call ``export(dir)`` for inference weights; atomically."""
    final = checkpoint_path(run_dir, step)
    root, name = os.path.split(final)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp_{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(state, os.path.join(tmp, STATE_FILE))
    if export is not None:
        export(os.path.join(tmp, "finetuned"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(checkpoint_path(run_dir, old), ignore_errors=True)
    return final


def load_latest(run_dir: str) -> tuple[int, dict[str, Any]] | None:
    """The newest complete checkpoint as (step, state), or None."""
    steps = list_checkpoints(run_dir)
    if not steps:
        return None
    path = os.path.join(checkpoint_path(run_dir, steps[-1]), STATE_FILE)
    return steps[-1], torch.load(path, map_location="cpu", weights_only=False)
