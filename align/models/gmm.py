"""``model=gmm``: an analytic Gaussian-mixture prior with its closed-form rectified-flow velocity.

Data x_1 ~ Σ_k π_k N(μ_k, Σ_k), noise x_0 ~ N(0, I), x_t = t x_1 + (1 − t) x_0 (reference §6.1):
  C_k(t) = t² Σ_k + (1 − t)² I,   w_k(x, t) ∝ π_k N(x; t μ_k, C_k(t)),
  v(x, t) = Σ_k w_k [ μ_k + (t Σ_k − (1 − t) I) C_k(t)⁻¹ (x − t μ_k) ].
The finetuned model is v_θ = v_base + MLP_θ(x, t) with a zero-initialised output layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List

import numpy as np
import torch
from torch import nn

from align.core.interfaces import FlowModel
from align.core.registry import register_model
from align.core.schema import Grid, config_object


@dataclass
class GMMConfig:
    """``model=gmm``: any dimension d, K components; the finetuned part is an MLP residual."""
    name: str = "gmm"
    grid: Grid = Grid.uniform
    weights: List[float] = field(default_factory=lambda: [0.5, 0.5])                   # K mixture weights π_k
    means: List[List[float]] = field(default_factory=lambda: [[-1.5, 0.0], [1.5, 0.0]])  # K means μ_k of length d
    covs: List[List[List[float]]] = field(                                              # K d×d covariances Σ_k
        default_factory=lambda: [[[0.25, 0.0], [0.0, 0.25]], [[0.25, 0.0], [0.0, 0.25]]])
    hidden: int = 128               # width of the MLP residual
    depth: int = 3                  # its layers

    def validate(self) -> None:
        validate_gmm(*(torch.as_tensor(v, dtype=torch.float64) for v in (self.weights, self.means, self.covs)))


def gmm_velocity(x: torch.Tensor, t: torch.Tensor, log_pi: torch.Tensor, mu: torch.Tensor,
                 cov: torch.Tensor) -> torch.Tensor:
    """Closed-form marginal velocity of the rectified flow to a GMM; x [B, d], t [B]. Computed in float64."""
    dtype = x.dtype
    x, t = x.double(), t.double().reshape(-1, 1, 1, 1)  # [B,1,1,1]
    log_pi, mu, cov = log_pi.double(), mu.double(), cov.double()
    d = x.shape[-1]
    eye = torch.eye(d, dtype=torch.float64, device=x.device)
    C = t ** 2 * cov.unsqueeze(0) + (1 - t) ** 2 * eye                     # [B,K,d,d]
    diff = x.unsqueeze(1) - t.reshape(-1, 1, 1) * mu.unsqueeze(0)          # [B,K,d]
    L = torch.linalg.cholesky(C)
    sol = torch.cholesky_solve(diff.unsqueeze(-1), L).squeeze(-1)          # C⁻¹ (x − tμ)
    logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    logp = -0.5 * (diff * sol).sum(-1) - 0.5 * logdet - 0.5 * d * math.log(2 * math.pi)
    w = torch.softmax(log_pi.unsqueeze(0) + logp, dim=1)                   # [B,K]
    A = t * cov.unsqueeze(0) - (1 - t) * eye                               # [B,K,d,d]
    vk = mu.unsqueeze(0) + (A @ sol.unsqueeze(-1)).squeeze(-1)             # [B,K,d]
    return (w.unsqueeze(-1) * vk).sum(1).to(dtype)


class TimeMLP(nn.Module):
    """f(x, t) for vectors: an MLP on [x, Fourier features of t] with a zero-initialised last layer."""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, n_freq: int = 4, out_scale: float = 0.0):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32), persistent=False)
        layers: list[nn.Module] = []
        width = dim + 1 + 2 * n_freq
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)
        with torch.no_grad():
            self.out.weight.mul_(out_scale)
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        tt = t.to(x.dtype).reshape(-1, 1)
        feats = torch.cat([x, tt, torch.sin(tt * self.freqs), torch.cos(tt * self.freqs)], dim=1)
        return self.out(self.body(feats))


@register_model("gmm", config=GMMConfig)
class GaussianMixtureFlow(FlowModel):
    """Analytic GMM prior (frozen) + MLP residual (finetuned)."""

    name = "gmm"

    def __init__(self, cfg: GMMConfig | None = None, **overrides: Any):
        cfg = config_object(GMMConfig, cfg, overrides, owner="model=gmm")
        super().__init__()
        w = torch.as_tensor(cfg.weights, dtype=torch.float64)
        mu = torch.as_tensor(cfg.means, dtype=torch.float64)
        cov = torch.as_tensor(cfg.covs, dtype=torch.float64)
        self.register_buffer("log_pi", torch.log(w / w.sum()))
        self.register_buffer("mu", mu)
        self.register_buffer("cov", cov)
        self.dim = mu.shape[1]
        self.data_shape = (self.dim,)
        self.hidden, self.depth = cfg.hidden, cfg.depth
        self.residual = TimeMLP(self.dim, cfg.hidden, cfg.depth)

    def base_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return gmm_velocity(x, t, self.log_pi, self.mu, self.cov)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.base_velocity(x, t) + self.residual(x, t)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.residual.parameters())

    def make_value_network(self) -> nn.Module:
        """ν_φ(x, t): same MLP family as the residual, zero output at initialisation."""
        return TimeMLP(self.dim, self.hidden, self.depth)

    def preview_grid(self, x: torch.Tensor, n: int = 1000) -> torch.Tensor:
        """[3, H, W] scatter plot of the first two coordinates of up to n samples (matplotlib, Agg)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pts = x[:n].detach().float().cpu().numpy()
        fig, ax = plt.subplots(figsize=(3, 3), dpi=100)
        ax.scatter(pts[:, 0], pts[:, 1] if pts.shape[1] > 1 else pts[:, 0] * 0, s=3, alpha=0.5)
        ax.set_xlabel("x[0]")
        ax.set_ylabel("x[1]")
        fig.tight_layout()
        fig.canvas.draw()
        rgb = torch.from_numpy(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
        plt.close(fig)
        return rgb.permute(2, 0, 1).float() / 255.0


def validate_gmm(w: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> None:
    """Clear errors for malformed mixtures, before any work."""
    if mu.dim() != 2:
        raise ValueError(f"model.means must be a list of K vectors of length d, got shape {tuple(mu.shape)}")
    K, d = mu.shape
    if w.shape != (K,):
        raise ValueError(f"model.weights has {w.numel()} entries but model.means has {K} components")
    if (w <= 0).any():
        raise ValueError("model.weights must all be positive")
    if cov.shape != (K, d, d):
        raise ValueError(f"model.covs must be K={K} matrices of shape {d}x{d}, got shape {tuple(cov.shape)}")
    if not torch.allclose(cov, cov.transpose(-1, -2)):
        raise ValueError("model.covs must be symmetric")
    if (torch.linalg.eigvalsh(cov) <= 0).any():
        raise ValueError("model.covs must be positive definite")


def sample_gmm(n: int, pi: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    """n exact samples of Σ_k π_k N(μ_k, Σ_k) (float64, CPU)."""
    pi, mu, cov = pi.double().cpu(), mu.double().cpu(), cov.double().cpu()
    k = torch.multinomial(pi / pi.sum(), n, replacement=True, generator=generator)
    z = torch.randn(n, mu.shape[1], generator=generator, dtype=torch.float64)
    L = torch.linalg.cholesky(cov)
    return mu[k] + (L[k] @ z.unsqueeze(-1)).squeeze(-1)
