"""Atomic, resumable checkpoints: <run_dir>/checkpoints/step_XXXXXXX/{state.pt, finetuned/}.

Each checkpoint is written into a temporary directory and renamed into place, so a crash leaves either
the previous complete checkpoint or the new one, never a half-written one. The last ``keep`` are kept.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Any

import torch

_PATTERN = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], keep: int,
                    export: Any = None) -> str:
    """Write ``state`` (torch.save) and, if given, call ``export(dir)`` for inference weights; atomically."""
    root = checkpoint_dir(run_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:07d}")
    tmp = os.path.join(root, f".tmp_step_{step:07d}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(state, os.path.join(tmp, "state.pt"))
    if export is not None:
        export(os.path.join(tmp, "finetuned"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, f"step_{old:07d}"), ignore_errors=True)
    return final


def list_checkpoints(run_dir: str) -> list[int]:
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    steps = [int(m.group(1)) for name in os.listdir(root) if (m := _PATTERN.match(name))
             and os.path.exists(os.path.join(root, name, "state.pt"))]
    return sorted(steps)


def load_latest(run_dir: str) -> tuple[int, dict[str, Any]] | None:
    steps = list_checkpoints(run_dir)
    if not steps:
        return None
    path = os.path.join(checkpoint_dir(run_dir), f"step_{steps[-1]:07d}", "state.pt")
    return steps[-1], torch.load(path, map_location="cpu", weights_only=False)
