"""The digit classes and the pretrained digit classifier, shared by ``model=digits`` (its metric features) and the
``digits_classifier`` reward.

Prompts are the class names ``"zero"`` … ``"nine"``; ``"3"``, ``"three"`` and ``"a handwritten digit 3"`` are
accepted too (the last word decides), and ``""`` is the null prompt (CFG's unconditional branch). The classifier is
a small CNN on images in [0, 1] [B, 1, 8, 8] trained on scikit-learn's digits; its 32-d penultimate activations
are the domain's features (diversity, FID), its log-probabilities the reward.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from align.core.weights import WeightSpec, load_state, load_tensors, resolve

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NULL_INDEX = 10                      # the null prompt "" (CFG's unconditional branch)
# the shipped weights of the digits domain (the flow and this classifier), and the script that writes them
ALIGN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS_DIR = os.path.join(ALIGN_DIR, "models", "weights")
CLASSIFIER_WEIGHTS = os.path.join(WEIGHTS_DIR, "digits_classifier.safetensors")
REGENERATE = "python -m align.pretrain model=digits"
REGENERATE_HOW = f"regenerate it with `{REGENERATE}` (a few minutes on one CPU core)"


def prompt_to_class(prompt: str) -> int:
    """Class index of a prompt: "three", "3" or "a handwritten digit 3" → 3; "" → the null prompt (10)."""
    words = str(prompt).strip().lower().split()
    if not words:
        return NULL_INDEX
    last = words[-1].strip(".!,")
    if last in DIGIT_NAMES:
        return DIGIT_NAMES.index(last)
    if last.isdigit() and len(last) == 1:
        return int(last)
    raise ValueError(f"digits: cannot read a digit class from the prompt {prompt!r}; use one of "
                     f"{', '.join(DIGIT_NAMES)} (or '0'..'9', 'a handwritten digit 3', '' for the null prompt)")


def prompts_to_classes(prompts: Sequence[str]) -> torch.Tensor:
    return torch.tensor([prompt_to_class(p) for p in prompts], dtype=torch.int64)


class DigitClassifier(nn.Module):
    """A small CNN on images in [0, 1] [B, 1, 8, 8]; smooth activations so its gradients are useful rewards."""

    feature_dim = 32

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)     # 8×8 → 4×4
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 16, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, 32]."""
        h = F.silu(self.conv1(images * 2.0 - 1.0))
        h = F.silu(self.conv2(h))
        h = F.silu(self.conv3(h))
        return F.silu(self.fc(h.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, 10]."""
        return self.head(self.features(images))


def load_digit_classifier(path: str | None = None, config_key: str = "reward.weights") -> DigitClassifier:
    """The pretrained classifier (``path``, else the shipped file), frozen and in eval mode."""
    spec = WeightSpec(what="digits: the pretrained digit classifier", filename=os.path.basename(CLASSIFIER_WEIGHTS),
                      config_key=config_key, get=REGENERATE_HOW, default=CLASSIFIER_WEIGHTS)
    clf = DigitClassifier()
    path = resolve(spec, path)
    load_state(spec, clf, load_tensors(spec, path), path)
    return clf.eval().requires_grad_(False)
