"""Compute accounting (align/train/compute.py, the trainer's ``compute/*`` keys): the counts per update equal each
algorithm's cost as its docstring states it, accumulate over steps, skip the evaluation and the log's scoring,
survive an exact resume (and an old checkpoint without them warns and restarts at zero), and two processes'
rows add up. A CFG-combined velocity is one row although the network sees two; a deep copy of a counted model
counts its own evaluations into the same counter."""
import copy
import os
from types import SimpleNamespace

import pytest
import torch

from align.setup.assemble import build_trainer
from align.train.compute import EvalCounter
from align.setup.compose import compose_config
from align.core.run_dir import read_metrics
from align.train.trainer import Trainer

N, B, STEPS = 4, 2, 3            # sampler.steps, train.batch_size, updates
TINY = ["model=gmm", "reward=linear", f"sampler.steps={N}", f"train.batch_size={B}", f"train.steps={STEPS}",
        "eval.every=0", "eval.n_samples=8", "eval.final_samples=4", "train.progress=false"]
KEYS = ("v_nograd", "v_grad", "v_base", "reward", "reward_grad")


def _run(run_dir, *overrides):
    build_trainer(compose_config(TINY + list(overrides), run_dir=str(run_dir)), str(run_dir)).train()
    return read_metrics(str(run_dir))


def _compute(row):
    return {k: row[f"compute/{k}"] for k in KEYS}


def _assert_per_update(rows, per_update):
    """Row k (k = 0..STEPS) carries k times the per-update cost, and velocity is the sum of the three kinds."""
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    for r in rows:
        assert _compute(r) == {k: r["step"] * per_update.get(k, 0) for k in KEYS}, r["step"]
        assert r["compute/velocity"] == r["compute/v_nograd"] + r["compute/v_grad"] + r["compute/v_base"]


# Per update, from each algorithm's docstring, for B trajectories on an N-step grid. The trainer's r(x_1) for the
# log (ReFL, DRaFT keep none) is not training compute: reward stays 0.
def test_refl_rolls_out_n_steps_without_grad_and_differentiates_one_prediction(tmp_path):
    # x_k by the no-grad Euler ODE (the whole ODE is run: N rows per trajectory), then x̂_1 from one v_θ with grad
    # and one reward gradient at it
    _assert_per_update(_run(tmp_path, "algo=refl"), {"v_nograd": N * B, "v_grad": B, "reward_grad": B})


def test_draft_lv_renoises_n_copies_one_step_each(tmp_path):
    n = 3
    # the no-grad ODE to x_N, then n re-noised copies, each one v_θ step with grad and one reward gradient
    rows = _run(tmp_path, "algo=draft", "algo.variant=lv", f"algo.n={n}")
    _assert_per_update(rows, {"v_nograd": N * B, "v_grad": n * B, "reward_grad": n * B})


def test_draft_k_takes_its_last_k_steps_with_grad(tmp_path):
    K = 3
    # the first N − K Euler steps without grad, the last K with grad, one reward gradient at x_N
    rows = _run(tmp_path, "algo=draft", "algo.variant=k", f"algo.k={K}")
    _assert_per_update(rows, {"v_nograd": (N - K) * B, "v_grad": K * B, "reward_grad": B})


def test_vggflow_spends_four_velocities_and_two_reward_gradients_per_trained_state(tmp_path):
    bins = 2
    M = bins + 1          # trained states per trajectory: x_{N−1} and one per bin
    rows = _run(tmp_path, "algo=vggflow", f"algo.subsample_bins={bins}")
    # the docstring's cost of the default (fd_terms=spacetime, fd_scheme=forward): "4 velocity and 2 reward-
    # gradient evaluations per trained state", outside the rollout's N no-grad rows per trajectory; one of the
    # four is the matching's v_θ with grad (the only grad row); r(x_1) comes with prepare's ∇r(x̂_1), so no plain
    # reward row
    for r in rows:
        k = r["step"]
        assert r["compute/velocity"] == k * (N * B + 4 * M * B)
        assert (r["compute/v_grad"], r["compute/reward_grad"], r["compute/reward"]) == (k * M * B, k * 2 * M * B, 0)


def test_the_evaluation_is_not_counted(tmp_path):
    """An evaluation after every update counts exactly what a run without periodic evaluation counts."""
    quiet = _run(tmp_path / "quiet", "algo=refl", "eval.every=0")
    loud = _run(tmp_path / "loud", "algo=refl", "eval.every=1")
    assert all("eval/reward" in r for r in loud) and not any("eval/reward" in r for r in quiet[1:-1])
    assert [_compute(r) for r in loud] == [_compute(r) for r in quiet]


def _crash_at(monkeypatch, step):
    original, calls = Trainer.update, {"n": 0}

    def crashing(self):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "update", crashing)
    return original


def test_a_resumed_run_continues_the_counts_exactly(tmp_path, monkeypatch):
    """DRaFT-K with K drawn per trajectory: the cost of each update is random, so only the checkpointed totals
    (and the restored noise stream) give the uninterrupted run's rows."""
    algo = ["algo=draft", "algo.variant=k", "algo.k=4", "algo.k_random=true", "train.checkpoint_every=1",
            "train.steps=5"]
    full = _run(tmp_path / "full", *algo)
    assert len({r["compute/v_grad"] - p["compute/v_grad"] for p, r in zip(full, full[1:])}) > 1   # costs vary
    part = tmp_path / "part"
    original = _crash_at(monkeypatch, 3)            # dies in step 3; the last checkpoint is step 2
    with pytest.raises(KeyboardInterrupt):
        _run(part, *algo)
    monkeypatch.setattr(Trainer, "update", original)
    resumed = _run(part, *algo, f"resume={part}")

    def without_time(rows):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]

    assert without_time(resumed) == without_time(full)


def test_an_old_checkpoint_without_counts_warns_and_restarts_them_at_zero(tmp_path, monkeypatch):
    algo = ["algo=refl", "train.checkpoint_every=1"]
    part = tmp_path / "part"
    original = _crash_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _run(part, *algo)
    monkeypatch.setattr(Trainer, "update", original)
    state_path = part / "checkpoints" / "step_0000002" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    del state["compute"]                             # as written before compute accounting
    torch.save(state, state_path)
    os.remove(str(state_path) + ".sha256")           # older checkpoints had no checksum either
    with pytest.warns(UserWarning, match="before compute accounting.*restart from zero at step 2"):
        rows = _run(part, *algo, f"resume={part}")
    assert rows[-1]["step"] == 3 and rows[-1]["compute/v_nograd"] == N * B      # step 3's update only


@pytest.mark.slow
def test_two_processes_add_their_rows(two_process_draft):
    """The shared two-process run (tests/helpers/torchrun.py): DRaFT-K (K = 2) on N = 6 steps, 4 trajectories per
    process. Each process counts its own rows; the logged figure is both processes' sum."""
    from helpers.torchrun import SHARED_STEPS

    _, run_dir, _ = two_process_draft
    n_steps, K, per_process, world = 6, 2, 4, 2
    per_update = {"v_nograd": world * (n_steps - K) * per_process, "v_grad": world * K * per_process,
                  "v_base": 0, "reward": 0, "reward_grad": world * per_process}
    rows = read_metrics(str(run_dir))
    assert [r["step"] for r in rows] == list(range(SHARED_STEPS + 1))
    for r in rows:
        assert _compute(r) == {k: r["step"] * v for k, v in per_update.items()}
    state = torch.load(run_dir / "checkpoints" / "step_0000002" / "state.pt", weights_only=False)
    assert state["compute"] == {k: 2 * v for k, v in per_update.items()}


# ---- the counter itself ---------------------------------------------------------------------------------------
def _parts_only():
    """Stand-ins for the reward and the algorithm when only a model is counted."""
    return torch.nn.Identity(), SimpleNamespace(rollout=None, prepare=None, loss=None)


def test_a_cfg_velocity_is_one_row_although_the_network_sees_two():
    from align.models.digits import DigitsFlow

    model = DigitsFlow()
    assert model.guidance_scale != 1.0
    seen = []
    model.transformer.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["hidden_states"].shape[0]),
                                                with_kwargs=True)
    counter = EvalCounter(model, *_parts_only())
    x = model.sample_noise(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.velocity(x, torch.full((3,), 0.5), model.encode(["one", "two", "three"]))
    assert sum(seen) == 6                           # conditional and unconditional rows
    assert counter.total() == {"v_nograd": 3, "v_grad": 0, "v_base": 0, "reward": 0, "reward_grad": 0}


def test_the_counts_do_not_change_the_values_and_a_deep_copy_counts_its_own_evaluations(tmp_path):
    from align.setup.assemble import build_parts

    model = build_parts(compose_config(TINY + ["algo=refl", "model.hidden=8"], run_dir=str(tmp_path))).model
    with torch.no_grad():                             # the residual starts at zero (out_scale): make it count
        for p in model.trainable_parameters():
            p.normal_(0.0, 0.3)
    x, t = torch.randn(5, 2, generator=torch.Generator().manual_seed(0)), torch.full((5,), 0.3)
    plain = model.velocity(x, t).detach()
    counter = EvalCounter(model, *_parts_only())
    assert torch.equal(model.velocity(x, t), plain)
    snapshot = copy.deepcopy(model)
    with torch.no_grad():
        for p in snapshot.trainable_parameters():
            p.add_(1.0)
        changed = snapshot.velocity(x, t)
        snapshot.base_velocity(x, t)
    assert not torch.equal(changed, plain)                   # the copy's own parameters, not the original's
    assert torch.equal(model.velocity(x, t).detach(), plain)
    with counter.paused():
        model.velocity(x, t)
    assert counter.total() == {"v_nograd": 5, "v_grad": 10, "v_base": 5, "reward": 0, "reward_grad": 0}
