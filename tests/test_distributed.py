"""Two processes on the CPU (torchrun + gloo through accelerate): gradients are averaged so one update equals a
one-process update on the union of both batches, the processes draw different noise, checkpointing does not
hang, and a resumed two-process run continues exactly. Evaluation and the final samples, sharded over the
processes, equal one process's bitwise; gradients take one all-reduce per parameter group; the collective
timeout key reaches the process group. The launches: tests/helpers/torchrun.py (the shared runs: tests/conftest.py).

Parameters after AdamW updates are compared in float64 (tests/helpers/fp64.py: in float32 the one-process and
two-process sums round differently and Adam amplifies that without bound)."""
import json
import shutil

import pytest
import torch

from align.evaluate import main as evaluate_main
from align.core.run_dir import FINISHED_FILE, read_metrics
from helpers.fp64 import ATOL, LINEAR_ADAM, assert_same_parameters, build_linear_fp64_trainer
from helpers.torchrun import SHARED_ENV, SHARED_EXTRA, SHARED_STEPS, torchrun


def _one_process(overrides: list[str], steps: int, noise: list[torch.Tensor], run_dir) -> dict[str, dict]:
    """One process in float64 (tests/helpers/fp64.py) on the global batches ``noise`` (one per update): its θ and
    the algorithm's state."""
    from align.setup.compose import compose_config

    cfg = compose_config(overrides + [LINEAR_ADAM, f"train.steps={steps}"], str(run_dir))
    one = build_linear_fp64_trainer(cfg, str(run_dir))
    batches, own = list(noise), one.model.sample_noise
    one.model.sample_noise = lambda n, generator: batches.pop(0) if batches else own(n, generator)
    one.train()
    assert not batches                                       # every update drew its batch from ``noise``
    return {"params": one.model.finetune_state_dict(), "algo": one.algo.state_dict()}


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_global_batch(two_process_draft, tmp_path):
    from helpers.dist_worker import OVERRIDES

    _, _, two = two_process_draft
    assert [w["world"] for w in two] == [2, 2]
    # every process ended its process group (one exiting with a live gloo group can abort at exit)
    assert [w["group_alive_after_train"] for w in two] == [False, False]
    # each process drew its own noise
    for step in range(SHARED_STEPS):
        assert not torch.allclose(two[0]["x0"][step], two[1]["x0"][step])
    # the processes hold the same parameters (gradients were averaged before the step)
    for k, v in two[0]["params"].items():
        assert torch.equal(v, two[1]["params"][k]), k

    # one process, batch 8 = both processes' x_0 side by side, gives the same parameters
    noise = [torch.cat([two[0]["x0"][s], two[1]["x0"][s]]) for s in range(SHARED_STEPS)]
    one = _one_process(OVERRIDES + ["train.batch_size=8"], SHARED_STEPS, noise, tmp_path / "one")
    assert_same_parameters(two[0]["params"], one["params"])
    moved = max((v - two[0]["start_params"][k]).abs().max().item() for k, v in two[0]["params"].items())
    assert moved > 1e4 * ATOL, moved                      # not vacuous


@pytest.mark.slow
def test_a_two_process_run_resumes_exactly(two_process_draft):
    """The checkpoint holds both processes' noise streams; resuming the run from its step-2 checkpoint with two
    processes continues exactly as the run went on (a copy of it, interrupted after that checkpoint)."""
    tmp, run, straight = two_process_draft
    state = torch.load(run / "checkpoints" / "step_0000002" / "state.pt", weights_only=False)
    assert len(state["rng"]) == 2
    cut = tmp / "interrupted"
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / f"step_{SHARED_STEPS:07d}")
    (cut / FINISHED_FILE).unlink()
    resumed = torchrun(tmp, cut, SHARED_STEPS, tmp / "resumed_out", mode="resume", extra=SHARED_EXTRA,
                       env_extra=SHARED_ENV)
    for r in (0, 1):
        assert resumed[r]["step"] == SHARED_STEPS
        # the noise drawn after the resume: the third update's batch, then the final samples' (their own stream)
        assert len(resumed[r]["x0"]) == len(straight[r]["x0"]) - 2 == 2
        for got, want in zip(resumed[r]["x0"], straight[r]["x0"][2:]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        for k, v in straight[r]["params"].items():
            torch.testing.assert_close(resumed[r]["params"][k], v, rtol=0, atol=0)


# One state per bin (subsample_bins = sampler.steps): the training states do not depend on the index draws. Central
# differences at h = 1e-3: φ's gradient divides network outputs by h, so a larger h keeps the summation-order
# rounding it amplifies small (tests/helpers/fp64.py); the clip threshold under test does not depend on the scheme
# (tests/test_update_batching.py checks the default one).
VGG = ["algo=vggflow", "reward=quadratic", "reward.center=[1.0,0.5]", "reward.precision=[[1.0,0.3],[0.3,0.6]]",
       "algo.subsample_bins=6", "algo.fd_terms=separate", "algo.fd_scheme=central", "algo.fd_eps=1e-3",
       "algo.fd_delta=1e-3"]


@pytest.mark.slow
def test_vggflow_two_processes_with_accumulation_equal_one_big_batch(tmp_path):
    """The reward-gradient clip threshold is the quantile over the whole update: 2 processes × 2 micro-batches of
    2 trajectories give the update of one process with all 8 (θ and φ, float64)."""
    from helpers.dist_worker import BASE

    two = torchrun(tmp_path, tmp_path / "two", 2, tmp_path / "two_out",
                   extra=VGG + ["train.grad_accum=2", LINEAR_ADAM], env_extra=SHARED_ENV)
    for k, v in two[0]["params"].items():
        assert torch.equal(v, two[1]["params"][k]), k
    noise = [torch.cat([two[r]["x0"][2 * s + m] for r in (0, 1) for m in (0, 1)]) for s in range(2)]
    one = _one_process(BASE + VGG + ["train.batch_size=8"], 2, noise, tmp_path / "one")
    assert_same_parameters(two[0]["params"], one["params"])
    assert_same_parameters(two[0]["algo"], one["algo"])
    for key in ("params", "algo"):      # not vacuous: θ and φ moved far beyond the tolerance
        moved = max((v - two[0][f"start_{key}"][k]).abs().max().item() for k, v in two[0][key].items())
        assert moved > 1e4 * ATOL, (key, moved)


@pytest.mark.slow
def test_a_non_finite_loss_on_one_process_skips_the_update_on_all(tmp_path):
    """Rank 1's first loss is NaN: both ranks skip that update (skipped = 1 on each) and keep identical parameters."""
    two = torchrun(tmp_path, tmp_path / "nan", 3, tmp_path / "nan_out", env_extra={"ALIGN_TEST_NAN_RANK": "1"})
    assert [w["skipped"] for w in two] == [1, 1]
    for k, v in two[0]["params"].items():
        assert torch.equal(v, two[1]["params"][k]), k


# Sharded evaluation: the shared probe run (tests/helpers/torchrun.py PROBE, fixture ``two_process_probe``).
def _eval_row(run_dir, step: int) -> dict:
    row = next(r for r in read_metrics(str(run_dir)) if r["step"] == step and "eval/reward" in r)
    return {k: v for k, v in row.items() if k.startswith("eval/")}


def _evaluated(argv: list[str], out) -> dict:
    """One process: ``python -m align.evaluate`` writes metrics.json (and samples.pt) into ``out``."""
    assert evaluate_main(argv + ["--out", str(out)]) == 0
    with open(out / "metrics.json", encoding="utf-8") as fh:
        return {k: v for k, v in json.load(fh).items() if k != "step"}


@pytest.mark.slow
def test_a_two_process_evaluation_equals_the_one_process_evaluation_bitwise(two_process_probe):
    from helpers.dist_worker import BASE
    from helpers.torchrun import PROBE

    tmp, run, _ = two_process_probe
    # the trained model (step 2) and its final samples: one process re-evaluates the checkpoint
    assert _evaluated([str(run), "--samples", "37"], tmp / "one") == _eval_row(run, 2)
    one, two = torch.load(tmp / "one" / "samples.pt"), torch.load(run / FINISHED_FILE)
    assert len(two["x1"]) == 37 and two["prompts"] == one["prompts"]
    assert torch.equal(two["x0"], one["x0"]) and torch.equal(two["x1"], one["x1"])
    # the base model (the step-0 row, which sampled the base and the independent reference sets sharded)
    assert _evaluated(BASE + PROBE, tmp / "base") == _eval_row(run, 0)


@pytest.mark.slow
def test_gradients_are_averaged_with_one_all_reduce_per_parameter_group(two_process_probe):
    _, _, ranks = two_process_probe
    groups = ranks[0]["groups"]
    assert groups == 2 and len(ranks[0]["local"][0]) > groups          # θ and φ, many tensors
    for step in range(2):
        for w in ranks:
            # one flattened buffer per group, as large as the group's tensors together
            assert len(w["calls"][step]) == groups and sum(w["calls"][step]) == sum(
                g.numel() for g in w["local"][step])
        assert not ranks[1]["local"][step][0].any()                     # rank 1's missing gradient: zeros
        for i, (g0, g1) in enumerate(zip(ranks[0]["local"][step], ranks[1]["local"][step])):
            expected = (g0 + g1) / 2                                     # the per-tensor mean, by hand
            for w in ranks:
                assert torch.equal(w["averaged"][step][i], expected), (step, i)


@pytest.mark.slow
def test_the_collective_timeout_reaches_the_process_group(two_process_probe):
    _, _, ranks = two_process_probe
    assert [w["timeout_s"] for w in ranks] == [321.0, 321.0]


@pytest.mark.parametrize("n, size, world", [(40, 32, 2), (37, 32, 2), (160, 32, 3), (8, 32, 2), (100, 7, 4)])
def test_shards_split_the_one_process_chunks_in_order_as_evenly_as_whole_chunks_allow(n, size, world):
    from align.train.sharding import Shard

    shards = [list(Shard(r, world).starts(n, size)) for r in range(world)]
    assert [s for part in shards for s in part] == list(range(0, n, size))     # every chunk once, rank order
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
