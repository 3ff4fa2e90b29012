"""VGG-Flow's pieces against exact answers: the gradient-HJB residual, the loss plumbing, subsampling, clipping."""
import pytest
import torch
from torch import nn

from align.setup.compose import compose_config
from align.models.gmm import GaussianMixtureFlow
from algorithms.common.reward_grad import clip_per_sample, reward_and_grad
from algorithms.common.subsampling import binned_time_indices
from algorithms.common.value_gradient import consistency_residual
from algorithms.vggflow import VGGFlow
from rewards.analytic import QuadraticReward
from samplers import euler_integrate, one_step_prediction, uniform_grid
from helpers.riccati import base_field, exact_g, value_gradient_coeffs

MU = torch.tensor([0.4, -0.3], dtype=torch.float64)
COV = torch.tensor([[0.6, 0.2], [0.2, 1.4]], dtype=torch.float64)
Q = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
M = torch.tensor([1.0, 1.0], dtype=torch.float64)
BETA = 0.8


def _base():
    return GaussianMixtureFlow(weights=[1.0], means=[MU.tolist()], covs=[COV.tolist()]).double()


def test_residual_vanishes_for_the_exact_value_gradient():
    """g = P(t)x + q(t) from the Riccati equations solves the gradient-HJB: R ≈ 0 (FD error only)."""
    model = _base()
    g = exact_g(MU, COV, Q, M, BETA)
    v_base = lambda x, t: model.base_velocity(x, t)  # noqa: E731
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.85, 0.95], dtype=torch.float64)
    R = consistency_residual(g, v_base, x, t, BETA, eps=1e-4, delta=1e-4)
    terms = (g(x, t + 1e-4) - g(x, t - 1e-4)) / 2e-4        # the size of one term of R
    assert terms.abs().max() > 0.1
    assert R.abs().max() < 1e-6, R
    # The forward scheme is first order: still small, visibly larger.
    R_fwd = consistency_residual(g, v_base, x, t, BETA, eps=1e-4, delta=1e-4, scheme="forward")
    assert 1e-6 < R_fwd.abs().max() < 1e-2


@pytest.mark.parametrize("time_scale", [1.0, 1e-3])
def test_spacetime_difference_of_the_exact_value_gradient(time_scale):
    """∂_t g + J_g(v_base − βg) as one difference along (v_base − βg, 1) (``spacetime=True``): for the Riccati g
    the residual vanishes to the same tolerances as the separate differences (central 1e-6; forward, first order,
    below 1e-2 and visibly above central); with ``time_scale`` c the t-step is h·c, and the result equals
    c·∂_t g + J_g·d computed from the closed form g = P(t)x + q(t)."""
    model = _base()
    g = exact_g(MU, COV, Q, M, BETA)
    v_base = lambda x, t: model.base_velocity(x, t)  # noqa: E731
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.85, 0.95], dtype=torch.float64)
    if time_scale == 1.0:
        R = consistency_residual(g, v_base, x, t, BETA, eps=1e-4, delta=1e-4, spacetime=True)
        assert R.abs().max() < 1e-6, R
        R_fwd = consistency_residual(g, v_base, x, t, BETA, eps=1e-4, delta=1e-4, scheme="forward", spacetime=True)
        assert 1e-6 < R_fwd.abs().max() < 1e-2
    # the g-term alone (v_base ≡ d constant, β = 0: the direction is d and J_{v_base} = 0), against the closed form
    d = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = []
    for xi, ti, di in zip(x, t.tolist(), d):        # J_g = P(t), ∂_t g = Ṗx + q̇ from the Riccati right-hand side
        P, q = value_gradient_coeffs(MU, COV, Q, M, BETA, ti)
        A, b = base_field(MU, COV, ti)
        P_dot, q_dot = BETA * P @ P - (P @ A + A @ P), BETA * P @ q - A @ q - P @ b
        expected.append(time_scale * (P_dot @ xi + q_dot) + P @ di)
    expected = torch.stack(expected)
    for scheme, tol in (("central", 1e-6), ("forward", 1e-2)):
        got = consistency_residual(g, lambda xx, tt: d, x, t, 0.0, 1e-4, 1e-4, scheme, time_scale=time_scale,
                                   spacetime=True)
        assert (got - expected).abs().max() < tol * max(1.0, expected.abs().max().item()), (scheme, got, expected)


class _Counter:
    """Rows evaluated by v_θ (with / without grad), v_base outside v_θ, and the reward with grad (∇r)."""

    def __init__(self, model, reward):
        self.rows = {"v_grad": 0, "v_nograd": 0, "v_base": 0, "rgrad": 0}
        vel, base, fwd = model.velocity, model.base_velocity, reward.forward
        inside = []

        def velocity(x, t, cond=None):
            self.rows["v_grad" if torch.is_grad_enabled() else "v_nograd"] += len(x)
            inside.append(1)
            try:
                return vel(x, t, cond)
            finally:
                inside.pop()

        def base_velocity(x, t, cond=None):
            self.rows["v_base"] += 0 if inside else len(x)
            return base(x, t, cond)

        def forward(images, prompts):
            self.rows["rgrad"] += len(images) if images.requires_grad else 0
            return fwd(images, prompts)

        model.velocity, model.base_velocity, reward.forward = velocity, base_velocity, forward


@pytest.mark.parametrize("terms, scheme, per_state", [
    ("spacetime", "forward", {"v_grad": 1, "v_nograd": 1, "v_base": 2, "rgrad": 2}),
    ("spacetime", "central", {"v_grad": 1, "v_nograd": 2, "v_base": 3, "rgrad": 3}),
    ("separate", "central", {"v_grad": 1, "v_nograd": 4, "v_base": 3, "rgrad": 5}),
])
def test_evaluations_per_trained_state(terms, scheme, per_state):
    """One update's network and reward-gradient evaluations, counted per trained state (B trajectories × (5 bins
    + the last state)). From the definitions: matching needs v_θ (grad), v_base and ∇r(x̂_1) (x̂_1 from the
    rollout's v_θ); a forward difference adds one g (one v_θ for x̂_1, one ∇r) and one v_base, a central one two
    of each, and separate ∂_t / J_g differences double the g evaluations. The boundary's ∇r(x_1) is the last
    state's (its x̂_1 is x_1): no extra row."""
    from rewards.analytic import QuadraticReward
    cfg = compose_config(["reward=quadratic", f"algo.fd_terms={terms}", f"algo.fd_scheme={scheme}"]).algo
    model = GaussianMixtureFlow(weights=[1.0], means=[MU.tolist()], covs=[COV.tolist()])
    reward = QuadraticReward(M.tolist(), Q.tolist())
    ts = uniform_grid(20)
    algo = VGGFlow(cfg, model, reward, ts)
    gen = torch.Generator().manual_seed(0)
    traj = algo.rollout(torch.randn(4, 2, generator=gen), [""] * 4, None, gen)
    counter = _Counter(model, reward)
    loss, _ = algo.loss(traj, gen)
    loss.backward()
    states = 4 * (int(cfg.subsample_bins) + 1)
    assert counter.rows == {k: v * states for k, v in per_state.items()}
    assert torch.equal(traj.reward_x1, reward(traj.x1, [""] * 4))         # r(x_1) kept for the trainer's log


def test_residual_detects_a_wrong_value_gradient():
    model = _base()
    g_true = exact_g(MU, COV, Q, M, BETA)
    wrong = lambda x, t: g_true(x, t) + 0.3 * x * t.unsqueeze(1)  # noqa: E731
    x = torch.randn(4, 2, dtype=torch.float64)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    R = consistency_residual(wrong, lambda x, t: model.base_velocity(x, t), x, t, BETA, eps=1e-4, delta=1e-4)
    assert R.abs().max() > 0.1


class ExactNu(nn.Module):
    """N*(x, t) = β ν*(x, t) = β (g*(x, t) + η_t ∇r(x̂_1)): the value network (velocity units) that makes g_φ exact."""

    def __init__(self, model, reward, eta):
        super().__init__()
        self.model, self.reward, self.eta = model, reward, eta
        self.g = exact_g(MU, COV, Q, M, BETA)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond=None):
        with torch.no_grad():
            xh = one_step_prediction(x, t, self.model.velocity(x, t))
        _, grad = reward_and_grad(self.model, self.reward, xh, [""] * len(x))
        nu = self.g(x.double(), t.double()).to(x) + self.eta(t).unsqueeze(1) * grad.to(x)
        return BETA * nu + 0 * self.dummy


@pytest.mark.parametrize("eta", ["t2", "t", "none"])
def test_vggflow_losses_vanish_at_the_exact_solution(eta):
    """With ν_φ = ν* and v_θ = v_base − βg*, the consistency, boundary and matching losses are all ≈ 0."""
    cfg = compose_config(["reward=quadratic", f"algo.eta={eta}", f"algo.beta={BETA}", "algo.rgrad_clip=none",
                          "algo.fd_eps=1e-4", "algo.fd_delta=1e-4",
                          f"reward.center={M.tolist()}", f"reward.precision={Q.tolist()}"]).algo
    model = _base()
    reward = QuadraticReward(M.tolist(), Q.tolist()).double()
    ts = uniform_grid(20)
    algo = VGGFlow(cfg, model, reward, ts)
    algo.value_net = ExactNu(model, reward, algo.eta)
    g_star = exact_g(MU, COV, Q, M, BETA)
    g_star(torch.zeros(len(ts), 2, dtype=torch.float64), ts)     # the grid's (P, q) in one batched integration

    class OptimalResidual(nn.Module):           # ṽ_θ = −β g*: the matched model
        def forward(self, x, t):
            return -BETA * g_star(x, t)

    model.residual = OptimalResidual()
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    xs = euler_integrate(lambda x, t: model.velocity(x, t), x0, ts)
    from samplers import Trajectory
    loss, logs = algo.loss(Trajectory(xs=xs, ts=ts, prompts=[""] * 8), torch.Generator().manual_seed(0))
    assert logs["loss_match"] < 1e-10
    assert logs["loss_cons"] < 1e-7, logs
    assert logs["loss_bnd"] < 1e-12, logs


def test_subsampling_bins_and_last_state():
    idx = binned_time_indices(20, 5, 2000, torch.Generator().manual_seed(0))
    assert idx.shape == (2000, 6)
    assert (idx[:, 0] == 19).all()
    for j, lo in zip(range(1, 6), (16, 12, 8, 4, 0)):
        col = idx[:, j]
        assert set(col.tolist()) == set(range(max(lo, 1), lo + 4))   # t = 0 never used
    with pytest.raises(ValueError):
        binned_time_indices(4, 5, 1, torch.Generator())


def test_clip_at_the_batch_quantile():
    g = torch.stack([torch.full((3,), float(v)) for v in range(1, 11)])          # norms √3·v
    norms = g.norm(dim=1)
    tau = torch.quantile(norms, 0.8)
    clipped = clip_per_sample(g, tau)
    assert torch.allclose(clipped.norm(dim=1), torch.minimum(norms, tau))
    assert torch.allclose(clipped[:8], g[:8])                                         # below τ untouched
    # direction preserved
    assert torch.allclose(clipped / clipped.norm(dim=1, keepdim=True), g / norms.unsqueeze(1))


def test_parameter_groups_are_theta_and_phi():
    cfg = compose_config(["reward=linear", "algo.value_lr=0.01"])
    model = GaussianMixtureFlow(**{k: cfg.model[k] for k in ("weights", "means", "covs")})
    from rewards.analytic import LinearReward
    algo = VGGFlow(cfg.algo, model, LinearReward([1.0, 0.0]), uniform_grid(20))
    groups = algo.param_groups()
    assert [g["name"] for g in groups] == ["theta", "phi"]
    assert groups[1]["lr"] == 0.01
    theta = {id(p) for p in groups[0]["params"]}
    phi = {id(p) for p in groups[1]["params"]}
    assert theta and phi and not theta & phi


@pytest.mark.parametrize("eta", ["t", "t2"])
def test_eta_is_taken_in_the_trajectorys_precision(eta):
    """g_φ's −η_t·∇r(x̂_1) in float64 at times a few 1e-9 apart (the residual differences g at t and t + δ): η_t
    as float64 arithmetic gives it. Rounded to float32 (spacing 3e-8 near 0.3), two of these times collapse to one
    and the difference of g is off by O(1) relative."""
    cfg = compose_config(["reward=quadratic", f"algo.eta={eta}", "algo.learn_value=false", "algo.rgrad_clip=none"]).algo
    model = _base()
    algo = VGGFlow(cfg, model, QuadraticReward(M.tolist(), Q.tolist()), uniform_grid(20)).double()
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grad_r = torch.randn(1, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).repeat(3, 1)
    t = torch.full((3,), 0.3, dtype=torch.float64)
    dt = torch.tensor([0.0, 4e-9, 8e-9], dtype=torch.float64)
    g = algo.value_gradient(x, t + dt, None, [""] * 3, None, grad_r=grad_r)
    power = {"t": 1, "t2": 2}[eta]
    torch.testing.assert_close(g, -((t + dt) ** power)[:, None] * grad_r, rtol=1e-15, atol=0)
    dg = (g[1:] - g[0]) / grad_r[1:]                          # −(η(t + dt) − η(t)): the same ∇r on every row
    expected = -(((t + dt) ** power) - t ** power)[1:, None].expand_as(dg)
    torch.testing.assert_close(dg, expected, rtol=1e-6, atol=0)     # float64 cancellation: ≈ 1e-16 / 4e-9
