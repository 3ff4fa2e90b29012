"""ReFL (reference §4): the truncation step, the one-step gradient, and a short training run."""
import pytest
import torch
from omegaconf import OmegaConf

from algorithms.refl import ReFL, truncation_range
from align.setup.compose import compose_config
from align.models.gmm import GaussianMixtureFlow
from rewards.analytic import LinearReward
from samplers import euler_integrate, uniform_grid

C = torch.tensor([1.0, 0.5])
OBJ = {"relu": lambda r: -torch.relu(r), "hinge": lambda r: torch.relu(1.0 - r), "raw": lambda r: -r}


def make(N=20, **algo):
    torch.manual_seed(0)
    model = GaussianMixtureFlow(weights=[0.5, 0.5], means=[[-1.5, 0.0], [1.5, 0.0]],
                                covs=[[[0.25, 0.0], [0.0, 0.25]]] * 2, hidden=16, depth=2)
    with torch.no_grad():
        for p in model.residual.parameters():
            p.normal_(0.0, 0.3)
    return ReFL(OmegaConf.create({"lr": 1e-4, **algo}), model, LinearReward(C.tolist()), uniform_grid(N))


def test_refl_truncation_stays_in_range_and_hits_every_step():
    algo = make()
    k = algo.draw_truncation(3000, torch.Generator().manual_seed(0))
    assert set(k.tolist()) == {15, 16, 17, 18, 19}
    # Drawn per trajectory in rollout, from the generator it is given.
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    k1 = algo.rollout(x0, [""] * 64, None, torch.Generator().manual_seed(5)).extras["k"]
    k2 = algo.rollout(x0, [""] * 64, None, torch.Generator().manual_seed(5)).extras["k"]
    assert k1.shape == (64,) and torch.equal(k1, k2) and len(set(k1.tolist())) > 1
    assert set(k1.tolist()) <= set(range(15, 20))


def test_refl_truncation_scales_with_the_grid_and_rejects_bad_ranges():
    assert truncation_range([15, 20], 20, 20) == (15, 20)
    assert truncation_range([15, 20], 20, 10) == (8, 10)      # k/10 ∈ [0.75, 1)
    assert truncation_range([15, 20], 20, 40) == (30, 40)
    assert truncation_range([15, 20], 20, 4) == (3, 4)
    assert set(make(N=10).draw_truncation(500, torch.Generator().manual_seed(0)).tolist()) == {8, 9}
    for bad in ([15, 21], [5, 5], [-1, 3], [19, 15]):
        with pytest.raises(ValueError, match="algo.truncation"):
            truncation_range(bad, 20, 20)
    with pytest.raises(ValueError, match="contains no step"):
        make(N=2)
    with pytest.raises(ValueError, match="two integers"):
        make(truncation=[15])
    with pytest.raises(ValueError, match="objective"):
        make(objective="exp")


@pytest.mark.parametrize("objective", ["relu", "hinge", "raw"])
def test_refl_gradient_is_the_single_step_from_the_detached_state(objective):
    N, B = 8, 12
    algo = make(N=N, truncation=[10, 20], objective=objective)      # k ∈ {4..7} on 8 steps
    model = algo.model
    x0 = torch.randn(B, 2, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    gen = torch.Generator().manual_seed(3)
    traj = algo.rollout(x0, [""] * B, None, gen)
    k = traj.extras["k"]
    assert set(k.tolist()) <= set(range(4, 8)) and len(set(k.tolist())) > 1

    calls = []
    velocity = model.velocity
    model.velocity = lambda x, t, cond=None: calls.append((torch.is_grad_enabled(), x.requires_grad)) or \
        velocity(x, t, cond)
    loss, logs = algo.loss(traj, gen)
    model.velocity = velocity
    assert calls == [(True, False)]                                   # one step, from sg(x_k)
    assert torch.autograd.grad(loss, x0, retain_graph=True, allow_unused=True)[0] is None
    grads = torch.autograd.grad(loss, list(model.trainable_parameters()))

    # Independent: per trajectory, Euler without grad to k_b, then x̂_1 = x_k + (1 − t_k) v_θ(x_k, t_k).
    ref = 0.0
    for b in range(B):
        x = euler_integrate(lambda x, t: velocity(x, t), x0[b:b + 1].detach(), algo.ts, 0, int(k[b]), record=False)
        t_k = float(algo.ts[int(k[b])])
        x_hat = x + (1.0 - t_k) * velocity(x, torch.full((1,), t_k))
        ref = ref + OBJ[objective](x_hat @ C).sum() / B
    assert torch.allclose(loss, ref, atol=1e-6)
    for g, r in zip(grads, torch.autograd.grad(ref, list(model.trainable_parameters()))):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-5)
    assert logs["k_mean"] == pytest.approx(k.float().mean().item())


def test_refl_training_raises_reward(tmp_path):
    from align.setup.assemble import build_trainer

    cfg = compose_config(["algo=refl", "reward=linear", "train.batch_size=64", "train.lr=3e-3", "sampler.steps=10",
                          "train.progress=false", "model.hidden=32"], str(tmp_path))
    trainer = build_trainer(cfg, str(tmp_path))
    x0 = trainer.model.sample_noise(512, torch.Generator().manual_seed(123))

    def mean_reward():
        x1 = euler_integrate(lambda x, t: trainer.model.velocity(x, t, None), x0, trainer.ts, record=False)
        return float(trainer.reward(x1, [""] * len(x1)).mean())

    before = mean_reward()
    losses = [trainer.update()["loss"] for _ in range(40)]
    after = mean_reward()
    assert after > before + 1.0, (before, after)
    assert sum(losses[-10:]) < sum(losses[:10])
