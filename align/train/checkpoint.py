"""Atomic, resumable checkpoints: <run_dir>/checkpoints/step_XXXXXXX/{state.pt, state.pt.sha256, finetuned/}.

Each checkpoint is written into a temporary directory and renamed into place, so a crash leaves either
the previous complete checkpoint or the new one, never a half-written one. The last ``keep`` are kept.
``state.pt.sha256`` (``sha256sum`` format) lets loading tell a damaged state.pt (a disk fault, a copy cut
short) from a good one; loading falls back to the newest intact checkpoint.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import warnings
from typing import Any

import torch

from align.core.run_dir import CHECKPOINTS_DIR, STATE_FILE, checkpoint_path, list_checkpoints

DIGEST_SUFFIX = ".sha256"


class CheckpointError(ValueError):
    """No checkpoint of a run directory can be loaded."""


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], keep: int,
                    export: Any = None) -> str:
    """Write ``state`` (torch.save) and, if given, call ``export(dir)`` for inference weights; atomically."""
    final = checkpoint_path(run_dir, step)
    root, name = os.path.split(final)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp_{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state_path = os.path.join(tmp, STATE_FILE)
    torch.save(state, state_path)
    with open(state_path + DIGEST_SUFFIX, "w", encoding="utf-8") as fh:
        fh.write(f"{_sha256(state_path)}  {STATE_FILE}\n")
    if export is not None:
        export(os.path.join(tmp, "finetuned"))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    # Rotate among the steps up to this one: newer ones are damaged checkpoints a resume fell back from, which
    # must not push the intact ones out before this run overwrites them.
    older = [s for s in list_checkpoints(run_dir) if s <= step]
    for old in older[:-keep] if keep > 0 else []:
        shutil.rmtree(checkpoint_path(run_dir, old), ignore_errors=True)
    return final


def load_latest(run_dir: str) -> tuple[int, dict[str, Any]] | None:
    """The newest intact checkpoint as (step, state), or None if there is none at all.

    A damaged one (checksum mismatch, or unreadable) is skipped with a warning naming its file; a checkpoint
    without a checksum (older runs) is accepted if it loads. CheckpointError if every checkpoint is damaged."""
    steps = list_checkpoints(run_dir)
    for step in reversed(steps):
        try:
            return step, load_step(run_dir, step)
        except CheckpointError as err:
            warnings.warn(f"{err}; falling back to the previous checkpoint", stacklevel=2)
    if steps:
        raise CheckpointError(f"{run_dir}: no intact checkpoint in {CHECKPOINTS_DIR}/ (see the warnings above); "
                              f"delete {os.path.join(run_dir, CHECKPOINTS_DIR)} to start the run afresh")
    return None


def load_step(run_dir: str, step: int) -> dict[str, Any]:
    """The state of checkpoint ``step``, verified against its checksum; CheckpointError naming the file if it is
    damaged (checksum mismatch, or unreadable)."""
    path = os.path.join(checkpoint_path(run_dir, step), STATE_FILE)
    problem = _damage(path)
    if problem is None:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as err:   # truncated zip, garbage, empty
            problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    raise CheckpointError(f"{path} is damaged ({problem})")


def _damage(path: str) -> str | None:
    """Why ``path`` does not match its checksum file, or None (also when there is no checksum file)."""
    digest = path + DIGEST_SUFFIX
    if not os.path.exists(digest):
        return None
    with open(digest, encoding="utf-8") as fh:
        expected = (fh.read().split() or [""])[0]
    return None if _sha256(path) == expected else f"its sha256 differs from {os.path.basename(digest)}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):   # hashlib.file_digest is Python ≥ 3.11
            h.update(block)
    return h.hexdigest()
