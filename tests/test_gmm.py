"""The analytic Gaussian-mixture backend (reference §6.1) against independent computations."""
import pytest
import torch

from experiments.exact.continuous import gmm_moments
from align.models.gmm import GaussianMixtureFlow, sample_gmm
from samplers import euler_integrate, uniform_grid

PI = [0.3, 0.7]
MU = [[-1.0, 0.5], [1.5, -0.5]]
COV = [[[0.3, 0.1], [0.1, 0.2]], [[0.5, -0.2], [-0.2, 0.8]]]


@pytest.fixture
def model():
    return GaussianMixtureFlow(weights=PI, means=MU, covs=COV).double()


@pytest.mark.parametrize("t", [0.2, 0.5, 0.8])
def test_velocity_is_the_conditional_expectation(model, t):
    """v(x, t) = E[x_1 − x_0 | x_t = x], estimated by self-normalised importance sampling over x_1 ~ p_data
    with weights N((x − t x_1)/(1 − t); 0, I) (the density of x_0 that reaches x)."""
    g = torch.Generator().manual_seed(0)
    x1 = sample_gmm(400_000, torch.tensor(PI), torch.tensor(MU), torch.tensor(COV), g)
    for x in torch.tensor([[0.0, 0.0], [0.7, -0.3], [-0.5, 0.4]], dtype=torch.float64):
        x0 = (x - t * x1) / (1 - t)
        logw = -0.5 * (x0 ** 2).sum(1)
        w = torch.softmax(logw, 0)
        mc = (w.unsqueeze(1) * (x1 - x0)).sum(0)
        ess = 1.0 / (w ** 2).sum()
        assert ess > 2000
        exact = model.base_velocity(x.unsqueeze(0), torch.tensor([t], dtype=torch.float64))[0]
        assert torch.allclose(mc, exact, atol=0.03), (mc, exact)


@pytest.mark.slow
def test_ode_samples_have_the_mixture_moments(model):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(40_000, 2, generator=g, dtype=torch.float64)
    x1 = euler_integrate(lambda x, t: model.base_velocity(x, t), x0, uniform_grid(400), record=False)
    mean, cov = gmm_moments(torch.tensor(PI, dtype=torch.float64), torch.tensor(MU, dtype=torch.float64),
                            torch.tensor(COV, dtype=torch.float64))
    assert torch.allclose(x1.mean(0), mean, atol=0.03)
    assert torch.allclose(torch.cov(x1.T), cov, atol=0.05)


def test_velocity_jacobian_is_symmetric(model):
    """v = (x + (1 − t)∇log p_t)/t is a gradient field, so J_v is symmetric (reference §1.3)."""
    for t in (0.1, 0.5, 0.9):
        x = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
        J = torch.autograd.functional.jacobian(lambda y: model.base_velocity(y, torch.tensor([t]))[0], x)[:, 0]
        assert torch.allclose(J, J.T, atol=1e-10)


def test_finetuned_model_starts_at_the_base(model):
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    assert torch.equal(model.velocity(x, t), model.base_velocity(x, t))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(weights=[1.0, 1.0], means=[[0.0, 0.0]], covs=[[[1.0, 0.0], [0.0, 1.0]]]), "weights has 2"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covs=[[[1.0, 2.0], [2.0, 1.0]]]), "positive definite"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covs=[[[1.0]]]), "covs must be K=1 matrices of shape 2x2"),
    (dict(weights=[1.0], means=[[0.0, 0.0]], covs=[[1.0, 0.0]]), r"covs\[0\]"),    # not K matrices: a type error
    (dict(weights=[-1.0], means=[[0.0]], covs=[[[1.0]]]), "positive"),
])
def test_malformed_mixtures_are_rejected(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        GaussianMixtureFlow(**kwargs)
