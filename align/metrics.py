"""The paper's evaluation metrics (§5.1), on any feature space.

diversity: variance of features over a group of samples of one prompt (mean over feature dims),
averaged over prompts. Prior preservation: per-prompt Fréchet distance between the features of the
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


def frechet_distance(feat_a: torch.Tensor, feat_b: torch.Tensor) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^{1/2}) between two feature sets [n, F]."""
    fid = FrechetInceptionDistance(feature=_PrecomputedFeatures(feat_a.shape[1]), normalize=True,
                                   reset_real_features=True, sync_on_compute=False)  # main process only
    fid.update(feat_b.float().cpu(), real=True)
    fid.update(feat_a.float().cpu(), real=False)
    return max(0.0, float(fid.compute()))   # round-off can give tiny negatives for identical sets


def grouped(features: torch.Tensor, group_ids: torch.Tensor) -> list[torch.Tensor]:
    return [features[group_ids == g] for g in torch.unique(group_ids)]
