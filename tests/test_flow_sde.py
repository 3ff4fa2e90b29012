"""samplers/flow_sde.py: Flow-GRPO's SDE keeps the flow's marginals, its densities and KL are the Gaussians', and a = 0
is the Euler ODE.

Marginal checks. For one Gaussian N(μ, Σ) the flow's marginal at t is N(tμ, t²Σ + (1 − t)²I) and every step of the
chain is affine, x_{k+1} = M_k x_k + m_k + s_k ε: its mean and covariance follow m ↦ M m + m_k, P ↦ M P Mᵀ + s_k² I
exactly (no Monte Carlo). M_k and m_k are read off the sampler's own step mean (probing it at 0 and the basis
vectors; exact for an affine map), so these tests check the step itself.
"""
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from align.models.gmm import gmm_velocity, sample_gmm
from samplers import (euler_integrate, flow_sde_integrate, flow_sde_noise_level, flow_sde_step_mean,
                      flow_sde_step_std, gaussian_kl_same_std, gaussian_log_prob, sd3_grid, uniform_grid)

MU = torch.tensor([[0.5, -0.5]], dtype=torch.float64)
COV = torch.tensor([[[0.25, 0.0], [0.0, 2.0]]], dtype=torch.float64)
LOG_PI = torch.zeros(1, dtype=torch.float64)


def _v(x, t):
    return gmm_velocity(x, t, LOG_PI, MU, COV)


def _affine_step(ts, k, a):
    """(M_k, m_k, s_k) of the sampler's step k, probed at 0 and e_1, e_2 (float64)."""
    t, dt = float(ts[k]), float(ts[k + 1] - ts[k])
    g = flow_sde_noise_level(ts, k, a)
    pts = torch.cat([torch.zeros(1, 2), torch.eye(2)]).double()
    out = flow_sde_step_mean(pts, _v(pts, torch.full((3,), t, dtype=torch.float64)), t, dt, g)
    return (out[1:] - out[0]).T, out[0], flow_sde_step_std(ts, k, a)


def _chain_moments(ts, a, m, P):
    for k in range(len(ts) - 1):
        M, b, s = _affine_step(ts, k, a)
        m, P = M @ m + b, M @ P @ M.T + s * s * torch.eye(2, dtype=torch.float64)
    return m, P


def _marginal(t):
    return t * MU[0], t * t * COV[0] + (1 - t) ** 2 * torch.eye(2, dtype=torch.float64)


def test_marginals_converge_at_first_order_from_an_exact_start():
    # From t_s = 0.05 (g bounded) started on the exact marginal: Euler–Maruyama's weak error is O(Δt), so halving Δt
    # halves the covariance error (the mean is exact: the drift is affine and the marginal mean tμ linear in t).
    ts0 = 0.05
    errs = []
    for n in (80, 160, 320):
        ts = torch.linspace(ts0, 1.0, n + 1, dtype=torch.float64)
        m, P = _chain_moments(ts, 0.7, *_marginal(ts0))
        mu1, cov1 = _marginal(1.0)
        assert (m - mu1).abs().max() < 1e-12
        errs.append((P - cov1).abs().max().item())
    ratios = [errs[i] / errs[i + 1] for i in range(2)]
    # measured 1.91, 1.96 (→ 2 for first order); 1.7–2.3 rules out order 1/2 (1.41) and order 2 (4)
    assert all(1.7 < r < 2.3 for r in ratios), (errs, ratios)
    assert errs[-1] < 0.01                           # measured 0.0074 at N = 320


def test_without_the_score_term_the_marginals_are_lost():
    # The same recursion with the drift's score correction dropped (v + noise): the covariance is off by O(1), so the
    # test above can tell a wrong drift from a right one.
    ts = torch.linspace(0.05, 1.0, 321, dtype=torch.float64)
    m, P = _marginal(0.05)
    for k in range(len(ts) - 1):
        t, dt = float(ts[k]), float(ts[k + 1] - ts[k])
        M, b, s = _affine_step(ts, k, 0.0)               # a = 0: the Euler map of v alone
        s = flow_sde_step_std(ts, k, 0.7)
        m, P = M @ m + b, M @ P @ M.T + s * s * torch.eye(2, dtype=torch.float64)
    assert (P - _marginal(1.0)[1]).abs().max() > 0.5


def test_first_step_from_noise_has_std_a_and_the_chain_mean_stays_exact():
    # flow_grpo's rule at t_0 = 0 (σ = 1 → the next grid time): g_0 = a/√t_1, so s_0 = g_0 √(t_1 − 0) = a on any
    # grid that starts at 0, whatever N; a jump of O(1), hence the slow convergence from pure noise.
    for ts in (uniform_grid(10), uniform_grid(40), sd3_grid(10)):
        assert flow_sde_step_std(ts, 0, 0.7) == pytest.approx(0.7, rel=1e-12)
        assert flow_sde_noise_level(ts, 0, 0.7) == pytest.approx(0.7 / math.sqrt(float(ts[1])), rel=1e-12)
    # from x_0 ~ N(0, I), the whole chain's mean is still exactly μ at t = 1 on the 10-step training grid; the
    # covariance error there (measured 0.17 on the Σ_22 = 2 axis, 0.05 at N = 20) is the t_0 rule's price
    m, P = _chain_moments(uniform_grid(10), 0.7, torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    assert (m - MU[0]).abs().max() < 1e-12
    assert (P - COV[0]).abs().max() < 0.2


def test_sde_samples_match_the_ode_samples_on_two_components():
    # Monte Carlo, n = 4000 per side, independent noise; the SDE on 100 uniform steps from t = 0 against the Euler ODE
    # on the same grid. Two-sample standard errors: mean √(2·Var/n) ≤ √(2·2.5/4000) = 0.035 → tolerance 0.15;
    # covariance entries √(2·2Var²/n) ≲ 0.08 → tolerance 0.3 (which also holds the t_0 rule's bias, ≈ 0.02 at
    # N = 100 on one Gaussian); the weight of the right component, √(2·.25/4000) = 0.011 → tolerance 0.05.
    log_pi = torch.log(torch.tensor([0.3, 0.7], dtype=torch.float64))
    mu = torch.tensor([[-1.5, 0.0], [1.5, 0.5]], dtype=torch.float64)
    cov = torch.tensor([[[0.25, 0.0], [0.0, 0.25]], [[0.5, 0.2], [0.2, 0.3]]], dtype=torch.float64)
    def v(x, t):
        return gmm_velocity(x, t, log_pi, mu, cov)
    ts, n = uniform_grid(100), 4000
    x_sde = flow_sde_integrate(v, torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                               ts, 0.7, torch.Generator().manual_seed(1)).xs[-1]
    x_ode = euler_integrate(v, torch.randn(n, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
                            ts, record=False)
    assert (x_sde.mean(0) - x_ode.mean(0)).abs().max() < 0.15
    assert (torch.cov(x_sde.T) - torch.cov(x_ode.T)).abs().max() < 0.3
    assert abs((x_sde[:, 0] > 0).double().mean() - (x_ode[:, 0] > 0).double().mean()) < 0.05
    # both agree with exact data samples too (same standard errors)
    exact = sample_gmm(n, log_pi.exp(), mu, cov, torch.Generator().manual_seed(3))
    assert (x_sde.mean(0) - exact.mean(0)).abs().max() < 0.15
    assert abs((x_sde[:, 0] > 0).double().mean() - 0.7) < 0.05


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_and_kl_are_the_gaussians(reduce):
    g = torch.Generator().manual_seed(0)
    x, mean, other = (torch.randn(5, 3, 4, generator=g, dtype=torch.float64) for _ in range(3))
    std = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    s = std.reshape(5, 1, 1).expand_as(mean)
    red = (lambda z: z.flatten(1).mean(1)) if reduce == "mean" else (lambda z: z.flatten(1).sum(1))
    assert torch.allclose(gaussian_log_prob(x, mean, std, reduce), red(Normal(mean, s).log_prob(x)), atol=1e-12)
    assert torch.allclose(gaussian_kl_same_std(mean, other, std, reduce),
                          red(kl_divergence(Normal(mean, s), Normal(other, s))), atol=1e-12)
    # a scalar std broadcasts too
    assert torch.allclose(gaussian_log_prob(x, mean, 0.3, reduce), red(Normal(mean, 0.3).log_prob(x)), atol=1e-12)


def test_noise_level_zero_is_the_euler_ode_exactly():
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    ts = sd3_grid(7)
    sde = flow_sde_integrate(lambda x, t: _v(x, t), x0, ts, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(sde.xs, euler_integrate(lambda x, t: _v(x, t), x0, ts))
    assert sde.log_probs is None


def test_integrator_records_its_transitions_and_reproduces_from_the_generator():
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = uniform_grid(5)
    a = flow_sde_integrate(_v, x0, ts, 0.7, torch.Generator().manual_seed(1), keep_means=True)
    b = flow_sde_integrate(_v, x0, ts, 0.7, torch.Generator().manual_seed(1), reduce="sum")
    assert torch.equal(a.xs, b.xs)                                   # the noise comes from the generator alone
    assert a.xs.shape == (6, 6, 2) and a.log_probs.shape == (5, 6) and a.means.shape == (5, 6, 2)
    for k in range(5):
        t = torch.full((6,), float(ts[k]), dtype=torch.float64)
        mean = flow_sde_step_mean(a.xs[k], _v(a.xs[k], t), float(ts[k]), float(ts[k + 1] - ts[k]),
                                  flow_sde_noise_level(ts, k, 0.7))
        assert torch.allclose(a.means[k], mean, atol=1e-14)
        s = float(a.stds[k])
        assert torch.allclose(b.log_probs[k], Normal(mean, s).log_prob(a.xs[k + 1]).sum(1), atol=1e-10)
    # the last step is stochastic too: x_N − μ_{N−1} has the std s_{N−1} (nonzero)
    assert float(a.stds[-1]) > 0 and not torch.allclose(a.xs[-1], a.means[-1])
