"""The paper's evaluation metrics (§5.1), on any feature space.

diversity: variance of features over a group of samples of one prompt (mean over feature dims),
averaged over prompts. Cosine diversity (the paper's unit, with DreamSim features its main diversity metric):
mean pairwise cosine distance 1 − cos(f_i, f_j) over the distinct pairs of a prompt group, × 100 (the paper
reports it "×10⁻²": 23.12 means a mean distance of 0.2312), averaged over prompts. Prior preservation: per-prompt Fréchet distance between the features of the
finetuned model's and the base model's samples from the same prompts and noise, averaged (torchmetrics FID
with a pluggable feature extractor).
"""
from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance


class _PrecomputedFeatures(nn.Module):
    """Feature 'extractor' for torchmetrics that receives features already computed."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def feature_diversity(features: torch.Tensor) -> float:
    """Mean over feature dims of the (unbiased) variance across the group [n, F]."""
    return features.double().var(dim=0, unbiased=True).mean().item()


def cosine_diversity(features: torch.Tensor) -> float:
    """100 × the mean over pairs i < j of 1 − cos(f_i, f_j) in a group [n, F] (features L2-normalised first)."""
    f = torch.nn.functional.normalize(features.double(), dim=1)
    n = f.shape[0]
    if n < 2:
        raise ValueError("cosine_diversity needs at least 2 samples per group")
    sim = f @ f.T
    off = sim.sum() - sim.diagonal().sum()          # Σ_{i≠j} cos = 2 Σ_{i<j} cos
    return (100.0 * (1.0 - off / (n * (n - 1)))).item()


def frechet_distance(feat_a: torch.Tensor, feat_b: torch.Tensor) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^{1/2}) between two feature sets [n, F]."""
    fid = FrechetInceptionDistance(feature=_PrecomputedFeatures(feat_a.shape[1]), normalize=True,
                                   reset_real_features=True, sync_on_compute=False)  # main process only
    fid.update(feat_b.float().cpu(), real=True)
    fid.update(feat_a.float().cpu(), real=False)
    return max(0.0, float(fid.compute()))   # round-off can give tiny negatives for identical sets

