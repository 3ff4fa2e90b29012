"""A group of G rows sharing a prompt may be larger than a micro-batch (Flow-GRPO and DiffusionNFT): the update's
prompts are drawn in groups, the micro-batches take consecutive rows, and the group statistics come from the whole
update. So G = 4 in micro-batches of one trajectory is the update of one batch of the same trajectories."""
import os

import pytest
import torch

from align.setup.assemble import build_trainer
from align.setup.compose import compose_config
from align.core.interfaces import Algorithm
from helpers.fp64 import ATOL, LINEAR_ADAM, assert_same_parameters, build_linear_fp64_trainer
from samplers import Trajectory

torch.set_num_threads(1)

GMM = ["model=gmm", "reward=linear", "model.hidden=16", "model.depth=2", "sampler.steps=4", "train.batch_size=8",
       "train.lr=1e-2", "eval.n_samples=8", "eval.group_size=4", "eval.final_samples=4",
       "train.progress=false", "device=cpu"]


def _trainer(tmp_path, name: str, overrides: list[str], fp64: bool = False):
    run_dir = str(tmp_path / name)
    if fp64:
        return build_linear_fp64_trainer(compose_config(GMM + overrides + [LINEAR_ADAM], run_dir), run_dir)
    return build_trainer(compose_config(GMM + overrides, run_dir), run_dir)


def _cat(trajs: list[Trajectory]) -> Trajectory:
    """The micro-batches as one batch (gmm is unconditional); per-row extras concatenated on their batch axis."""
    assert all(t.cond is None for t in trajs)
    extras = {}
    for key in trajs[0].extras:
        axis = 1 if key == "log_probs" else 0               # log_probs [N, B]
        extras[key] = torch.cat([t.extras[key] for t in trajs], axis)
    return Trajectory(xs=torch.cat([t.xs for t in trajs], 1), ts=trajs[0].ts, cond=None,
                      prompts=[p for t in trajs for p in t.prompts],
                      reward_x1=torch.cat([t.reward_x1 for t in trajs]), extras=extras)


def _split_rollout(trainer, rows: int, micro: int) -> list[Trajectory]:
    prompts = trainer._draw_prompts(rows)
    return [trainer._rollout_batch(micro, prompts[i:i + micro]) for i in range(0, rows, micro)]


@pytest.mark.parametrize("std_over", ["group", "batch"])
def test_flow_grpo_groups_across_micro_batches_give_the_update_of_one_batch(tmp_path, std_over):
    algo = ["algo=flow_grpo", "algo.group_size=4", f"algo.std_over={std_over}", "algo.train_steps=3"]
    # float64, AdamW linear in the gradient: the parameters after the updates are compared (tests/helpers/fp64.py)
    one = _trainer(tmp_path, "one", algo + ["train.grad_accum=1"], fp64=True)
    eight = _trainer(tmp_path, "eight", algo + ["train.grad_accum=8"], fp64=True)
    assert eight.groups_span_micro_batches() and not one.groups_span_micro_batches()
    start = {k: v.clone() for k, v in one.model.finetune_state_dict().items()}
    for _ in range(2):
        micro = _split_rollout(eight, 8, 1)                 # one trajectory per micro-batch, G = 4
        assert all("advantages" not in t.extras for t in micro)     # a single row has no group of its own
        whole = _cat(micro)
        whole.extras["advantages"] = one.algo.advantages(whole.reward_x1)    # as its rollout does (prepare: again)
        one.learn([whole])
        eight.learn(micro, groups_span=True)
        adv = torch.cat([t.extras["advantages"] for t in micro])
        assert torch.equal(adv, whole.extras["advantages"])
        # independently: the group statistics by hand, over rows 0–3 and 4–7 of the update
        r = whole.reward_x1.double().reshape(2, 4)
        std = r.std(1, correction=0, keepdim=True) if std_over == "group" else r.std(correction=0)
        expected = ((r - r.mean(1, keepdim=True)) / (std + 1e-4)).reshape(-1)
        torch.testing.assert_close(adv.double(), expected, rtol=1e-5, atol=1e-6)
        assert adv.abs().min() > 0.05                      # not vacuous: every row has a non-zero advantage
    assert_same_parameters(one.model.finetune_state_dict(), eight.model.finetune_state_dict())
    moved = max((v - start[k]).abs().max().item() for k, v in one.model.finetune_state_dict().items())
    assert moved > 1e4 * ATOL, moved                       # not vacuous


def test_diffusion_nft_groups_across_micro_batches_give_the_optimality_of_one_batch(tmp_path):
    algo = ["algo=diffusion_nft", "algo.group_size=4", "algo.normaliser=group_std"]
    one = _trainer(tmp_path, "one", algo + ["train.grad_accum=1"])
    four = _trainer(tmp_path, "four", algo + ["train.grad_accum=4"])     # micro-batches of 2, groups of 4
    micro = _split_rollout(four, 8, 2)
    whole = _cat(micro)
    one.algo.prepare([whole], one.generator, lambda t: t)
    four.algo.prepare(micro, four.generator, lambda t: t)
    got = torch.cat([t.extras["optimality"] for t in micro])
    assert torch.equal(got, whole.extras["optimality"])
    r = whole.reward_x1.double().reshape(2, 4)
    A = (r - r.mean(1, keepdim=True)) / (r.std(1, correction=0, keepdim=True) + 1e-4)
    expected = 0.5 + 0.5 * (A / 5.0).clamp(-1, 1)
    torch.testing.assert_close(got.double(), expected.reshape(-1), rtol=1e-5, atol=1e-6)
    # not vacuous: each micro-batch on its own would centre on its own two rows
    assert not torch.allclose(got[:2].double(), 0.5 + 0.5 * ((r[0, :2] - r[0, :2].mean()) / (
        r[0, :2].std(correction=0) + 1e-4) / 5.0).clamp(-1, 1))


@pytest.mark.parametrize("algo", ["flow_grpo", "diffusion_nft"])
def test_the_trainer_lays_groups_over_consecutive_micro_batches(tmp_path, algo):
    run_dir = str(tmp_path / "run")
    cfg = compose_config(["model=digits", "reward=digits_classifier", f"algo={algo}", "algo.group_size=4",
                          "train.batch_size=8", "train.grad_accum=4", "sampler.steps=4", "train.steps=2",
                          "train.progress=false", "eval.every=0", "eval.n_samples=8", "eval.group_size=4",
                          "eval.final_samples=2", "device=cpu"], run_dir)
    trainer = build_trainer(cfg, run_dir)
    seen: list[Trajectory] = []
    rollout = trainer.algo.rollout

    def spy(x0, prompts, cond, generator):
        seen.append(rollout(x0, prompts, cond, generator))
        return seen[-1]

    trainer.algo.rollout = spy
    before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    trainer.train()
    assert len(seen) == 8 and all(len(t.prompts) == 2 for t in seen)
    for update in (seen[:4], seen[4:]):
        prompts = [p for t in update for p in t.prompts]
        assert prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4
        if algo == "flow_grpo":      # advantages centred on each group's mean, over the two micro-batches it spans
            centred = torch.cat([t.extras["advantages"] for t in update]).double()
        else:                        # optimality ½ + ½ A/adv_clip, A centred on each group's mean (no clip here)
            centred = torch.cat([t.extras["optimality"] for t in update]).double() - 0.5
        torch.testing.assert_close(centred.reshape(2, 4).sum(1), torch.zeros(2, dtype=torch.float64),
                                   atol=1e-5, rtol=0)
        assert centred.abs().max() > 1e-3
    assert sum((p.detach() - b).abs().sum().item() for p, b in zip(trainer.model.trainable_parameters(), before)) > 0


class _PairsInOneBatch(Algorithm):
    """A user's algorithm with groups of 2 that must stay inside a micro-batch (the interface's default)."""
    name = "pairs"

    @property
    def group_size(self) -> int:
        return 2

    def loss(self, traj, generator):
        return self.model.velocity(traj.xs[0], self.ts[:1].expand(traj.xs.shape[1]), traj.cond).square().mean(), {}


def test_groups_that_must_stay_in_a_micro_batch_are_refused_before_any_work(tmp_path, monkeypatch):
    from omegaconf import open_dict

    from align.core.registry import ALGORITHMS

    monkeypatch.setitem(ALGORITHMS._entries, "pairs", _PairsInOneBatch)     # a user's algorithm, for this test
    for accum in (8, 1):
        run_dir = str(tmp_path / f"run{accum}")
        cfg = compose_config(GMM + ["algo=refl", f"train.grad_accum={accum}"], run_dir)
        with open_dict(cfg):
            cfg.algo = {"name": "pairs", "group_size": 2, "lr": 1e-2}
        if accum == 1:                                      # groups of 2 inside micro-batches of 8: fine
            assert not build_trainer(cfg, run_dir).groups_span_micro_batches()
            continue
        with pytest.raises(ValueError, match="algo=pairs's groups of algo.group_size=2 must lie within one "
                                             "micro-batch \\(here train.batch_size / train.grad_accum = 1\\)"):
            build_trainer(cfg, run_dir)
        assert not os.path.exists(run_dir)
