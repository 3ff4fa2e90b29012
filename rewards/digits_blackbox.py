"""A black-box reward for ``model=digits``: ``digits_correct``, the pretrained classifier's verdict.

    r(x) = 1[argmax_k f_k(x) = c],   c = the prompted class (or ``reward.target``)

An integer-valued step function of the image: its gradient is zero almost everywhere and undefined on the
decision boundaries, so no first-order algorithm can use it (``differentiable = False``); the policy-gradient
and forward-process methods (``uses_reward_gradient = False``) can. Its mean over samples is the classifier's
accuracy on them, the digits analogue of a VQA-style correct/incorrect reward. ``digits_classifier`` is the
smooth counterpart (log p(c | x)); the null prompt "" has no class, so it scores 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from align.core.registry import register_reward
from rewards.digits import ClassifierReward, check_images


@dataclass
class DigitsCorrectConfig:
    """``reward=digits_correct``: 1 if the pretrained classifier's argmax is the prompted class, else 0 (not
    differentiable: for algorithms that need no reward gradient)."""
    name: str = "digits_correct"
    # A class name ("eight") or digit: the class every image must be classified as, whatever its prompt;
    # null: the prompted class
    target: Optional[str] = None
    weights: Optional[str] = None   # null: the shipped classifier (align/models/weights/digits_classifier.safetensors)


@register_reward("digits_correct", config=DigitsCorrectConfig)
class DigitsCorrect(ClassifierReward):
    """r = 1[argmax_k f_k(image) = c] with f the pretrained classifier's logits, c the prompted class (or target)."""

    name, differentiable = "digits_correct", False

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        images = check_images(images)
        labels = self.labels(images, prompts)
        predicted = self.classifier(images.float()).argmax(dim=1)
        return (predicted == labels.to(predicted.device)).float()
