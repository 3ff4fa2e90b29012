"""VGG-Flow's loss takes v_θ with grad only after the φ terms: the consistency residual's new reward gradients
(a decode-and-reward graph per perturbed state) are then never alive together with v_θ's activations, so the peak of
a micro-batch is the larger of the two, not their sum (docs/flux.md#hardware-and-memory). Counted through
autograd's saved-tensor hooks, by what saved each tensor."""
import pytest
import torch

from align.setup.assemble import build_trainer
from align.setup.compose import compose_config
from helpers.saved_bytes import AliveSavedBytes, storages

torch.set_num_threads(1)

GMM = ["model=gmm", "reward=quadratic", "reward.center=[1.0,0.5]", "reward.precision=[[1.0,0.3],[0.3,0.6]]",
       "algo=vggflow", "model.hidden=16", "model.depth=2", "sampler.steps=4", "algo.subsample_bins=2",
       "train.batch_size=4", "eval.n_samples=8", "eval.final_samples=4", "train.progress=false", "device=cpu"]


def _loss_under_count(tmp_path, extra: list[str]):
    """One micro-batch's prepare + loss under the counter; v_θ's bytes alive at each reward call with grad, the
    bytes v_θ holds when the loss returns, and the size of the loss's gradient per parameter group."""
    run_dir = str(tmp_path / "_".join(extra or ["default"]).replace("=", "-"))
    trainer = build_trainer(compose_config(GMM + extra, run_dir), run_dir)
    model, reward, algo = trainer.model, trainer.reward, trainer.algo
    counter = AliveSavedBytes(storages(model, reward, algo))
    at_reward_grads: list[int] = []
    velocity, score = model.velocity, reward.forward

    def counted_velocity(x, t, cond=None):
        if not torch.is_grad_enabled():
            return velocity(x, t, cond)
        with counter.tagged("v_theta"):
            return velocity(x, t, cond)

    def spied_reward(images, prompts=None):
        if torch.is_grad_enabled():
            at_reward_grads.append(counter.alive_by["v_theta"])
        return score(images, prompts)

    traj = trainer._rollout_batch(4)
    algo.prepare([traj], trainer.generator, lambda n: n)
    model.velocity, reward.forward = counted_velocity, spied_reward
    try:
        with counter.counting():
            loss, _ = algo.loss(traj, trainer.generator)
            held = counter.alive_by["v_theta"]
            grads = {}
            for g in algo.param_groups():
                parts = torch.autograd.grad(loss, g["params"], retain_graph=True, allow_unused=True)
                grads[g["name"]] = sum(float(x.abs().sum()) for x in parts if x is not None)
            del loss
    finally:
        model.velocity, reward.forward = velocity, score
    assert counter.alive == 0                             # every graph was freed
    return at_reward_grads, held, grads


@pytest.mark.parametrize("scheme", [[], ["algo.fd_terms=separate", "algo.fd_scheme=central"]],
                         ids=["spacetime-forward", "separate-central"])
def test_the_residual_s_reward_gradients_never_share_memory_with_v_theta_s_graph(tmp_path, scheme):
    at_reward_grads, held, grads = _loss_under_count(tmp_path, scheme)
    assert len(at_reward_grads) >= 1                      # the residual took reward gradients inside the loss
    assert at_reward_grads == [0] * len(at_reward_grads)  # ... with none of v_θ's saved tensors alive
    assert held > 0                                       # v_θ's graph exists, built after them
    assert set(grads) == {"theta", "phi"} and min(grads.values()) > 0     # the loss reaches θ and φ


def test_within_step_times_keep_v_theta_first_and_the_counter_sees_it(tmp_path):
    """within_step needs v_θ for its Euler segment, so there v_θ's graph is alive at the reward calls: the same
    counter sees it (what the default order avoids)."""
    at_reward_grads, held, _ = _loss_under_count(tmp_path, ["algo.consistency_times=within_step"])
    assert at_reward_grads and min(at_reward_grads) > 0 and held > 0
