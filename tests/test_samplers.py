"""Time grids, the one-step prediction, and the Euler sampler against exact flows."""
import math

import torch
from hypothesis import given, settings, strategies as st

from align.models.gmm import GaussianMixtureFlow
from samplers import euler_integrate, make_grid, one_step_prediction, sd3_grid, uniform_grid

# SD3-medium's 20-step shifted grid as printed in the reference (σ), from diffusers' scheduler.
SD3_SIGMAS_20 = [1.0, .98187, .96239, .94137, .91865, .894, .86717, .83785, .80569, .77024, .73097, .68724,
                 .63824, .58295, .52007, .44794, .36435, .26633, .14979, .00893, 0.0]


def test_sd3_grid_matches_reference_values_and_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    t = sd3_grid(20, shift=3.0)
    assert torch.allclose(1 - t, torch.tensor(SD3_SIGMAS_20, dtype=torch.float64), atol=6e-5)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(20)
    assert torch.allclose(1 - t, sched.sigmas.double(), atol=1e-6)
    assert torch.all(t[1:] > t[:-1]) and t[0] == 0 and t[-1] == 1


def test_uniform_grid_and_bad_names():
    assert torch.allclose(uniform_grid(4), torch.tensor([0, .25, .5, .75, 1.], dtype=torch.float64))
    try:
        make_grid("cosine", 4)
    except ValueError as err:
        assert "uniform, sd3" in str(err)
    else:
        raise AssertionError("unknown grid accepted")


@settings(max_examples=50, deadline=None)
@given(t=st.floats(0.0, 0.999), seed=st.integers(0, 2 ** 16))
def test_one_step_prediction_is_exact_on_straight_paths(t, seed):
    """On a straight path x_t = t x_1 + (1 − t) x_0 with v = x_1 − x_0, x̂_1 = x_t + (1 − t) v = x_1."""
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    xt = t * x1 + (1 - t) * x0
    assert torch.allclose(one_step_prediction(xt, t, x1 - x0), x1, atol=1e-12)
    tb = torch.full((3,), t, dtype=torch.float64)
    assert torch.allclose(one_step_prediction(xt, tb, x1 - x0), x1, atol=1e-12)


def _gaussian(cov):
    return GaussianMixtureFlow(weights=[1.0], means=[[0.3, -0.7]], covs=[cov]).double()


def test_euler_converges_to_exact_flow_map_of_a_gaussian_at_first_order():
    """Single Gaussian: x_1 = μ + Σ^{1/2} x_0 exactly (C_0 = I, C_1 = Σ); Euler's error is O(1/N)."""
    cov = [[0.5, 0.2], [0.2, 1.5]]
    model = _gaussian(cov)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(torch.tensor(cov, dtype=torch.float64))
    exact = torch.tensor([0.3, -0.7], dtype=torch.float64) + x0 @ (evecs @ torch.diag(evals.sqrt()) @ evecs.T)
    errs = []
    for n in (50, 100, 200, 400):
        x1 = euler_integrate(lambda x, t: model.base_velocity(x, t), x0, uniform_grid(n), record=False)
        errs.append((x1 - exact).abs().max().item())
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert all(1.8 < r < 2.2 for r in ratios), (errs, ratios)
    assert errs[-1] < 2e-2


def test_euler_intermediate_states_follow_the_flow_map():
    """x_t = tμ + C_t^{1/2} x_0 at every grid time (fine grid)."""
    model = _gaussian([[2.0, 0.0], [0.0, 0.25]])
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = uniform_grid(1000)
    xs = euler_integrate(lambda x, t: model.base_velocity(x, t), x0, ts)
    for k in (250, 500, 750):
        t = float(ts[k])
        c = t ** 2 * torch.tensor([2.0, 0.25], dtype=torch.float64) + (1 - t) ** 2
        exact = t * torch.tensor([0.3, -0.7], dtype=torch.float64) + c.sqrt() * x0
        assert (xs[k] - exact).abs().max() < 5e-3


def test_euler_runs_any_stretch_with_or_without_grad():
    model = _gaussian([[1.0, 0.0], [0.0, 1.0]])
    v = lambda x, t: model.velocity(x, t)  # noqa: E731
    ts = uniform_grid(10)
    x0 = torch.randn(4, 2, dtype=torch.float64)
    full = euler_integrate(v, x0, ts)
    first = euler_integrate(v, x0, ts, start=0, end=6)
    rest = euler_integrate(v, first[-1], ts, start=6, end=10)
    assert full.shape == (11, 4, 2)
    assert torch.equal(torch.cat([first, rest[1:]]), full)
    assert not full.requires_grad
    with_grad = euler_integrate(v, x0, ts, start=7, grad=True, record=False)
    assert with_grad.requires_grad
    loss = with_grad.sum()
    loss.backward()
    assert model.residual.out.weight.grad.abs().sum() > 0   # the zero-initialised output layer gets gradient
    assert math.isfinite(loss.item())
