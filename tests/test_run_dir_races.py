"""Races and removed files around a run directory, on the tiny gmm with real ``python -m align.run`` /
``align.sweep`` processes: two runs started together into one directory (the loser changes nothing), a finished
run whose checkpoints were deleted (skipped, never trained again), a multi-process launch whose rank 1 would have
seen the directory before rank 0 took the lock (it follows rank 0's plan), a stop that reaches a sweep while a
finished run is exiting (the run finished), and a resumed run whose metrics.jsonl was deleted (the report says so).

The interleavings are forced, not waited for: the processes load ``race_hooks`` (written into tmp_path, loaded
through ``ALIGN_PLUGINS``), which pauses align at the exact points named by ``ALIGN_TEST_ROLE`` until a file
appears in ``ALIGN_TEST_BARRIERS``."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from align.core.run_dir import (HOLDER_FILE, LOCK_FILE, MARKER_FILE, RunMismatch, claim_run_dir, clear_partial_run,
                                own_run_dir, plan_existing_run, read_metrics, run_status)
from align.report.cli import main as report_main
from align.sweep import main as sweep_main, quote
from helpers.cli import ENV, align_run

TINY = ["model=gmm", "reward=linear", "train.batch_size=4", "eval.n_samples=16", "eval.final_samples=8",
        "train.progress=false", "threads=1"]

HOOKS = '''
"""Pauses align at the points ALIGN_TEST_ROLE names, until a file appears in ALIGN_TEST_BARRIERS."""
import os
import sys
import time
from contextlib import contextmanager

import align.core.run_dir as run_dir

BARRIERS, ROLE = os.environ["ALIGN_TEST_BARRIERS"], os.environ.get("ALIGN_TEST_ROLE", "")


def arrive(name):
    open(os.path.join(BARRIERS, name), "w").close()


def wait_for(name, timeout=180.0):
    deadline = time.time() + timeout
    while not os.path.exists(os.path.join(BARRIERS, name)):
        if time.time() > deadline:
            raise SystemExit(f"race_hooks: no {name} after {timeout} s")
        time.sleep(0.02)


hold = run_dir.hold_run_dir


def patch_hold(hooked):
    """hold_run_dir -> hooked, wherever align calls it from (align.run may have imported it by name)."""
    for module in (run_dir, sys.modules.get("__main__")):
        if getattr(module, "hold_run_dir", None) is hold:
            module.hold_run_dir = hooked


@contextmanager
def loser(path):
    """Try the lock only once the winner holds it."""
    arrive("loser_at_lock")
    wait_for("winner_holds")
    with hold(path):
        yield


@contextmanager
def winner(path):
    """Take the lock after the loser has done all it does before the lock; hold it until the test has looked."""
    wait_for("loser_at_lock")
    with hold(path):
        arrive("winner_holds")
        wait_for("loser_done")
        yield


@contextmanager
def after_the_previous_writer(path):
    """Rank 0: take the lock once the previous writer has ended (the run directory is finished by then)."""
    wait_for("previous_done")
    with hold(path):
        yield


def then_arrive(plan):
    """Rank 1 decides from the run directory itself, then says it has looked."""
    def run(*args, **kwargs):
        action = plan(*args, **kwargs)
        arrive("rank1_looked")
        return action
    return run


def arrive_then(hear):
    """Rank 1 says it has come to its decision point, then waits for rank 0's plan."""
    def run(*args, **kwargs):
        arrive("rank1_looked")
        return hear(*args, **kwargs)
    return run


def lingering(final_samples):
    """After samples_final.pt is written, stay until stopped (the run is exiting)."""
    def run(self):
        final_samples(self)
        arrive("final_written")
        wait_for("never")
    return run


main = sys.modules["__main__"]
if ROLE == "loser":
    patch_hold(loser)
elif ROLE == "winner":
    patch_hold(winner)
elif ROLE == "linger":
    from align.train.trainer import Trainer

    Trainer._final_samples = lingering(Trainer._final_samples)
elif ROLE == "ranks" and os.environ.get("RANK") == "0":
    patch_hold(after_the_previous_writer)
elif ROLE == "ranks":
    main.plan_existing_run = then_arrive(run_dir.plan_existing_run)
    if hasattr(main, "SharedPlan"):
        main.SharedPlan.hear = arrive_then(main.SharedPlan.hear)
'''


@pytest.fixture
def hooks(tmp_path):
    """The environment that loads race_hooks in every align process; ``hooks(role)`` adds the role."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "race_hooks.py").write_text(HOOKS)
    (tmp_path / "barriers").mkdir()
    path = os.pathsep.join([str(tmp_path / "plugins"), *sys.path])

    def env(role: str) -> dict[str, str]:
        return {**os.environ, **ENV, "PYTHONPATH": path, "ALIGN_PLUGINS": "race_hooks",
                "ALIGN_TEST_BARRIERS": str(tmp_path / "barriers"), "ALIGN_TEST_ROLE": role}
    return env


def _wait_for(condition, what: str, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _align_run(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "align.run", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(str(run_dir))]


def _sweep_file(tmp_path, *common: str) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: s\ncommon: [{', '.join(TINY + list(common))}]\ngrids: [{{seed: [0]}}]\n")
    return str(path)


# ---- A: a lost lock race changes nothing ----------------------------------------------------------------------
@pytest.mark.slow
def test_the_loser_of_a_lock_race_leaves_the_winners_run_intact(tmp_path, hooks):
    """The loser reaches the lock first in time but takes it after the winner: it exits 2 naming the winner, and
    the directory it saw empty stays as the winner has it; the winner writes each step once."""
    run, barriers = tmp_path / "run", tmp_path / "barriers"
    args = [*TINY, "train.steps=3", f"run_dir={run}"]
    loser = _align_run(*args, env=hooks("loser"))
    winner = _align_run(*args, env=hooks("winner"))
    try:
        _, err = loser.communicate(timeout=300)
        assert loser.returncode == 2 and "Traceback" not in err, err
        assert err.startswith("align: ") and f"{run} is being written by pid {winner.pid} on " in err
        assert (run / HOLDER_FILE).exists(), "the loser removed the winner's run directory"
        assert json.loads((run / HOLDER_FILE).read_text())["pid"] == winner.pid     # the winner's lock is there
        assert sorted(os.listdir(run)) == sorted([LOCK_FILE, HOLDER_FILE])           # and nothing of the loser's
        (barriers / "loser_done").touch()
        out, err = winner.communicate(timeout=300)
    finally:
        for p in (loser, winner):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert winner.returncode == 0, err
    assert _steps(run) == [0, 1, 2, 3] and run_status(str(run)) == "finished"


# ---- B: a finished run without its checkpoints --------------------------------------------------------------
@pytest.mark.slow
def test_a_finished_run_whose_checkpoints_were_deleted_is_skipped_never_trained_again(tmp_path, capsys):
    out = tmp_path / "out"
    sweep = _sweep_file(tmp_path, "train.steps=2", "train.checkpoint_every=1")
    run = out / "seed=0"
    at = quote(str(run))                                        # a Hydra value: the path has an '='
    trained = align_run(*TINY, "seed=0", "train.steps=2", "train.checkpoint_every=1", f"run_dir={at}")
    assert trained.returncode == 0, trained.stderr             # the sweep's run, as its process would train it
    shutil.rmtree(run / "checkpoints")
    kept = {f: (run / f).read_bytes() for f in ("metrics.jsonl", "samples_final.pt", "config.yaml")}
    capsys.readouterr()

    assert sweep_main([sweep, "--out", str(out)]) == 0
    assert "ran 0, resumed 0, skipped 1, failed 0" in capsys.readouterr().out
    assert {f: (run / f).read_bytes() for f in kept} == kept
    assert run_status(str(run)) == "finished"
    assert sweep_main([sweep, "--out", str(out), "--dry-run"]) == 0
    assert "skip   seed=0  [finished]" in capsys.readouterr().out
    again = align_run(*TINY, "seed=0", "train.steps=2", "train.checkpoint_every=1", f"run_dir={at}")
    assert again.returncode == 0 and f"align: {run} already finished, skipping" in again.stdout, again.stderr

    for args in ([*TINY, "seed=0", "train.steps=4", "train.checkpoint_every=1", f"run_dir={at}"],
                 [f"resume={at}", "train.steps=4"]):         # an extension cannot resume: refused, not retrained
        res = align_run(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"align: {run} finished at step 2 and keeps no checkpoint" in res.stderr
        assert "cannot be extended to train.steps=4" in res.stderr and "new run_dir" in res.stderr
    res = align_run(f"resume={at}")
    assert res.returncode == 2 and f"{run} is finished and keeps no checkpoint to resume from" in res.stderr
    assert {f: (run / f).read_bytes() for f in kept} == kept

    assert report_main([str(out)]) == 0
    assert "Unfinished runs" not in (out / "report" / "table.md").read_text(encoding="utf-8")


def test_the_plan_for_a_finished_run_without_checkpoints(tmp_path):
    """Skipped when re-run as it was, refused when extended; a finished run's samples_final.pt beside a
    metrics.jsonl that lost its end (and no checkpoint) is refused rather than trained over."""
    from align.setup.compose import compose_config
    from omegaconf import OmegaConf

    def requested(steps):
        return OmegaConf.to_container(compose_config([*TINY, f"train.steps={steps}"]), resolve=True)

    run = tmp_path / "run"
    claim_run_dir(str(run))
    OmegaConf.save(compose_config([*TINY, "train.steps=2"]), run / "config.yaml", resolve=True)
    rows = [{"step": 0, "eval/reward": 0.1}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5, "eval/reward": 0.3}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "samples_final.pt").write_bytes(b"x")
    assert run_status(str(run)) == "finished" and plan_existing_run(str(run), requested(2)) == "skip"
    with pytest.raises(RunMismatch, match="finished at step 2 and keeps no checkpoint .* cannot be extended to "
                                          "train.steps=4"):
        plan_existing_run(str(run), requested(4))
    with pytest.raises(RunMismatch, match="already trained to step 2, beyond the requested train.steps=1"):
        plan_existing_run(str(run), requested(1))
    (run / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")            # its end deleted
    assert run_status(str(run)) == "partial"
    for attempt in (lambda: plan_existing_run(str(run), requested(2)), lambda: clear_partial_run(str(run))):
        with pytest.raises(RunMismatch, match="has the samples_final.pt of a finished run.*Move samples_final.pt"):
            attempt()
    assert sorted(os.listdir(run)) == [".align-run", "config.yaml", "metrics.jsonl", "samples_final.pt"]


# ---- multi-process launches: rank 0 decides, holding the lock ---------------------------------------------------
@pytest.mark.slow
def test_every_rank_follows_the_plan_rank_0_made_holding_the_lock(tmp_path, hooks):
    """Rank 1 looks at the run directory while a previous writer is still ending it; the run is finished by the
    time rank 0 takes the lock, so rank 0 skips it, and rank 1 must too (not start training and wait for rank 0
    in vain)."""
    done, run, barriers = tmp_path / "done", tmp_path / "run", tmp_path / "barriers"
    args = [*TINY, "train.steps=2", "train.checkpoint_every=1", "device=cpu", "train.collective_timeout_s=30"]
    assert align_run(*args, f"run_dir={done}").returncode == 0          # the run as the previous writer ends it
    run.mkdir()
    for name in (MARKER_FILE, "config.yaml"):
        shutil.copy(done / name, run / name)
    (run / "metrics.jsonl").write_text((done / "metrics.jsonl").read_text().splitlines(keepends=True)[0])
    launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "align.run", *args, f"run_dir={run}"], env=hooks("ranks"), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: (barriers / "rank1_looked").exists(), "rank 1's look at the run directory")
        shutil.copytree(done / "checkpoints", run / "checkpoints")
        for name in ("metrics.jsonl", "samples_final.pt"):
            shutil.copy(done / name, run / name)
        (barriers / "previous_done").touch()
        text, _ = launch.communicate(timeout=240)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait()
    assert launch.returncode == 0, text[-3000:]
    assert text.count(f"align: {run} already finished, skipping") == 1                  # rank 0 says it, once
    assert (run / "metrics.jsonl").read_bytes() == (done / "metrics.jsonl").read_bytes()


def test_a_sweep_writes_nothing_into_a_run_directory_another_process_holds(tmp_path, capsys):
    """The sweep claims a run's directory and starts its log holding the lock: a directory held by another process
    gets no run.log and no run; the sweep says who holds it."""
    out = tmp_path / "out"
    with own_run_dir(str(out / "seed=0")):
        assert sweep_main([_sweep_file(tmp_path, "train.steps=2"), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "failed   seed=0" in printed and f"{out / 'seed=0'} is being written by pid {os.getpid()} on " in printed
    assert not (out / "seed=0" / "run.log").exists()


# ---- C: a stop that reaches a sweep while its finished run exits ----------------------------------------------
@pytest.mark.slow
def test_a_run_that_finished_before_the_sweep_was_stopped_is_reported_finished(tmp_path, hooks):
    out, barriers = tmp_path / "out", tmp_path / "barriers"
    sweep = subprocess.Popen([sys.executable, "-m", "align.sweep", _sweep_file(tmp_path, "train.steps=2"),
                              "--out", str(out)], env=hooks("linger"), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: (barriers / "final_written").exists(), "the run's samples_final.pt")
        assert run_status(str(out / "seed=0")) == "finished"          # the run is still exiting
        sweep.send_signal(signal.SIGTERM)
        text, _ = sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.wait()
    assert "ran 1, resumed 0, skipped 0, failed 0" in text, text
    assert "stopped by SIGTERM. finished: seed=0; interrupted: -; never started: -" in text
    assert _steps(out / "seed=0") == [0, 1, 2]


# ---- D: the report on a run whose metrics.jsonl was deleted before a resume ------------------------------------
def test_the_report_says_a_resumed_runs_first_rows_were_deleted(tmp_path, capsys):
    run = tmp_path / "sweep" / "run"
    assert align_run(*TINY, "train.steps=2", "train.checkpoint_every=1", f"run_dir={run}").returncode == 0
    os.remove(run / "metrics.jsonl")
    res = align_run(f"resume={run}", "train.steps=4")
    assert res.returncode == 0, res.stderr
    assert _steps(run) == [3, 4]
    capsys.readouterr()

    assert report_main([str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out
    reason = "its metrics.jsonl starts at step 3: the rows before were deleted or cut off"
    assert f"align.report: No compute columns and no vs-compute figures: no run logged compute/ keys from step 0 " \
           f"({reason}" in printed
    assert "before compute accounting" not in printed
    table = (tmp_path / "sweep" / "report" / "table.md").read_text(encoding="utf-8")
    assert f"- {run}: {reason}" in table and "before compute accounting" not in table
