"""The run directory's lifecycle is safe: a user's folder is never touched, one writer per run directory,
Ctrl-C stops a sweep, a resume writes each step once, an interrupted extension is not finished, and a damaged newest
checkpoint falls back to an intact one. On the tiny gmm: the runs that are killed, signalled or hold a lock against
another are real ``python -m align.run`` / ``align.sweep`` processes; the others run ``align.run.main`` in this
process (tests/helpers/cli.py)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from align.train.checkpoint import CheckpointError, load_latest, save_checkpoint
from align.core.run_dir import HOLDER_FILE, list_checkpoints, read_metrics, run_status
from align.sweep import main as sweep_main
from helpers.cli import Result, align_run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY = ["model=gmm", "reward=linear", "train.batch_size=4", "eval.n_samples=16", "eval.final_samples=8"]
ENDLESS = ["train.steps=100000", "train.checkpoint_every=100000", "eval.every=100000"]   # until it is killed


def _cmd(*args: str) -> list[str]:
    """``align.run`` on TINY, or with ``resume=`` on the run's own config (threads come from OMP_NUM_THREADS)."""
    resuming = any(a.startswith("resume=") for a in args)
    return [sys.executable, "-m", "align.run", *([] if resuming else TINY + ["threads=1"]), "train.progress=false",
            *args]


def _run(*args: str) -> Result:
    """``align.run`` as ``_cmd`` would start it, in this process."""
    return align_run(*_cmd(*args)[3:])


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _n_rows(run_dir) -> int:
    return len(read_metrics(str(run_dir))) if (run_dir / "metrics.jsonl").exists() else 0


def _rows(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(str(run_dir))]


def _steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(str(run_dir))]


def _checksums(folder) -> dict[str, str]:
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder) + "/"] = ""
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _processes_mentioning(text: str) -> list[int]:
    """The live processes whose command line contains ``text`` (from /proc; zombies have none)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as fh:
                    cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(name))
    return pids


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_users_folder_is_refused_and_left_untouched(tmp_path, capsys):
    mine = tmp_path / "mine"
    for name, text in {"metrics.jsonl": "my numbers\n", "config.yaml": "mine: 1\n", "notes.txt": "keep\n",
                       "samples/a.png": "png", "checkpoints/step_0000001/other.bin": "x", "tb/events": "e"}.items():
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(text)
    before = _checksums(mine)
    res = _run("train.steps=2", f"run_dir={mine}")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"run_dir={mine} is a non-empty folder that align did not create" in res.stderr
    assert "move its files away" in res.stderr

    sweep_file = tmp_path / "s.yaml"                # a sweep whose run directory is that folder: refused up front
    sweep_file.write_text(f"name: s\ncommon: [{', '.join(TINY)}, train.steps=2]\ngrids: [{{seed: [0]}}]\n")
    os.rename(mine, tmp_path / "seed=0")
    assert sweep_main([str(sweep_file), "--out", str(tmp_path)]) == 2
    assert "align did not create" in capsys.readouterr().err
    os.rename(tmp_path / "seed=0", mine)
    assert _checksums(mine) == before


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    first = _start(*ENDLESS, f"run_dir={run}")
    try:
        _wait_for(lambda: _n_rows(run) >= 1, "the first run's step-0 row")
        for args in ([*ENDLESS, f"run_dir={run}"], [f"resume={run}"]):     # a re-used run_dir, resume=
            second = _run(*args)
            assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
            assert f"{run} is being written by pid {first.pid} on " in second.stderr
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    rows = _steps(run)
    assert rows == list(range(len(rows)))                 # the second writer added nothing


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_and_a_rerun_finishes_it(tmp_path):
    out = tmp_path / "out"
    sweep_file = tmp_path / "stop.yaml"
    sweep_file.write_text(f"name: stop\ncommon: [{', '.join(TINY)}]\ngrids: [{{seed: [0, 1, 2]}}]\n")
    sweep = subprocess.Popen([sys.executable, "-m", "align.sweep", str(sweep_file), *ENDLESS, "--out", str(out),
                              "--jobs", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        _wait_for(lambda: _n_rows(out / "seed=0") >= 1, "the first run's step-0 row")
        child = int(json.loads((out / "seed=0" / HOLDER_FILE).read_text())["pid"])
        sweep.send_signal(signal.SIGINT)
        text, _ = sweep.communicate(timeout=60)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 130, text
    assert "stopped by SIGINT. finished: -; interrupted: seed=0; never started: seed=1, seed=2" in text
    assert _gone(child) and not _processes_mentioning(str(out))
    assert not (out / "seed=1").exists()

    assert sweep_main([str(sweep_file), "train.steps=3", "--out", str(out), "--jobs", "2"]) == 0
    for seed in (0, 1, 2):
        assert _steps(out / f"seed={seed}") == [0, 1, 2, 3] and run_status(str(out / f"seed={seed}")) == "finished"


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_resumes_with_each_step_once(tmp_path):
    run = tmp_path / "run"
    p = _start(*ENDLESS, f"run_dir={run}")
    try:
        _wait_for(lambda: _n_rows(run) >= 4, "four rows")
    finally:
        p.kill()
        p.wait()
    assert list_checkpoints(str(run)) == [] and run_status(str(run)) == "partial"
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 9, "lo')                       # a torn last line
    res = _run(f"resume={run}", "train.steps=3")
    assert res.returncode == 0, res.stderr
    assert f"{run} has no checkpoint yet, starting afresh" in res.stdout
    assert _steps(run) == [0, 1, 2, 3]


@pytest.mark.slow
def test_an_interrupted_extension_is_not_finished_and_shrinking_is_refused(tmp_path):
    run = tmp_path / "run"
    assert _run("train.steps=2", "train.checkpoint_every=1", f"run_dir={run}").returncode == 0
    assert run_status(str(run)) == "finished"
    p = _start(f"resume={run}", "train.steps=100000", "train.checkpoint_every=1")
    try:
        _wait_for(lambda: max(list_checkpoints(str(run)), default=0) >= 3, "a checkpoint past the old end")
    finally:
        p.kill()
        p.wait()
    assert not (run / "samples_final.pt").exists() and run_status(str(run)) == "checkpoint"

    config = (run / "config.yaml").read_bytes()
    last = list_checkpoints(str(run))[-1]
    for args in ([f"resume={run}", "train.steps=2"], ["train.steps=2", "train.checkpoint_every=1", f"run_dir={run}"]):
        res = _run(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"{run} is already trained to step {last}, beyond the requested train.steps=2" in res.stderr
        assert (run / "config.yaml").read_bytes() == config


def test_a_damaged_newest_checkpoint_falls_back_and_resumes_exactly(tmp_path):
    args = ["train.steps=4", "train.checkpoint_every=1", "eval.every=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    for run in (full, part):
        res = _run(*args, f"run_dir={run}")
        assert res.returncode == 0, res.stderr
    newest = part / "checkpoints" / "step_0000004" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])          # truncated
    os.remove(part / "checkpoints" / "step_0000003" / "state.pt.sha256")            # as older runs wrote it
    os.remove(part / "samples_final.pt")
    with open(part / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "lo')
    res = _run(*args, f"run_dir={part}")
    assert res.returncode == 0, res.stderr
    assert f"{newest} is damaged (its sha256 differs from state.pt.sha256)" in res.stderr
    assert _rows(part) == _rows(full)
    a, b = (torch.load(run / "samples_final.pt") for run in (full, part))
    assert torch.equal(a["x1"], b["x1"])


def test_load_latest_skips_unreadable_checkpoints_and_refuses_when_none_is_intact(tmp_path):
    run = str(tmp_path)
    for step in (1, 2):
        save_checkpoint(run, step, {"step": step}, keep=0)
    os.remove(os.path.join(run, "checkpoints", "step_0000002", "state.pt.sha256"))
    garbage = os.path.join(run, "checkpoints", "step_0000002", "state.pt")
    with open(garbage, "wb") as fh:
        fh.write(b"not a checkpoint")
    with pytest.warns(UserWarning, match=f"{garbage} is damaged .*UnpicklingError"):
        assert load_latest(run) == (1, {"step": 1})
    with open(os.path.join(run, "checkpoints", "step_0000001", "state.pt"), "ab") as fh:
        fh.write(b"x")                                                               # checksum differs
    with warnings.catch_warnings(), pytest.raises(CheckpointError, match="no intact checkpoint"):
        warnings.simplefilter("ignore")
        load_latest(run)
    assert load_latest(str(tmp_path / "none")) is None


def test_rotation_keeps_the_intact_checkpoints_below_a_damaged_newer_one(tmp_path):
    run = str(tmp_path)
    for step in (2, 4):
        save_checkpoint(run, step, {"step": step}, keep=2)
    save_checkpoint(run, 3, {"step": 3}, keep=2)          # a resume from 2 after 4 was found damaged
    assert list_checkpoints(run) == [2, 3, 4]
