"""DRaFT-K and DRaFT-LV (reference §4): gradients against independent computations, and a short training run."""
import pytest
import torch
from omegaconf import OmegaConf

from algorithms.draft import DRaFT
from align.setup.compose import compose_config
from align.models.gmm import GaussianMixtureFlow
from rewards.analytic import LinearReward
from samplers import euler_integrate, uniform_grid

C = torch.tensor([1.0, 0.5])
OBJ = {"relu": lambda r: -torch.relu(r), "hinge": lambda r: torch.relu(1.0 - r), "raw": lambda r: -r}


def make(N=6, dtype=torch.float32, **algo):
    torch.manual_seed(0)
    model = GaussianMixtureFlow(weights=[0.5, 0.5], means=[[-1.5, 0.0], [1.5, 0.0]],
                                covs=[[[0.25, 0.0], [0.0, 0.25]]] * 2, hidden=16, depth=2)
    with torch.no_grad():   # a non-trivial θ, so the x-chain and every layer matter
        for p in model.residual.parameters():
            p.normal_(0.0, 0.3)
    model.to(dtype)
    return DRaFT(OmegaConf.create({"lr": 1e-4, **algo}), model, LinearReward(C.tolist()), uniform_grid(N))


def params(algo):
    return list(algo.model.trainable_parameters())


def draft_grads(algo, x0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    traj = algo.rollout(x0, [""] * len(x0), None, gen)
    loss, _ = algo.loss(traj, gen)
    return loss, torch.autograd.grad(loss, params(algo)), traj


def draft_loss(algo, x0, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return algo.loss(algo.rollout(x0, [""] * len(x0), None, gen), gen)[0]


def hand_unrolled_loss(model, x0, ts, K, objective):
    """Per-trajectory: Euler without grad to N − K_b, then K_b Euler steps with grad; mean of ℓ(cᵀx_N)."""
    N, losses = len(ts) - 1, []
    for b in range(len(x0)):
        x = x0[b:b + 1]
        for j in range(N):
            t = torch.full((1,), float(ts[j]), dtype=x.dtype)
            if j < N - int(K[b]):
                with torch.no_grad():
                    x = x + float(ts[j + 1] - ts[j]) * model.velocity(x, t)
            else:
                x = x + float(ts[j + 1] - ts[j]) * model.velocity(x, t)
        losses.append(OBJ[objective](x.float() @ C))
    return torch.cat(losses).mean()


@pytest.mark.parametrize("objective", ["relu", "hinge", "raw"])
@pytest.mark.parametrize("k", [1, 3])
def test_draft_k_gradient_equals_hand_unrolled_last_k_steps(k, objective):
    algo = make(variant="k", k=k, objective=objective)
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    loss, grads, _ = draft_grads(algo, x0)
    ref = hand_unrolled_loss(algo.model, x0, algo.ts, [k] * 8, objective)
    ref_grads = torch.autograd.grad(ref, params(algo))
    assert torch.allclose(loss, ref, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-5)
    # Truncation matters: backpropagating through all N steps gives a different gradient.
    full = torch.autograd.grad(hand_unrolled_loss(algo.model, x0, algo.ts, [6] * 8, objective), params(algo))
    assert not all(torch.allclose(g, f, atol=1e-6) for g, f in zip(grads, full))


def fd_check(grads, f, ps, h=1e-3):
    """Central differences of f() on the first entry of every parameter tensor against ``grads``."""
    for (i, p), g in zip(enumerate(ps), grads):
        idx = (0,) * p.dim()
        with torch.no_grad():
            p[idx] += h
            up = f()
            p[idx] -= 2 * h
            down = f()
            p[idx] += h
        fd = float(up - down) / (2 * h)
        assert abs(fd - float(g[idx])) < 1e-5 + 1e-3 * abs(fd), (i, fd, float(g[idx]))


@pytest.mark.parametrize("k", [2, 6])
def test_draft_k_gradient_matches_finite_differences(k):
    """K < N: FD of ℓ(x_N(θ)) with x_{N−K} frozen at the current θ. K = N: FD of the whole sampling chain."""
    N = 6
    algo = make(N=N, variant="k", k=k, objective="raw", dtype=torch.float64)
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, grads, traj = draft_grads(algo, x0)
    x_start = traj.xs[N - k].detach()

    def last_k_steps():
        x = euler_integrate(lambda x, t: algo.model.velocity(x, t), x_start, algo.ts, N - k, N, record=False)
        return -(x.float() @ C).mean()

    fd_check(grads, last_k_steps, params(algo))
    if k == N:
        fd_check(grads, lambda: draft_loss(algo, x0), params(algo))


def test_draft_k_early_steps_are_not_in_the_graph():
    N, K = 6, 3
    algo = make(N=N, variant="k", k=K, objective="raw")
    calls = []
    velocity = algo.model.velocity

    def spy(x, t, cond=None):
        calls.append((torch.is_grad_enabled(), x.requires_grad, float(t[0])))
        return velocity(x, t, cond)

    algo.model.velocity = spy
    x0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    traj = algo.rollout(x0, [""] * 4, None, gen)
    loss, _ = algo.loss(traj, gen)
    assert len(calls) == N
    grad_calls = [c for c in calls if c[0]]
    assert [c[2] for c in grad_calls] == pytest.approx([float(t) for t in algo.ts[N - K:N]])
    # The first grad step starts from sg(x_{N−K}); the later ones keep the x-chain.
    assert [c[1] for c in grad_calls] == [False] + [True] * (K - 1)
    assert torch.autograd.grad(loss, x0, allow_unused=True)[0] is None


def test_draft_k_random_is_drawn_once_per_trajectory():
    algo = make(variant="k", k=3, k_random=True, objective="raw")
    draws = algo.draw_k(3000, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 2, 3}
    x0 = torch.randn(12, 2, generator=torch.Generator().manual_seed(6))
    loss, grads, traj = draft_grads(algo, x0, seed=2)
    K = traj.extras["K"]
    assert K.shape == (12,) and len(set(K.tolist())) > 1
    ref = hand_unrolled_loss(algo.model, x0, algo.ts, K.tolist(), "raw")
    for g, r in zip(grads, torch.autograd.grad(ref, params(algo))):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("objective", ["relu", "raw"])
def test_draft_lv_uses_n_renoised_copies_and_matches_independent_gradient(objective):
    n, B, N = 3, 5, 6
    algo = make(N=N, variant="lv", n=n, objective=objective)
    model = algo.model
    x0 = torch.randn(B, 2, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
    gen = torch.Generator().manual_seed(8)
    traj = algo.rollout(x0, [""] * B, None, gen)
    state = gen.get_state()

    calls = []
    velocity = model.velocity
    model.velocity = lambda x, t, cond=None: calls.append((x.detach().clone(), t.clone())) or velocity(x, t, cond)
    loss, logs = algo.loss(traj, gen)
    model.velocity = velocity
    grads = torch.autograd.grad(loss, params(algo), retain_graph=True)
    assert torch.autograd.grad(loss, x0, allow_unused=True)[0] is None

    # Independent: ε_i from the same stream, x̃ = (1 − σ) x_N + σ ε_i, one Euler step from t_{N−1}.
    t_last = float(algo.ts[N - 1])
    sigma = 1.0 - t_last
    eps = torch.randn((n, B, 2), generator=torch.Generator().set_state(state))
    x_N = euler_integrate(lambda x, t: velocity(x, t), x0.detach(), algo.ts, record=False)
    ref = 0.0
    for i in range(n):
        x_t = (1 - sigma) * x_N + sigma * eps[i]
        x_hat = x_t + (1 - t_last) * model.velocity(x_t, torch.full((B,), t_last))
        ref = ref + OBJ[objective](x_hat @ C).mean() / n
    assert len(calls) == 1 and calls[0][0].shape == (n * B, 2)
    assert torch.allclose(calls[0][1], torch.full((n * B,), t_last))
    assert torch.allclose(calls[0][0], ((1 - sigma) * x_N + sigma * eps).reshape(n * B, 2), atol=1e-6)
    assert logs["renoise_sigma"] == pytest.approx(sigma)
    assert torch.allclose(loss, ref, atol=1e-6)
    for g, r in zip(grads, torch.autograd.grad(ref, params(algo))):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-5)


def test_draft_lv_with_the_last_step_is_flowbps_n_plus_one_rows():
    """``lv_include_last``: FlowBP's DRaFT-LV (flowbp/trainers/sd35/draft_lv.py): the un-noised last step from
    x_{N−1}, with grad, is a row beside the n re-noised copies, and the loss is the mean over the n + 1 (by hand)."""
    n, B, N = 2, 4, 6
    algo = make(N=N, variant="lv", n=n, objective="raw", lv_include_last=True)
    model = algo.model
    x0 = torch.randn(B, 2, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(8)
    traj = algo.rollout(x0, [""] * B, None, gen)
    state = gen.get_state()
    loss, _ = algo.loss(traj, gen)
    t_last, sigma = float(algo.ts[N - 1]), 1.0 - float(algo.ts[N - 1])
    xs = euler_integrate(lambda x, t: model.velocity(x, t), x0, algo.ts)
    eps = torch.randn((n, B, 2), generator=torch.Generator().set_state(state))
    rows = [xs[N - 1]] + [(1 - sigma) * xs[N] + sigma * eps[i] for i in range(n)]
    t = torch.full((B,), t_last)
    ref = sum(OBJ["raw"]((x + (1 - t_last) * model.velocity(x, t)) @ C).mean() for x in rows) / (n + 1)
    assert torch.allclose(loss, ref, atol=1e-6)
    for g, r in zip(torch.autograd.grad(loss, params(algo)), torch.autograd.grad(ref, params(algo))):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-5)
    plain = make(N=N, variant="lv", n=n, objective="raw")           # not vacuous: the extra row changes the loss
    assert not torch.allclose(plain.loss(traj, torch.Generator().set_state(state))[0], loss, atol=1e-4)


@pytest.mark.parametrize("bad, match", [({"variant": "x"}, "variant"), ({"variant": "k", "k": 0}, "algo.k"),
                                        ({"variant": "k", "k": 7}, "algo.k"), ({"n": 0}, "algo.n"),
                                        ({"objective": "exp"}, "objective")])
def test_draft_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        make(N=6, **bad)


def mean_reward(trainer, x0):
    x1 = euler_integrate(lambda x, t: trainer.model.velocity(x, t, None), x0, trainer.ts, record=False)
    return float(trainer.reward(x1, [""] * len(x1)).mean())


@pytest.mark.parametrize("variant", ["lv", "k"])
def test_draft_training_raises_reward(tmp_path, variant):
    from align.setup.assemble import build_trainer

    cfg = compose_config(["algo=draft", "reward=linear", f"algo.variant={variant}", "algo.k=2", "train.batch_size=64",
                          "train.lr=3e-3", "sampler.steps=10", "train.progress=false", "model.hidden=32"],
                         str(tmp_path))
    trainer = build_trainer(cfg, str(tmp_path))
    x0 = trainer.model.sample_noise(512, torch.Generator().manual_seed(123))
    before = mean_reward(trainer, x0)
    losses = [trainer.update()["loss"] for _ in range(40)]
    after = mean_reward(trainer, x0)
    assert after > before + 1.0, (before, after)
    assert sum(losses[-10:]) < sum(losses[:10])
