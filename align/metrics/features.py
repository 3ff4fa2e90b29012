"""Image features for the diversity and FID metrics (``model.features``): CLIP image embeddings (the default, the
paper's), DreamSim, FID's Inception-v3, or average-pooled pixels (weight-free)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from align.metrics.clip import open_clip_weight_spec, shared_clip_image_features
from align.metrics.dreamsim import DreamSimFeatures, dreamsim_weight_spec
from align.core.weights import WeightSpec, resolve

# every way past missing CLIP metric features, with its cost: they feed only the diversity and FID metrics
FEATURE_KINDS_WITHOUT_CLIP = (
    "set model.features.kind=pixels (no weights; diversity and FID on 8x8 average-pooled pixels, not comparable "
    "to the paper's), model.features.kind=dreamsim (DreamSim's checkpoint directory in model.features.weights; "
    "the paper's diversity features) or model.features.kind=inception (FID's Inception-v3 file in "
    "model.features.weights; needs pip install torch-fidelity)")


class PixelFeatures(nn.Module):
    """A weight-free fallback feature map: the image average-pooled to ``size``×``size`` (3·size² features)."""

    def __init__(self, size: int = 8):
        super().__init__()
        self.size = int(size)
        self.num_features = 3 * self.size ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float(), self.size).flatten(1)


INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SPEC = WeightSpec(
    what="model.features.kind=inception (FID's Inception-v3)", filename=INCEPTION_WEIGHTS,
    config_key="model.features.weights", env_var="ALIGN_INCEPTION_WEIGHTS",
    url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS)


class InceptionFeatures(nn.Module):
    """The 2048-d pool features of the FID Inception-v3 (torchmetrics' ``NoTrainInceptionV3``, via the optional
    package torch-fidelity), from a local weights file; images in [0, 1] are quantised to uint8 as FID does."""

    num_features = 2048

    def __init__(self, weights: str | None = None):
        super().__init__()
        path = resolve(INCEPTION_SPEC, weights)
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=path)
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError("model.features.kind=inception needs the optional package torch-fidelity "
                                      "(pip install torch-fidelity); or use model.features.kind=clip") from err

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.clamp(0, 1) * 255).round().to(torch.uint8)).reshape(images.shape[0], -1).float()


def clip_features_spec(spec: dict[str, Any]) -> WeightSpec:
    """The WeightSpec of the CLIP image tower that ``model.features`` (kind clip) names, its message listing the
    other feature kinds as the way forward."""
    model_name = spec.get("model_name", "ViT-L-14")
    tower = open_clip_weight_spec(model_name, spec.get("pretrained", "openai"),
                                  what=f"CLIP image features ({model_name}) of the diversity and FID metrics",
                                  config_key="model.features.weights",
                                  env_var=spec.get("env_var", "ALIGN_CLIP_FEATURES_WEIGHTS"))
    return dataclasses.replace(tower, alternative=FEATURE_KINDS_WITHOUT_CLIP)


def features_weight_spec(spec: dict[str, Any] | None) -> WeightSpec | None:
    """The WeightSpec of the weights ``model.features`` needs (None for kind pixels)."""
    spec = dict(spec or {})
    kind = spec.get("kind", "clip")
    if kind == "clip":
        return clip_features_spec(spec)
    if kind == "inception":
        return INCEPTION_SPEC
    if kind == "dreamsim":
        return dreamsim_weight_spec(spec.get("dreamsim_type", "ensemble"))
    return None


def build_features(spec: dict[str, Any] | None) -> nn.Module:
    """``model.features``: ``{kind: clip, model_name, weights, quick_gelu}`` (CLIP image embeddings, the
    paper's; weights: the key, else $ALIGN_CLIP_FEATURES_WEIGHTS, else the HF cache), ``{kind: inception,
    weights}`` (FID's Inception-v3; needs torch-fidelity), ``{kind: dreamsim, weights: <DreamSim's checkpoint dir>,
    dreamsim_type: ensemble}`` (the paper's diversity features, ``DreamSimFeatures``) or ``{kind: pixels}``."""
    spec = dict(spec or {})
    kind = spec.pop("kind", "clip")
    if kind == "pixels":
        return PixelFeatures(size=spec.get("size", 8))
    if kind == "inception":
        return InceptionFeatures(spec.get("weights"))
    if kind == "dreamsim":
        return DreamSimFeatures(spec.get("weights"), spec.get("dreamsim_type", "ensemble"))
    if kind != "clip":
        raise ValueError(f"model.features.kind={kind!r}: valid choices are clip, dreamsim, inception, pixels")
    spec.setdefault("model_name", "ViT-L-14")
    spec.setdefault("config_key", "model.features.weights")
    spec["weights"] = resolve(clip_features_spec(spec), spec.get("weights"))    # the message names every kind
    return shared_clip_image_features(**spec)     # the aesthetic reward's tower when it is the same file
