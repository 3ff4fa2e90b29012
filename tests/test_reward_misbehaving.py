"""A callable reward (``reward=callable``) that goes bad in the middle of a run, ``python -m align.run`` on the
tiny gmm (in this process, as tests/helpers/cli.py runs it; two processes through torchrun): non-finite values skip the updates they came in (every algorithm family), and
``train.max_bad_steps`` of them in a row stop the run with one line naming the callable, its parameters those of
the last good update; at evaluation they are reported, not raised; a wrong shape stops the run with one line and
an intact checkpoint that a resume continues once the callable is fixed; a callable that writes into its input
changes nothing.

The user file knows the run's progress from its metrics.jsonl (the newest logged step), so the callable turns bad
at a precise point of the run without any timing."""
import os
import re
import sys
import textwrap

import pytest
import torch

from align.core.run_dir import list_checkpoints, read_metrics
from helpers.cli import align_run, run_main, subprocess_run

USER_FILE = textwrap.dedent('''
    import json
    import os

    import torch


    def logged_step():
        """The newest step in the run's metrics.jsonl (-1 before its first row)."""
        path = os.path.join(os.environ["REWARD_RUN_DIR"], "metrics.jsonl")
        if not os.path.exists(path):
            return -1
        with open(path) as fh:
            return max((json.loads(line)["step"] for line in fh if line.strip()), default=-1)


    def first_row_set_to(r, value):
        """r with its first row replaced by ``value`` (the other rows, and their gradients, as they were)."""
        first = torch.arange(len(r)) == 0
        return r.masked_fill(first, value)


    def honest(images, prompts):
        return images.sum(1)


    def nan_from_step_3(images, prompts):
        """NaN in the first row (one group's) once step 2 is logged: from the third update on."""
        r = honest(images, prompts)
        return first_row_set_to(r, float("nan")) if logged_step() >= 2 else r


    def inf_from_step_3(images, prompts):
        r = honest(images, prompts)
        return first_row_set_to(r, float("inf")) if logged_step() >= 2 else r


    def nan_in_steps_3_and_4(images, prompts):
        """NaN in the first row while steps 2 and 3 are the newest logged: updates 3 and 4, and the evaluation of
        step 4 (which comes before its row is logged)."""
        r = honest(images, prompts)
        return first_row_set_to(r, float("nan")) if logged_step() in (2, 3) else r


    def nan_on_rank_1_from_step_3(images, prompts):
        """NaN in the first row from the third update on, on the process of rank 1 only."""
        r = honest(images, prompts)
        return first_row_set_to(r, float("nan")) if os.environ.get("RANK") == "1" and logged_step() >= 2 else r


    def wrong_shape_from_step_3(images, prompts):
        return images if logged_step() >= 2 else honest(images, prompts)


    def zeroes_its_input(images, prompts):
        r = honest(images, prompts)
        images.mul_(0)
        return r
''')

TINY = ["model=gmm", "reward=callable", "reward.domain=gmm", "train.batch_size=4", "eval.n_samples=16",
        "eval.final_samples=8", "threads=1", "train.progress=false"]
FIRST_ORDER = ["reward.differentiable=true"]       # the algorithms that differentiate the reward need it declared


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(USER_FILE)
    return path


def _align_run(run_dir, *args: str):
    """``python -m align.run``; the user file reads ``run_dir``'s metrics.jsonl."""
    from align.run import main

    return run_main(main, [*TINY, f"run_dir={run_dir}", *args], env={"REWARD_RUN_DIR": str(run_dir)})


def _column(rows: list[dict], key: str) -> list:
    return [r[key] for r in rows if r["step"] > 0]


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def _state(run_dir, step: int) -> dict:
    return torch.load(os.path.join(run_dir, "checkpoints", f"step_{step:07d}", "state.pt"), weights_only=False)


def _same_tensors(a, b) -> bool:
    """Equal nested dicts / lists of tensors and numbers."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("algo, fn, extra", [
    ("vggflow", "nan_from_step_3", FIRST_ORDER),          # first order: the reward's gradient
    ("refl", "inf_from_step_3", FIRST_ORDER),
    ("flow_grpo", "nan_from_step_3", []),                 # policy gradient: the values, in groups
    ("diffusion_nft", "inf_from_step_3", []),
])
def test_nonfinite_rewards_skip_their_updates_and_stop_the_run_naming_the_callable(algo, fn, extra, user_file,
                                                                                   tmp_path):
    """From the third update on, one row's reward (one group's) is non-finite: updates 3 and 4 are skipped,
    counted and logged, and with train.max_bad_steps=2 the run stops there with exit code 2 and one line naming
    the callable; the checkpoint of step 4 holds step 2's parameters, algorithm state and optimizer state."""
    run_dir = tmp_path / "run"
    result = _align_run(run_dir, f"algo={algo}", f"reward.target={user_file}:{fn}", *extra, "train.steps=8",
                        "train.max_bad_steps=2", "train.checkpoint_every=1")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert _last_line(result.stderr).startswith(
        f"align: 2 consecutive updates (the last at step 4) were skipped because reward=callable "
        f"(reward.target={user_file}:{fn}) returned non-finite values (NaN or inf); the last good parameters are "
        f"saved in {run_dir}/checkpoints.")
    rows = read_metrics(str(run_dir))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert _column(rows, "skipped") == [0, 0, 1, 1]
    assert _column(rows, "skipped_total") == [0, 0, 1, 2]
    assert _column(rows, "reward_nonfinite") == [0, 0, 1, 1]
    assert list_checkpoints(str(run_dir)) == [2, 3, 4]
    good, last = _state(run_dir, 2), _state(run_dir, 4)
    for part in ("model", "algo", "optimizer"):          # the skipped updates changed nothing
        assert _same_tensors(good[part], last[part]), part
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert not (run_dir / "samples_final.pt").exists()


@pytest.mark.slow      # two new processes (≈ 10 s of imports each on two shared cores)
def test_a_nonfinite_reward_on_one_process_skips_the_update_on_every_process(user_file, tmp_path):
    """Two processes (torchrun), rank 1's reward NaN from the third update on: both skip updates 3 and 4 (rank 0, which
    writes the rows, from the agreed flag alone) and stop with exit code 2 and the line naming the callable, the
    checkpoint of step 4 holding step 2's state."""
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    fn = "nan_on_rank_1_from_step_3"
    result = subprocess_run("torch.distributed.run", [
        "--standalone", "--nproc_per_node", "2", "--log-dir", str(logs), "--redirects", "2",   # stderr per rank
        "-m", "align.run", *TINY, f"run_dir={run_dir}", "device=cpu",
        "algo=flow_grpo", f"reward.target={user_file}:{fn}", "train.steps=8", "train.max_bad_steps=2",
        "train.checkpoint_every=1", "train.collective_timeout_s=120"], env={"REWARD_RUN_DIR": str(run_dir)})
    assert result.returncode != 0
    # Both ranks stop at the same update; torchrun ends the other rank (SIGTERM) once the first has exited, so the
    # first to exit prints the line and the other may not get to (that rank 0 knew of rank 1's NaN is in its rows).
    assert sorted(re.findall(r"exitcode  : (-?\d+)", result.stderr)) in (["-15", "2"], ["2", "2"]), result.stderr
    stop = (f"align: 2 consecutive updates (the last at step 4) were skipped because reward=callable "
            f"(reward.target={user_file}:{fn}) returned non-finite values")
    ranks = {p.parent.name: p.read_text() for p in logs.glob("*/attempt_0/*/stderr.log")}
    assert sorted(ranks) == ["0", "1"]
    stops = [rank for rank, text in ranks.items() if any(line.startswith(stop) for line in text.splitlines())]
    assert stops, ranks
    assert all("Traceback" not in ranks[rank] for rank in stops), ranks
    rows = read_metrics(str(run_dir))
    assert _column(rows, "skipped") == [0, 0, 1, 1]
    assert _column(rows, "reward_nonfinite") == [0, 0, 1, 1]
    good, last = _state(run_dir, 2), _state(run_dir, 4)
    for part in ("model", "algo", "optimizer"):
        assert _same_tensors(good[part], last[part]), part


def test_nonfinite_rewards_at_evaluation_are_reported_and_training_goes_on(user_file, tmp_path):
    """NaN in one row during updates 3 and 4 and the evaluation of step 4: those updates are skipped, that
    evaluation's eval/reward is NaN (null) with eval/reward_nonfinite = 1 and a warning naming the callable and the
    step; the run then trains on and finishes."""
    run_dir = tmp_path / "run"
    fn = "nan_in_steps_3_and_4"
    result = _align_run(run_dir, "algo=flow_grpo", f"reward.target={user_file}:{fn}", "train.steps=6",
                        "train.max_bad_steps=3", "eval.every=4")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert f"step 4: reward=callable (reward.target={user_file}:{fn}) returned non-finite values for 1 of the " \
           "16 evaluation samples" in result.stderr
    rows = read_metrics(str(run_dir))
    assert _column(rows, "skipped") == [0, 0, 1, 1, 0, 0]
    assert _column(rows, "skipped_total") == [0, 0, 1, 2, 2, 2]
    assert _column(rows, "reward_nonfinite") == [0, 0, 1, 1, 0, 0]
    evals = {r["step"]: r for r in rows if "eval/reward" in r}
    assert sorted(evals) == [0, 4, 6]
    assert evals[4]["eval/reward"] is None and evals[4]["eval/reward_nonfinite"] == 1
    assert evals[4]["eval/diversity"] > 0                 # the samples themselves are intact
    for step in (0, 6):
        assert isinstance(evals[step]["eval/reward"], float) and evals[step]["eval/reward_nonfinite"] == 0
    assert (run_dir / "samples_final.pt").exists()


def test_a_wrong_shape_mid_run_stops_with_one_line_and_a_resume_continues_after_the_fix(user_file, tmp_path,
                                                                                         monkeypatch):
    """From the third update on the callable returns the points [4, 2] instead of [4]: exit code 2, one line naming
    the callable and the intact checkpoint; the rows and checkpoints of steps 1 and 2 are kept, and once the file is
    fixed ``resume=`` finishes the run."""
    run_dir = tmp_path / "run"
    fn = "wrong_shape_from_step_3"
    result = _align_run(run_dir, "algo=flow_grpo", f"reward.target={user_file}:{fn}", "train.steps=4",
                        "train.checkpoint_every=1")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert _last_line(result.stderr) == (
        f"align: reward=callable (reward.target={user_file}:{fn}) returned shape (4, 2) for 4 images; it must "
        "return a tensor [4] or a sequence of 4 numbers; the run stopped after 2 update(s), the newest checkpoint "
        f"(step 2) holds the last good parameters: fix the reward, then resume={run_dir} continues the run")
    assert [r["step"] for r in read_metrics(str(run_dir))] == [0, 1, 2]
    assert list_checkpoints(str(run_dir)) == [1, 2]

    user_file.write_text(USER_FILE.replace("return images if logged_step() >= 2 else", "return"))
    for name in [n for n, m in sys.modules.items() if getattr(m, "__file__", None) == str(user_file)]:
        del sys.modules[name]        # as a new process would, read the fixed file
    monkeypatch.setenv("REWARD_RUN_DIR", str(run_dir))
    resumed = align_run(f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in read_metrics(str(run_dir))] == [0, 1, 2, 3, 4]
    assert (run_dir / "samples_final.pt").exists()


@pytest.mark.parametrize("algo, extra", [("flow_grpo", []), ("vggflow", FIRST_ORDER)])
def test_a_callable_that_writes_into_its_input_changes_nothing(algo, extra, user_file, tmp_path):
    """``images.mul_(0)`` after scoring: the run's metrics and final samples equal those of the honest callable
    (the same value, no write), with the samples' spread intact (the reward gets a copy; a differentiable one a
    copy that keeps the graph)."""
    sweep = tmp_path / "sweep"
    result = align_run(
        "-m", *TINY, f"algo={algo}", *extra, "train.steps=3", "eval.every=1",
        f"reward.target={user_file}:honest,{user_file}:zeroes_its_input",
        f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}")
    assert result.returncode == 0, result.stderr
    honest, zeroing = ([{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(str(sweep / job))]
                       for job in ("0", "1"))
    assert [r["step"] for r in zeroing] == [0, 1, 2, 3]
    assert zeroing == honest
    assert all(r["eval/diversity"] > 0.1 and r["eval/reward_std"] > 0.1 for r in zeroing if "eval/reward" in r)
    samples = [torch.load(sweep / job / "samples_final.pt") for job in ("0", "1")]
    assert torch.equal(samples[0]["x1"], samples[1]["x1"]) and samples[1]["x1"].abs().sum() > 0
