"""Checkpoints are safe to load and to write. A crafted state.pt is refused without being unpickled; a config.yaml
edited since the checkpoint was written is refused naming the key (older checkpoints, without a stored config:
naming the parameter or the learning rate); a foreign state.pt names what it lacks; a write the disk refuses stops
the run naming the folder, with the newest checkpoint intact. Each time the run's files stay as they were, and the
run then resumes exactly. On the tiny gmm: resume=, re-runs and align.evaluate as the command line runs them
(tests/helpers/cli.py), and in real processes where the case is about one: a crafted file given to a fresh
``python -m align.run``, and a file size limit (RLIMIT_FSIZE: the write fails with a real EFBIG)."""
import errno
import hashlib
import os
import re
import shutil
import textwrap

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import align.train.checkpoint as checkpoint
from align.core.run_dir import FINISHED_FILE, list_checkpoints, read_config, read_metrics, run_status
from align.evaluate import main as evaluate_main
from align.train.checkpoint import CheckpointError, load_latest, load_step, save_checkpoint
from helpers.cli import Result, align_run, run_main, subprocess_run

TINY = ["model=gmm", "reward=linear", "train.batch_size=4", "eval.n_samples=16", "eval.final_samples=8", "threads=1",
        "train.progress=false", "train.steps=3", "train.checkpoint_every=1", "eval.every=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted run of TINY: checkpoints at steps 1, 2 and 3, finished. Tests change copies of it, and a
    run resumed after the change must end as this one did."""
    run = tmp_path_factory.mktemp("checkpoint_safety") / "trained"
    res = align_run(*TINY, f"run_dir={run}")
    assert res.returncode == 0, res.stderr
    return run


def _copy(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def _resume(run, *extra: str) -> Result:
    return align_run(f"resume={run}", "train.progress=false", *extra)


def _evaluate(run) -> Result:
    return run_main(evaluate_main, [str(run), "--out", str(run.parent / "evaluated")])


def _refusal(res: Result, prefix: str = "align: ") -> str:
    """The one line of a refusal (exit code 2, no traceback)."""
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, res.stderr
    return lines[0]


def _state_file(run, step: int) -> str:
    return os.path.join(run, "checkpoints", f"step_{step:07d}", "state.pt")


def _rewrite_state(run, step: int, state) -> str:
    """Replace checkpoint ``step``'s state.pt by ``state``, with a matching checksum (anyone can compute one)."""
    path = _state_file(run, step)
    torch.save(state, path)
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    with open(path + ".sha256", "w") as fh:
        fh.write(f"{digest}  state.pt\n")
    return path


def _edit_config(run, key: str, value) -> None:
    cfg = OmegaConf.load(run / "config.yaml")
    OmegaConf.update(cfg, key, value)
    OmegaConf.save(cfg, run / "config.yaml")


def _files(folder) -> dict[str, bytes]:
    """Every file under ``folder`` with its contents."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as fh:
                out[os.path.relpath(os.path.join(root, name), folder)] = fh.read()
    return out


def _rows(run) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(str(run))]


def _samples(run) -> torch.Tensor:
    return torch.load(run / FINISHED_FILE, weights_only=True)["x1"]


def _resumes_exactly(run, trained, *extra: str) -> None:
    """``resume=run`` finishes the run as the uninterrupted ``trained`` did: the same rows, the same samples."""
    res = _resume(run, *extra)
    assert res.returncode == 0, res.stderr
    assert _rows(run) == _rows(trained) and torch.equal(_samples(run), _samples(trained))
    assert run_status(str(run)) == "finished"


class _MakesDir:
    """Unpickling this calls ``os.mkdir(path)``: what a crafted state.pt could do instead (``os.system``, ...)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


# ---- A: a crafted state.pt ----------------------------------------------------------------------------------
def test_a_crafted_state_pt_is_refused_unopened_by_resume_rerun_and_evaluate(trained, tmp_path):
    run = _copy(trained, tmp_path)
    ran = tmp_path / "the_pickle_ran"
    good = torch.load(_state_file(run, 3), weights_only=True)
    crafted = _rewrite_state(run, 3, {**good, "extra": _MakesDir(str(ran))})
    before = _files(run)
    said = f"{crafted} holds objects a checkpoint never holds (posix.mkdir); it was refused before they were " \
           "created, so nothing in it ran"

    child = subprocess_run("align.run", [f"resume={run}", "train.steps=4", "train.progress=false"])
    assert said in _refusal(Result(child.returncode, child.stdout, child.stderr))
    rerun = align_run(*TINY, "train.steps=4", f"run_dir={run}")            # a sweep's re-run resumes the same way
    assert said in _refusal(rerun)
    assert said in _refusal(_evaluate(run), "align.evaluate: ")
    assert not ran.exists()
    assert _files(run) == before        # the extension was refused before samples_final.pt or metrics were touched

    shutil.rmtree(os.path.dirname(crafted))                                # as the message advises
    os.remove(run / FINISHED_FILE)
    _resumes_exactly(run, trained)


def test_an_unsafe_checkpoint_is_not_fallen_back_from(tmp_path):
    ran = tmp_path / "the_pickle_ran"
    for step in (1, 2):
        save_checkpoint(str(tmp_path), step, {"step": step}, keep=0)
    _rewrite_state(tmp_path, 2, {"step": 2, "x": _MakesDir(str(ran))})
    with pytest.raises(CheckpointError, match="step_0000002/state.pt holds objects a checkpoint never holds"):
        load_latest(str(tmp_path))
    assert not ran.exists() and load_step(str(tmp_path), 1) == {"step": 1}


def test_a_state_that_loading_would_refuse_is_never_written(tmp_path):
    """An algorithm whose state_dict holds, say, numpy values fails at its first checkpoint, not at a resume."""
    save_checkpoint(str(tmp_path), 1, {"step": 1}, keep=0)
    with pytest.raises(TypeError, match="the checkpoint state holds .*numpy.*which loading refuses"):
        save_checkpoint(str(tmp_path), 2, {"step": 2, "beta": np.float64(0.5)}, keep=0)
    assert os.listdir(tmp_path / "checkpoints") == ["step_0000001"]


# ---- B: config.yaml edited since the checkpoint -----------------------------------------------------------------
def test_an_edited_learning_rate_is_refused_and_a_resumable_key_is_not(trained, tmp_path):
    run = _copy(trained, tmp_path)
    lr = read_config(str(run))["train"]["lr"]
    _edit_config(run, "train.lr", 0.01)
    before = _files(run)
    for res, prefix in ((_resume(run, "train.steps=4"), "align: "),
                        (align_run(*TINY, "train.steps=4", "train.lr=0.01", f"run_dir={run}"), "align: "),
                        (_evaluate(run), "align.evaluate: ")):
        line = _refusal(res, prefix)
        assert f"{run}/config.yaml differs from the config {_state_file(run, 3)} was trained with" in line
        assert f"train.lr: saved {lr!r}, requested 0.01" in line
        assert "only train.steps, train.progress, " in line and f"(resume={run} key=value)" in line
    assert _files(run) == before

    _edit_config(run, "train.lr", lr)
    shutil.rmtree(os.path.dirname(_state_file(run, 3)))
    _resumes_exactly(run, trained, "train.steps=3", "train.keep_checkpoints=5")   # resumable keys may change


def test_an_edited_model_size_is_one_line_naming_the_key(trained, tmp_path):
    run = _copy(trained, tmp_path)
    hidden = read_config(str(run))["model"]["hidden"]
    _edit_config(run, "model.hidden", hidden // 2)
    before = _files(run)
    said = f"model.hidden: saved {hidden}, requested {hidden // 2}"
    assert said in _refusal(_resume(run, "train.steps=4"))
    assert said in _refusal(_evaluate(run), "align.evaluate: ")
    assert _files(run) == before


def test_a_checkpoint_without_a_stored_config_names_the_parameter_and_the_learning_rate(trained, tmp_path):
    """Checkpoints written before the config was stored in them: the model's tensors name a size change, AdamW's
    saved learning rate a changed train.lr; unchanged, such a checkpoint resumes exactly."""
    run = _copy(trained, tmp_path)
    for step in list_checkpoints(str(run)):
        state = torch.load(_state_file(run, step), weights_only=True)
        state.pop("config", None)
        _rewrite_state(run, step, state)
    cfg = read_config(str(run))
    hidden, lr = cfg["model"]["hidden"], cfg["train"]["lr"]

    _edit_config(run, "model.hidden", hidden // 2)
    shape = rf"\S+ has shape \({hidden}, \d+\) there, \({hidden // 2}, \d+\) here"
    assert re.search(rf"{_state_file(run, 3)} does not fit this run's model \({shape}",
                     _refusal(_resume(run, "train.steps=4")))
    assert re.search(rf"the checkpoint of step 3 does not fit this run's model \({shape}",
                     _refusal(_evaluate(run), "align.evaluate: "))
    _edit_config(run, "model.hidden", hidden)

    _edit_config(run, "train.lr", 0.01)
    assert (f"{_state_file(run, 3)} was trained with the learning rate {lr} for the parameters theta, and the "
            "config gives 0.01 (train.lr)") in _refusal(_resume(run, "train.steps=4"))
    _edit_config(run, "train.lr", lr)

    shutil.rmtree(os.path.dirname(_state_file(run, 3)))
    _resumes_exactly(run, trained)


# ---- C: a foreign state.pt --------------------------------------------------------------------------------------
def test_a_foreign_state_pt_names_the_file_and_what_it_lacks(trained, tmp_path):
    run = _copy(trained, tmp_path)
    path = _rewrite_state(run, 3, {"align": "model"})
    assert (f"{path} is not a checkpoint: it lacks step, model, algo, optimizer, rng, bad_in_row, skipped, elapsed "
            "(it holds align)") in _refusal(_resume(run, "train.steps=4"))
    assert f"{path} is not a checkpoint: it lacks step, model (it holds align)" in _refusal(_evaluate(run),
                                                                                            "align.evaluate: ")
    state = torch.load(_state_file(run, 2), weights_only=True)
    path = _rewrite_state(run, 3, {k: v for k, v in state.items() if k not in ("optimizer", "rng")})
    assert f"{path} is not a checkpoint: it lacks optimizer, rng (it holds step, model, algo, " in \
        _refusal(_resume(run, "train.steps=4"))
    path = _rewrite_state(run, 3, [state])
    assert f"{path} is not a checkpoint: it holds a list, not a dict with step, model" in \
        _refusal(_evaluate(run), "align.evaluate: ")


# ---- D: the disk refuses a write --------------------------------------------------------------------------------
LIMIT_AFTER_FIRST_CHECKPOINT = '''
    """After the first checkpoint no file may grow past 200 kB (RLIMIT_FSIZE; state.pt is larger, the other files
    are not): the next state.pt write fails with EFBIG, as a full disk fails with ENOSPC."""
    import resource

    from align.train.trainer import Trainer

    _save = Trainer.save


    def save(self):
        _save(self)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


    Trainer.save = save
'''


@pytest.mark.slow
def test_a_refused_checkpoint_write_stops_the_run_and_keeps_the_last_checkpoint(trained, tmp_path):
    (tmp_path / "file_size_limit.py").write_text(textwrap.dedent(LIMIT_AFTER_FIRST_CHECKPOINT))
    run = tmp_path / "run"
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    child = subprocess_run("align.run", [*TINY, f"run_dir={run}"],
                           env={"ALIGN_PLUGINS": "file_size_limit", "PYTHONPATH": path})
    line = _refusal(Result(child.returncode, child.stdout, child.stderr))
    assert (f"align: could not write the checkpoint of step 2 into {run}/checkpoints: file too large (the file size "
            f"limit, ulimit -f); it was not kept, and the newest checkpoint (step 1) is intact. Make room, then "
            f"resume={run} continues from there") == line
    assert os.listdir(run / "checkpoints") == ["step_0000001"]               # no temporary folder left behind
    assert load_step(str(run), 1)["step"] == 1                              # its checksum matches
    _resumes_exactly(run, trained)


@pytest.mark.parametrize("target", ["state.pt", FINISHED_FILE + ".tmp"])
def test_a_full_disk_says_so_and_loses_nothing(trained, tmp_path, monkeypatch, target):
    """The disk fills up while step 3's checkpoint, or then samples_final.pt, is written (ENOSPC, half written)."""
    run = _copy(trained, tmp_path)
    shutil.rmtree(os.path.dirname(_state_file(run, 3)))
    os.remove(run / FINISHED_FILE)
    write = checkpoint._write_bytes

    def full_disk(path, data):
        if os.path.basename(path) != target:
            return write(path, data)
        write(path, data[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(checkpoint, "_write_bytes", full_disk)
    line = _refusal(_resume(run))
    if target == "state.pt":
        assert line == (f"align: could not write the checkpoint of step 3 into {run}/checkpoints: no space left on "
                        f"device; it was not kept, and the newest checkpoint (step 2) is intact. Make room, then "
                        f"resume={run} continues from there")
        assert sorted(os.listdir(run / "checkpoints")) == ["step_0000001", "step_0000002"]   # no temporary one
    else:
        assert line == (f"align: could not write {run}/{FINISHED_FILE}: no space left on device; the final "
                        f"checkpoint (step 3) is intact. Make room, then resume={run} writes the final samples")
        assert list_checkpoints(str(run)) == [1, 2, 3] and load_step(str(run), 3)["step"] == 3
    assert not (run / FINISHED_FILE).exists() and not (run / (FINISHED_FILE + ".tmp")).exists()
    monkeypatch.setattr(checkpoint, "_write_bytes", write)
    _resumes_exactly(run, trained)
