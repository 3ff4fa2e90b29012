"""Rewards for ``model=digits`` (images in [0, 1], [B, 1, 8, 8]); all differentiable, fp32, O(1).

Three characters, so the algorithms' trade-offs show:
  * ``digits_thickness``  — a style property, the ink mass (mean pixel); easy to hack by smearing ink
    until the digit is unreadable (watch the classifier accuracy / FID).
  * ``digits_classifier`` — prompt–image agreement: log p(prompted class | image) under the pretrained
    classifier (the digits analogue of HPSv2/PickScore); ``target=`` scores one fixed class instead,
    which turns it into a reward that fights the prompt.
  * ``digits_symmetry``   — left–right mirror symmetry, −scale·mean((img − flip(img))²); most digits
    (2, 3, 4, 5, 6, 7, 9) are asymmetric, so it conflicts with the prior.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from align.metrics.digits_classifier import load_digit_classifier, prompt_to_class, prompts_to_classes
from align.core.interfaces import Reward
from align.core.registry import register_reward


def check_images(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1:] != (1, 8, 8):
        raise ValueError(f"digits rewards score images [B, 1, 8, 8] in [0, 1], got shape {tuple(images.shape)}")
    return images.to(torch.promote_types(images.dtype, torch.float32))


@dataclass
class DigitsThicknessConfig:
    """``reward=digits_thickness``: ink mass, r = scale · mean pixel in [0, 1] (real digits ≈ 0.30 → r ≈ 3). A style
    property that invites reward hacking (smeared, unreadable blobs): watch eval/fid."""
    name: str = "digits_thickness"
    scale: float = 10.0


class _ScaledPixelReward(Reward):
    """A pixel statistic of the image times ``scale``."""

    domain = "digits"

    def __init__(self, scale: float = 10.0, **_: Any):
        super().__init__()
        self.scale = float(scale)


@register_reward("digits_thickness", config=DigitsThicknessConfig)
class DigitsThickness(_ScaledPixelReward):
    """r = scale · mean pixel (ink mass). Real digits: mean ≈ 0.30, so r ≈ 3 with scale 10."""

    name = "digits_thickness"

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        return self.scale * check_images(images).flatten(1).mean(1)


@dataclass
class DigitsClassifierConfig:
    """``reward=digits_classifier``: prompt–image agreement, r = log p(prompted class | image) under the pretrained
    digit classifier."""
    name: str = "digits_classifier"
    # A class name ("eight") or digit: score that fixed class for every prompt instead (a reward that fights the
    # prompt); null: the prompted class
    target: Optional[str] = None
    weights: Optional[str] = None   # null: the shipped classifier (align/models/weights/digits_classifier.safetensors)


class ClassifierReward(Reward):
    """A reward read off the pretrained digit classifier for a class c per image: the prompted class, or ``target``
    (shared by ``digits_classifier`` and the black-box ``digits_correct``)."""

    domain = "digits"

    def __init__(self, target: int | str | None = None, weights: str | None = None, **_: Any):
        super().__init__()
        self.classifier = load_digit_classifier(weights)
        self.target = None if target is None else prompt_to_class(str(target))

    def labels(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """c [B]: ``target`` for every image, else each prompt's class."""
        if self.target is not None:
            return torch.full((images.shape[0],), self.target, dtype=torch.int64)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {len(prompts)} prompts for {images.shape[0]} images")
        return prompts_to_classes(prompts)


@register_reward("digits_classifier", config=DigitsClassifierConfig)
class DigitsClassifier(ClassifierReward):
    """r = log p(c | image) under the pretrained digit classifier, c = the prompted class (or ``target``)."""

    name = "digits_classifier"

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = check_images(images)
        labels = self.labels(images, prompts)
        logp = torch.log_softmax(self.classifier(images), dim=1)
        return logp.gather(1, labels.to(logp.device).unsqueeze(1)).squeeze(1)


@dataclass
class DigitsSymmetryConfig:
    """``reward=digits_symmetry``: left–right mirror symmetry, r = −scale · mean((img − flip(img))²), 0 when
    symmetric. Most digits are asymmetric, so this reward conflicts with the prior."""
    name: str = "digits_symmetry"
    scale: float = 10.0


@register_reward("digits_symmetry", config=DigitsSymmetryConfig)
class DigitsSymmetry(_ScaledPixelReward):
    """r = −scale · mean((img − mirror(img))²), left–right mirror; 0 for perfectly symmetric images."""

    name = "digits_symmetry"

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        images = check_images(images)
        return -self.scale * (images - images.flip(-1)).pow(2).flatten(1).mean(1)
