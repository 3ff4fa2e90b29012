"""Atomic, resumable checkpoints: <run_dir>/checkpoints/step_XXXXXXX/{state.pt, state.pt.sha256, finetuned/}.

Writing: each checkpoint is written into a temporary directory and renamed into place, so a crash leaves either
the previous complete checkpoint or the new one, never a half-written one. The last ``keep`` are kept. A write the
disk refuses (full, a file size limit) removes the temporary directory and raises RunWriteError, which says that
the checkpoints already there are intact. ``save_atomically`` writes any other run file (samples_final.pt) the
same way.

Loading: ``state.pt.sha256`` (``sha256sum`` format) tells a damaged state.pt (a disk fault, a copy cut short) from
a good one; loading falls back to the newest intact checkpoint. A state.pt is unpickled with
``torch.load(weights_only=True)``: tensors and plain containers only, so a crafted file cannot run code (its
checksum can be recomputed, so it is no defence there). One holding anything else is refused (UnsafeCheckpoint)
and never unpickled further. A checkpoint also stores the run's resolved config, so a resume can refuse a
config.yaml edited since (``check_same_config``), and ``check_fits`` names the tensors that do not fit a model.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import shutil
import warnings
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError

from align.core.run_dir import (CHECKPOINTS_DIR, CONFIG_FILE, RESUMABLE_KEYS, STATE_FILE, RunMismatch,
                                checkpoint_path, config_differences, list_checkpoints)

DIGEST_SUFFIX = ".sha256"
# What a state.pt must hold for the trainer to resume from it, and for align.evaluate to evaluate it.
RESUME_KEYS = ("step", "model", "algo", "optimizer", "rng", "bad_in_row", "skipped", "elapsed")
EVALUATE_KEYS = ("step", "model")
CONFIG_KEY = "config"           # the run's resolved config (a plain dict); absent in checkpoints of older versions
# What a refused write raises: our own writes (OSError), the inference export's safetensors files.
WRITE_ERRORS = (OSError, SafetensorError)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names its file."""


class DamagedCheckpoint(CheckpointError):
    """A state.pt that does not match its checksum or cannot be read: loading falls back past it."""


class UnsafeCheckpoint(CheckpointError):
    """A state.pt holding objects a checkpoint never holds (unpickling them could run code): it is refused, never
    unpickled, and not fallen back from (someone put it there)."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint that does not fit this run: not align's, trained with another config, other tensors."""


class RunWriteError(RuntimeError):
    """A run file could not be written (a full disk, a file size limit); the message says what is intact."""


# ---- writing ----------------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], keep: int,
                    export: Callable[[str], None] | None = None) -> str:
    """Write ``state`` (torch.save) and, if given, call ``export(dir)`` for inference weights; atomically.

    RunWriteError if the disk refuses a write, TypeError if ``state`` holds objects loading refuses; either way the
    partial checkpoint is removed and the others are untouched."""
    final = checkpoint_path(run_dir, step)
    root, name = os.path.split(final)
    tmp = os.path.join(root, f".tmp_{name}")
    try:
        _write_checkpoint_dir(tmp, state, export)
    except WRITE_ERRORS as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunWriteError(f"could not write the checkpoint of step {step} into {root}: {write_failure(err)}; "
                            f"it was not kept, and {_newest_intact(run_dir)}. Make room, then "
                            f"resume={run_dir} continues from there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    _rotate(run_dir, step, keep)
    return final


def _write_checkpoint_dir(folder: str, state: dict[str, Any], export: Callable[[str], None] | None) -> None:
    """state.pt, its checksum and (``export``) the inference weights, into a new ``folder``."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    data = _serialized(state)
    _refuse_unloadable(data)
    _write_bytes(os.path.join(folder, STATE_FILE), data)
    with open(os.path.join(folder, STATE_FILE + DIGEST_SUFFIX), "w", encoding="utf-8") as fh:
        fh.write(f"{hashlib.sha256(data).hexdigest()}  {STATE_FILE}\n")
    if export is not None:
        export(os.path.join(folder, "finetuned"))


def _rotate(run_dir: str, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step``: newer ones are damaged checkpoints a resume fell back
    from, which must not push the intact ones out before this run overwrites them."""
    older = [s for s in list_checkpoints(run_dir) if s <= step]
    for old in older[:-keep] if keep > 0 else []:
        shutil.rmtree(checkpoint_path(run_dir, old), ignore_errors=True)


def save_atomically(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through ``path.tmp`` and a rename: ``path`` is complete or absent. OSError if the
    disk refuses the write (``path.tmp`` removed, an existing ``path`` untouched)."""
    tmp = path + ".tmp"
    try:
        _write_bytes(tmp, _serialized(obj))
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def _serialized(obj: Any) -> memoryview:
    """``torch.save``'s bytes, made in memory: a refused write is then our own OSError with its errno (torch.save
    into a file reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc]``, without one)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def _refuse_unloadable(data: memoryview) -> None:
    """TypeError, at the first checkpoint rather than at a resume, if the state holds objects that loading
    (weights_only) refuses: e.g. an algorithm's state_dict with numpy values. Reads the pickle, not the tensors."""
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    if unsafe:
        raise TypeError(f"the checkpoint state holds {', '.join(unsafe)}, which loading refuses (weights_only): "
                        "a checkpoint holds tensors, numbers, strings and lists, tuples and dicts of them; store "
                        "those in the algorithm's or model's state instead")


def _write_bytes(path: str, data: memoryview) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def write_failure(err: BaseException) -> str:
    """Why a write failed, for a message: ``no space left on device`` for a full disk."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    if isinstance(err, OSError) and err.errno == errno.EFBIG:
        return "file too large (the file size limit, ulimit -f)"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return _first_line(err)


def _newest_intact(run_dir: str) -> str:
    """Which checkpoint a failed write left as the newest, for a message."""
    steps = list_checkpoints(run_dir)
    return f"the newest checkpoint (step {steps[-1]}) is intact" if steps else "no checkpoint had been written yet"


# ---- loading ----------------------------------------------------------------------------------------------------
def state_file(run_dir: str, step: int) -> str:
    """``<run_dir>/checkpoints/step_XXXXXXX/state.pt``."""
    return os.path.join(checkpoint_path(run_dir, step), STATE_FILE)


def load_latest(run_dir: str, needs: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]] | None:
    """The newest intact checkpoint as (step, state), or None if there is none at all.

    A damaged one (checksum mismatch, or unreadable) is skipped with a warning naming its file; a checkpoint
    without a checksum (older runs) is accepted if it loads. CheckpointError if every checkpoint is damaged;
    UnsafeCheckpoint and CheckpointMismatch (see ``load_step``) are raised, not skipped."""
    steps = list_checkpoints(run_dir)
    for step in reversed(steps):
        try:
            return step, load_step(run_dir, step, needs)
        except DamagedCheckpoint as err:
            warnings.warn(f"{err}; falling back to the previous checkpoint", stacklevel=2)
    if steps:
        raise CheckpointError(f"{run_dir}: no intact checkpoint in {CHECKPOINTS_DIR}/ (see the warnings above); "
                              f"delete {os.path.join(run_dir, CHECKPOINTS_DIR)} to start the run afresh")
    return None


def load_step(run_dir: str, step: int, needs: tuple[str, ...] = ()) -> dict[str, Any]:
    """The state of checkpoint ``step``, verified against its checksum and holding the keys ``needs``.

    DamagedCheckpoint naming the file if it is damaged (checksum mismatch, or unreadable); UnsafeCheckpoint if it
    holds objects a checkpoint never holds; CheckpointMismatch if it is not a dict with the keys ``needs``."""
    path = state_file(run_dir, step)
    problem = _damage(path)
    if problem is not None:
        raise DamagedCheckpoint(f"{path} is damaged ({problem})")
    state = _load_tensors_only(path)
    _check_holds(state, needs, path)
    return state


def _load_tensors_only(path: str) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers, nothing that could run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise UnsafeCheckpoint(
                f"{path} holds objects a checkpoint never holds ({', '.join(unsafe[:3])}); it was refused "
                "before they were created, so nothing in it ran. align did not write it: delete its folder "
                f"{os.path.dirname(path)} (an older checkpoint is then used) unless you know where it came "
                "from") from None
        raise DamagedCheckpoint(f"{path} is damaged ({_first_line(err.__context__ or err)})") from None
    except (RuntimeError, EOFError) as err:   # truncated zip, empty
        raise DamagedCheckpoint(f"{path} is damaged ({_first_line(err)})") from None


def _unsafe_globals(path: str) -> list[str]:
    """The classes and functions ``path``'s pickle names that weights_only refuses (read without unpickling); []
    for a file that is no torch.save zip archive, i.e. damaged."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError):
        return []


def _check_holds(state: Any, needs: tuple[str, ...], path: str) -> None:
    """CheckpointMismatch naming ``path`` and what it lacks, unless ``state`` is a dict holding ``needs``."""
    if not needs:
        return
    advice = (f"align did not write it: move its folder {os.path.dirname(path)} away (an older checkpoint is "
              "then used)")
    if not isinstance(state, dict):
        raise CheckpointMismatch(f"{path} is not a checkpoint: it holds a {type(state).__name__}, not a dict with "
                                 f"{', '.join(needs)}; {advice}")
    missing = [k for k in needs if k not in state]
    if missing:
        held = ", ".join(map(str, list(state)[:8])) or "nothing"
        raise CheckpointMismatch(f"{path} is not a checkpoint: it lacks {', '.join(missing)} (it holds {held}); "
                                 f"{advice}")


def check_resumable(run_dir: str, config: dict[str, Any]) -> None:
    """RunMismatch if the trainer would refuse to resume ``run_dir`` with ``config`` (the newest intact checkpoint
    is unsafe, not a checkpoint, or trained with another config): for a caller to ask before it changes any file
    of the run. The warnings about damaged checkpoints are given with the refusal, else left to the trainer, which
    reads the checkpoints again."""
    with warnings.catch_warnings(record=True) as skipped:
        warnings.simplefilter("always")
        try:
            loaded = load_latest(run_dir, needs=RESUME_KEYS)
            if loaded is not None:
                check_same_config(loaded[1], config, run_dir, state_file(run_dir, loaded[0]))
        except CheckpointError as err:
            refusal = str(err)
        else:
            return
    for w in skipped:
        warnings.warn(w.message, stacklevel=2)
    raise RunMismatch(refusal)


def check_same_config(state: dict[str, Any], config: dict[str, Any] | None, run_dir: str, source: str) -> None:
    """CheckpointMismatch if ``config`` (the run's config.yaml as used now) differs from the config the checkpoint
    ``state`` (from ``source``) was trained with in a key that is not bookkeeping (``align.core.run_dir``'s
    ``rerun`` keys, which include the resumable ones). Checkpoints of older versions store no config: passed."""
    saved = state.get(CONFIG_KEY)
    if saved is None or config is None:
        return
    if not isinstance(saved, dict):
        raise CheckpointMismatch(f"{source} is not a checkpoint: its {CONFIG_KEY} is a {type(saved).__name__}, "
                                 "not a dict")
    diffs = config_differences(saved, config)
    if diffs:
        shown = "; ".join(diffs[:5]) + ("; ..." if len(diffs) > 5 else "")
        raise CheckpointMismatch(
            f"{os.path.join(run_dir, CONFIG_FILE)} differs from the config {source} was trained with ({shown}). "
            f"A run goes on with the config it was trained with: only {', '.join(RESUMABLE_KEYS)} may change "
            f"(resume={run_dir} key=value). Restore the saved values, or start a new run with the new ones")


def check_fits(expected: Mapping[str, torch.Tensor], saved: Any, what: str, source: str) -> None:
    """CheckpointMismatch naming the tensors of ``saved`` (the checkpoint's ``what``, from ``source``) that are
    missing, unexpected or of another shape than ``expected`` (this run's)."""
    if not isinstance(saved, dict):
        raise CheckpointMismatch(f"{source} is not a checkpoint: its {what} is a {type(saved).__name__}, not a dict "
                                 "of tensors")
    problems = [f"{k} is missing" for k in expected if k not in saved]
    problems += [f"{k} is not one of this run's" for k in saved if k not in expected]
    problems += [f"{k} has shape {_shape(saved[k])} there, {_shape(v)} here" for k, v in expected.items()
                 if k in saved and _shape(saved[k]) != _shape(v)]
    if problems:
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        raise CheckpointMismatch(f"{source} does not fit this run's {what} ({shown}): was a size key of config.yaml "
                                 "changed? Restore it, or start a new run")


def _shape(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


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


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
