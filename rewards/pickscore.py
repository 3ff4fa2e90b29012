"""PickScore (``reward=pickscore``, model=sd3).

    r(x, p) = exp(logit_scale) · ⟨ g_img(x)/‖g_img(x)‖ , g_txt(p)/‖g_txt(p)‖ ⟩    (≈ 18–24)

g_img = visual_projection(vision pooler output), g_txt = text_projection(text pooler output) of the
transformers ``CLIPModel`` ``yuvalkirstain/PickScore_v1`` (ViT-H/14); the tokenizer is the one of the
processor repo ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (truncated to 77 tokens). Images go through
clip_preprocess (the processor's resize 224 shortest edge, center crop, CLIP mean/std, as tensor ops).
Text features are cached per prompt string. transformers ≥ 5 returns an output object from
``get_image_features``/``get_text_features`` (the projected embedding is ``.pooler_output``); 4.x
returns the tensor — both are handled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from align.core.interfaces import Reward
from align.core.registry import register_reward
from align.metrics.clip import AlwaysEval, TextFeatureCache, clip_preprocess, freeze
from align.core.loading import DTYPES, dtype_kwargs
from align.core.schema import Dtype
from align.core.weights import WeightNeed, WeightSpec, resolve

MODEL_SPEC = WeightSpec(
    what="pickscore reward: PickScore_v1 CLIPModel", filename="PickScore_v1 (config.json + model weights)",
    config_key="reward.model", env_var="ALIGN_PICKSCORE_MODEL", hub_repo="yuvalkirstain/PickScore_v1",
    hub_files=("config.json",), url="https://huggingface.co/yuvalkirstain/PickScore_v1", is_dir=True,
    required=(("config.json",), ("model.safetensors", "pytorch_model.bin")))
PROCESSOR_SPEC = WeightSpec(
    what="pickscore reward: CLIP-ViT-H-14 tokenizer",
    filename="the tokenizer files (tokenizer.json or vocab.json + merges.txt)",
    config_key="reward.processor", env_var="ALIGN_PICKSCORE_PROCESSOR",
    hub_repo="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", hub_files=("tokenizer.json", "vocab.json"),
    url="https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K", is_dir=True,
    required=(("tokenizer.json", "vocab.json"),))


def pooled(out: Any) -> torch.Tensor:
    """The projected embedding from get_*_features (a tensor in transformers 4.x, an output in 5.x)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass
class PickScoreConfig:
    """``reward=pickscore`` (model=sd3): r = exp(logit_scale) · cosine(image embedding, text embedding), about
    18–24. Each directory is resolved: the key → its environment variable → the Hugging Face cache → an error."""
    name: str = "pickscore"
    # A from_pretrained directory of the hub repo yuvalkirstain/PickScore_v1 (config.json + model weights).
    # Env var: ALIGN_PICKSCORE_MODEL.
    model: Optional[str] = None
    # A directory with the tokenizer files (tokenizer.json or vocab.json + merges.txt) of the processor repo
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K. Env var: ALIGN_PICKSCORE_PROCESSOR.
    processor: Optional[str] = None
    max_length: int = 77
    dtype: Dtype = Dtype.fp32       # model dtype; scores are returned in fp32


@register_reward("pickscore", config=PickScoreConfig)
class PickScoreReward(AlwaysEval, Reward):
    @classmethod
    def weight_needs(cls, reward: dict) -> list[WeightNeed]:
        """PickScore's model and its processor."""
        return [WeightNeed(MODEL_SPEC, reward.get("model")), WeightNeed(PROCESSOR_SPEC, reward.get("processor"))]

    """r = exp(logit_scale) · cos(image embedding, text embedding) of PickScore_v1."""

    name, domain = "pickscore", "sd3"

    def __init__(self, model: str | None = None, processor: str | None = None, dtype: str = "fp32",
                 max_length: int = 77, **_: Any):
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer

        model_dir = resolve(MODEL_SPEC, model)
        tok_dir = resolve(PROCESSOR_SPEC, processor)
        self.dtype = DTYPES[dtype]
        self.model = freeze(CLIPModel.from_pretrained(model_dir, **dtype_kwargs("transformers", self.dtype)))
        self.tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        self.max_length = int(max_length)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.text_cache = TextFeatureCache()
        self.eval()

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        t = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        dev = self.model.logit_scale.device
        out = self.model.get_text_features(input_ids=t["input_ids"].to(dev),
                                           attention_mask=t["attention_mask"].to(dev))
        return F.normalize(pooled(out).float(), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        x = clip_preprocess(images, size=self.image_size).to(self.dtype)
        return F.normalize(pooled(self.model.get_image_features(pixel_values=x)).float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"pickscore: {len(prompts)} prompts for {images.shape[0]} images")
        img = self.image_features(images)
        txt = self.text_cache.get(list(prompts), self._encode_text, img.device)
        return self.model.logit_scale.float().exp() * (img * txt).sum(-1)
