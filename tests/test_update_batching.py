"""One update is one update, however it is split: VGG-Flow's reward-gradient clip threshold (the 80th percentile
of ‖∇r(x̂_1)‖) is taken over the whole update, so 4 micro-batches of 2 trajectories give the same parameters as
one batch of the same 8 trajectories."""
import torch

from align.setup.compose import compose_config
from algorithms.common.reward_grad import per_sample_norms
from helpers.fp64 import ATOL, LINEAR_ADAM, assert_same_parameters, build_linear_fp64_trainer
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
    """In float64 with AdamW linear in the gradient (tests/helpers/fp64.py): the parameters after the updates are
    compared, and the residual's finite differences divide by h (3e-5), so in float32 the rounding of kernels whose
    result depends on the batch size (1e-7) reaches φ's Adam steps at 1e-6 and beyond — float noise, not the
    split."""
    cfg = compose_config(OVERRIDES + [LINEAR_ADAM, f"train.grad_accum={accum}"], str(tmp_path / name))
    return build_linear_fp64_trainer(cfg, str(tmp_path / name))


def test_grad_accum_4_gives_the_update_of_one_batch(tmp_path):
    one, four = _fp64_trainer(tmp_path, "a", 1), _fp64_trainer(tmp_path, "b", 4)
    start = [{k: v.clone() for k, v in part.items()} for part in (one.model.finetune_state_dict(),
                                                                   one.algo.state_dict())]
    for _ in range(2):
        micro = [four._rollout_batch(2) for _ in range(4)]
        whole = [_cat(micro)]
        one.learn(whole)
        four.learn(micro)
        assert torch.equal(one.algo.tau, four.algo.tau)
        # not vacuous: the micro-batches' own thresholds differ from the update's
        per_micro = [torch.quantile(per_sample_norms(t.extras["vgg_grad_r"]), 0.8) for t in micro]
        assert max(abs(float(q - one.algo.tau)) for q in per_micro) > 1e-3
    assert_same_parameters(one.model.finetune_state_dict(), four.model.finetune_state_dict())
    assert_same_parameters(one.algo.state_dict(), four.algo.state_dict())
    for before, after in zip(start, (one.model.finetune_state_dict(), one.algo.state_dict())):   # not vacuous
        assert max((after[k] - v).abs().max().item() for k, v in before.items()) > 1e4 * ATOL
