"""Human Preference Score v2 / v2.1 (``reward=hpsv2``, model=sd3).

    r(x, p) = ⟨ f_img(x) / ‖f_img(x)‖ , f_txt(p) / ‖f_txt(p)‖ ⟩    (cosine, no logit scale; ≈ 0.2–0.3)

f_img, f_txt: open_clip ViT-H-14 (GELU, not quick_gelu) with the HPS state dict
(``HPS_v2.1_compressed.pt`` / ``HPS_v2_compressed.pt`` from the hub repo ``xswu/HPSv2``, stored as
``{"state_dict": ...}``; it loads into open_clip's ViT-H-14 key for key). Images: clip_preprocess;
prompts: open_clip's tokenizer (context 77). Text features are cached per prompt string.

The PyPI ``hpsv2`` package is deliberately not used: it pins protobuf<4 and pytest==7.2.0, its wheel
lacks the BPE vocabulary its tokenizer needs, and it downloads the laion2B ViT-H-14 weights before
loading the HPS checkpoint; none of it is needed for the score above.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from align.core.interfaces import Reward
from align.core.registry import register_reward
from align.metrics.clip import (AlwaysEval, TextFeatureCache, clip_preprocess, create_open_clip, image_size,
                                register_open_clip_config)
from align.core.loading import DTYPES
from align.core.schema import Dtype
from align.core.weights import WeightNeed, WeightSpec, resolve

HPS_FILES = {"v2.1": "HPS_v2.1_compressed.pt", "v2": "HPS_v2_compressed.pt"}


def hps_weight_spec(version: str) -> WeightSpec:
    version = version if version.startswith("v") else f"v{version}"  # version=2.1 from the command line
    if version not in HPS_FILES:
        raise ValueError(f"reward.version must be one of {sorted(HPS_FILES)}, got {version!r}")
    f = HPS_FILES[version]
    return WeightSpec(what=f"hpsv2 reward (HPS {version} checkpoint)", filename=f, config_key="reward.weights",
                      env_var="ALIGN_HPSV2_WEIGHTS", hub_repo="xswu/HPSv2", hub_files=(f,),
                      url=f"https://huggingface.co/xswu/HPSv2/resolve/main/{f}")


@dataclass
class HPSv2Config:
    """``reward=hpsv2`` (model=sd3): r = cosine(image features, text features), about 0.2–0.3. The weights path is
    resolved: the key → env var ALIGN_HPSV2_WEIGHTS → the Hugging Face cache → an error."""
    name: str = "hpsv2"
    version: str = "v2.1"           # v2.1 | v2
    # HPS_v2.1_compressed.pt (version v2.1) or HPS_v2_compressed.pt (version v2) from the hub repo xswu/HPSv2,
    # e.g. https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2.1_compressed.pt. Env var: ALIGN_HPSV2_WEIGHTS.
    weights: Optional[str] = None
    clip_model: str = "ViT-H-14"    # open_clip architecture the checkpoint belongs to
    quick_gelu: bool = False
    dtype: Dtype = Dtype.fp32       # backbone dtype; scores are returned in fp32

    def validate(self) -> None:
        hps_weight_spec(str(self.version))


@register_reward("hpsv2", config=HPSv2Config)
class HPSv2Reward(AlwaysEval, Reward):
    @classmethod
    def weight_needs(cls, reward: dict) -> list[WeightNeed]:
        """HPS's checkpoint of ``reward.version``."""
        return [WeightNeed(hps_weight_spec(str(reward.get("version", "v2.1"))), reward.get("weights"))]

    """r = cos(image features, text features) of the HPS-finetuned open_clip ViT-H-14."""

    name, domain = "hpsv2", "sd3"

    def __init__(self, version: str = "v2.1", weights: str | None = None, clip_model: str = "ViT-H-14",
                 quick_gelu: bool = False, dtype: str = "fp32", **_: Any):
        super().__init__()
        import open_clip

        spec = hps_weight_spec(str(version))
        path = resolve(spec, weights)
        self.checkpoint = spec.filename  # HPS_v2.1_compressed.pt | HPS_v2_compressed.pt
        self.model = create_open_clip(clip_model, path, quick_gelu=quick_gelu)
        self.dtype = DTYPES[dtype]
        self.model.to(self.dtype)
        self.tokenizer = open_clip.get_tokenizer(register_open_clip_config(clip_model))
        self.image_size = image_size(self.model.visual)
        self.text_cache = TextFeatureCache()
        self.eval()

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.model.logit_scale.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        x = clip_preprocess(images, size=self.image_size).to(self.dtype)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"hpsv2: {len(prompts)} prompts for {images.shape[0]} images")
        img = self.image_features(images)
        txt = self.text_cache.get(list(prompts), self._encode_text, img.device)
        return (img * txt).sum(-1)
