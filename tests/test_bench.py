"""align.bench: evaluation counts per trajectory and per trained state, from each algorithm's definition; the
sampling that times the ratio is not counted; --vary gives one table per value; bad options refused first."""
import json
import math
import subprocess
import sys

import pytest

from align import bench
from align.bench import bench_one

N, B = 4, 2          # sampler.steps, train.batch_size
TIMES = {"s_median", "s_min", "s_max", "peak_rss_mb", "rss_rise_mb", "sampling_s_median", "ratio_median"}


def run(algo: str, *overrides: str, sample: bool = False, updates: int = 1) -> dict:
    row = bench_one(algo, "gmm", [f"sampler.steps={N}", f"train.batch_size={B}", *overrides], 1, updates,
                    sample=sample)
    assert "skipped" not in row, row
    return row


def counts(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMES}


def test_refl_one_late_state_one_reward_gradient():
    # rollout: the N-step no-grad ODE; loss: one v_θ with grad and one reward gradient per trajectory; the trainer
    # scores r(x_1) once for its log (ReFL keeps no reward of x_1)
    assert counts(run("refl")) == {
        "algo": "refl", "v_nograd": N, "v_grad": 1, "v_base": 0, "reward": 1, "reward_grad": 1,
        "rollout_v": N, "rollout_v_base": 0, "trained": 1, "velocity_per_trained": 1, "reward_grad_per_trained": 1}


def test_draft_lv_n_renoised_copies():
    n = 3
    c = counts(run("draft", "algo.variant=lv", f"algo.n={n}"))
    assert (c["rollout_v"], c["v_nograd"], c["v_grad"], c["trained"]) == (N, N, n, n)
    assert (c["reward"], c["reward_grad"], c["velocity_per_trained"], c["reward_grad_per_trained"]) == (1, n, 1, 1)


def test_draft_k_differentiates_the_last_k_rollout_steps():
    K = 2
    c = counts(run("draft", "algo.variant=k", f"algo.k={K}"))
    # the rollout is the whole ODE, its last K steps with grad: they are the trained states, and nothing else
    # evaluates a velocity; one reward gradient at x_N per trajectory
    assert (c["rollout_v"], c["v_nograd"], c["v_grad"], c["trained"]) == (N, N - K, K, K)
    assert (c["velocity_per_trained"], c["reward_grad"], c["reward_grad_per_trained"]) == (0, 1, 1 / K)


def test_adjoint_matching_counts():
    c = counts(run("adjoint_matching", "algo.loss_times.last=0.5", "algo.loss_times.random=0.25"))
    M = math.ceil(0.5 * N) + math.ceil(0.25 * N)      # the last ⌈N/2⌉ states and ⌈N/4⌉ earlier ones
    # rollout: N − 1 controlled SDE steps (v_θ) and the noiseless last step (v_base); the lean adjoint takes one
    # product in x of v_base per step k = N−1..1, never v_θ; one reward gradient at x_1, kept for the log
    assert (c["rollout_v"], c["rollout_v_base"], c["v_nograd"]) == (N - 1, 1, N - 1)
    assert (c["v_grad"], c["trained"], c["reward"], c["reward_grad"]) == (M, M, 0, 1)
    # the loss's v_base at its M states: evaluated again, or kept from the sweep (all but those below its stop)
    assert N - 1 <= c["v_base"] - c["rollout_v_base"] <= N - 1 + M


def test_pmp_costate_products_are_not_trained_states():
    bins = 2
    c = counts(run("vggflow_pmp", "algo.adjoint=full", "algo.target=next", f"algo.subsample_bins={bins}"))
    M = bins + 1                                       # x_{N−1} and one state per bin
    # the full Hamiltonian differentiates v_θ in x at k = N−1..1 (grad enabled, but not reached by the update's
    # backward); only the M matched states are trained
    assert (c["rollout_v"], c["v_nograd"], c["v_grad"], c["trained"]) == (N, N, (N - 1) + M, M)
    assert (c["reward"], c["reward_grad"]) == (0, 1)


def test_vggflow_structure():
    bins = 2
    c = counts(run("vggflow", f"algo.subsample_bins={bins}"))
    assert (c["rollout_v"], c["rollout_v_base"]) == (N, 0)
    assert c["trained"] == bins + 1 and c["v_grad"] >= c["trained"]
    assert c["reward_grad"] >= c["trained"]            # ∇r(x̂_1) at every trained state, and more for g's residual
    assert c["reward_grad_per_trained"] == c["reward_grad"] / c["trained"]


def test_sampling_is_timed_but_not_counted():
    timed = run("refl", sample=True, updates=2)
    assert math.isfinite(timed["ratio_median"]) and timed["ratio_median"] > 0
    assert timed["sampling_s_median"] > 0
    untimed = run("refl", updates=2)
    assert "ratio_median" not in untimed
    assert counts(timed) == counts(untimed)


def in_process(algo, model, overrides, warmup, updates, threads):
    return bench_one(algo, model, overrides, warmup, updates)


def test_vary_one_table_per_value(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "measure", in_process)
    out = tmp_path / "bench.json"
    bench.main(["--algos", "refl,draft", "--updates", "1", "--warmup", "0", "--vary", "sampler.steps=4,5",
                "--json", str(out), "train.batch_size=2"])
    printed = capsys.readouterr().out
    assert printed.count("| algorithm |") == 2 and printed.count("| refl |") == 2
    saved = json.loads(out.read_text())
    assert saved["vary"] == "sampler.steps" and [t["value"] for t in saved["tables"]] == ["4", "5"]
    assert [[(r["algo"], r["rollout_v"]) for r in t["rows"]] for t in saved["tables"]] == [
        [("refl", 4), ("draft", 4)], [("refl", 5), ("draft", 5)]]


@pytest.mark.slow
def test_command_line(tmp_path):
    """The one real run: the parent starts a benchmark process per algorithm and reads its row."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "align.bench", "--algos", "refl", "--updates", "1", "--warmup", "0",
                           "--json", str(out), "train.batch_size=2", f"sampler.steps={N}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "update ÷ sampling" in proc.stdout and "| refl |" in proc.stdout
    (row,) = json.loads(out.read_text())["tables"][0]["rows"]
    assert row["rollout_v"] == N and row["ratio_median"] > 0


@pytest.mark.parametrize("argv, names", [
    (["--vary", "sampler.steps"], "--vary"),
    (["--vary", "sampler.steps=2,4", "sampler.steps=3"], "sampler.steps"),
    (["--vary", "model=gmm,digits"], "--model"),
    (["--updates", "0"], "--updates"),
    (["--algos", "refl", "train.batch_size=0"], "train.batch_size"),
    (["--algos", "refl", "--vary", "train.lr=1e-3,-1"], "train.lr"),
    (["--json", "/nonexistent/bench.json"], "--json"),
])
def test_bad_options_are_refused_before_any_work(argv, names, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("a benchmark process was started")

    monkeypatch.setattr(bench, "measure", no_work)
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2 and names in capsys.readouterr().err
