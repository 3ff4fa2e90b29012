"""One update is one update, however it is split: VGG-Flow's reward-gradient clip threshold (the 80th percentile
of ‖∇r(x̂_1)‖) is taken over the whole update, so 4 micro-batches of 2 trajectories give the same parameters as
one batch of the same 8 trajectories."""
import torch

from align.config import compose_config
from align.reward_grad import per_sample_norms
from align.assemble import build_trainer
from samplers import Trajectory

torch.set_num_threads(1)

OVERRIDES = ["model=gmm", "reward=quadratic", "reward.center=[1.0,0.5]", "reward.precision=[[1.0,0.3],[0.3,0.6]]",
             "algo=vggflow", "model.hidden=16", "model.depth=2", "sampler.steps=4", "algo.subsample_bins=4",
             "train.batch_size=8", "train.lr=1e-2", "eval.n_samples=16", "eval.final_samples=8",
             "train.progress=false", "device=cpu"]


def _cat(trajs: list[Trajectory]) -> Trajectory:
    assert all(t.cond is None for t in trajs)          # gmm is unconditional
    return Trajectory(xs=torch.cat([t.xs for t in trajs], 1), ts=trajs[0].ts, cond=None,
                      prompts=[p for t in trajs for p in t.prompts],
                      extras={"vs": torch.cat([t.extras["vs"] for t in trajs], 1)})


def _fp64_trainer(tmp_path, name: str, accum: int):
    """In fp64: the residual's finite differences divide by h (3e-5), so in fp32 the rounding of kernels whose
    result depends on the batch size (1e-7) reaches φ's Adam steps at 1e-6 — float noise, not the split."""
    trainer = build_trainer(compose_config(OVERRIDES + [f"train.grad_accum={accum}"], str(tmp_path / name)),
                            str(tmp_path / name))
    for part in (trainer.model, trainer.reward, trainer.algo):
        part.double()
    return trainer


def test_grad_accum_4_gives_the_update_of_one_batch(tmp_path):
    one, four = _fp64_trainer(tmp_path, "a", 1), _fp64_trainer(tmp_path, "b", 4)
    for _ in range(2):
        micro = [four._rollout_batch(2) for _ in range(4)]
        whole = [_cat(micro)]
        one.learn(whole)
        four.learn(micro)
        assert torch.equal(one.algo.tau, four.algo.tau)
        # not vacuous: the micro-batches' own thresholds differ from the update's
        per_micro = [torch.quantile(per_sample_norms(t.extras["vgg_grad_r"]), 0.8) for t in micro]
        assert max(abs(float(q - one.algo.tau)) for q in per_micro) > 1e-3
    for k, v in one.model.finetune_state_dict().items():
        torch.testing.assert_close(four.model.finetune_state_dict()[k], v, rtol=1e-5, atol=1e-6)
    for k, v in one.algo.state_dict().items():
        torch.testing.assert_close(four.algo.state_dict()[k], v, rtol=1e-5, atol=1e-6)
