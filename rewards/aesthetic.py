"""LAION improved aesthetic predictor (``reward=aesthetic``, model=sd3): the paper's aesthetic reward.

    e(x) = CLIP_ViT-L/14(clip_preprocess(x)) / ‖·‖₂        (OpenAI CLIP, quick_gelu, 768-d)
    r(x) = W₇(W₆(W₄(W₂(W₀ e + b₀) + b₂) + b₄) + b₆) + b₇    (768→1024→128→64→16→1)

The MLP head (``sac+logos+ava1-l14-linearMSE.pth``, state-dict keys ``layers.{0,2,4,6,7}``) has
dropouts between the linear layers (identity in eval) and no activations. Scores are about 1–10.
Prompts are ignored. Both files are resolved in ``__init__``: config key → environment variable
→ Hugging Face cache → WeightsError (align/core/weights.py) saying where to get them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from align.core.interfaces import Reward
from align.core.registry import register_reward
from align.core.schema import Dtype
from align.metrics.clip import AlwaysEval, freeze, shared_clip_image_features
from align.core.weights import WeightNeed, WeightSpec, resolve

HEAD_SPEC = WeightSpec(
    what="aesthetic reward: LAION aesthetic MLP head",
    filename="sac+logos+ava1-l14-linearMSE.pth",
    config_key="reward.head_weights",
    env_var="ALIGN_AESTHETIC_HEAD_WEIGHTS",
    hub_repo="camenduru/improved-aesthetic-predictor",
    hub_files=("sac+logos+ava1-l14-linearMSE.pth",),
    url=("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
         "sac%2Blogos%2Bava1-l14-linearMSE.pth"),
)
HEAD_DROPOUTS = (0.2, 0.2, 0.1)


class AestheticHead(nn.Module):
    """The LAION MLP, built from the shapes of its state dict (so tests can use a small one).

    ``layers`` = Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear.
    """

    def __init__(self, dims: tuple[int, ...] = (768, 1024, 128, 64, 16, 1)):
        super().__init__()
        if len(dims) != 6:
            raise ValueError(f"the aesthetic head has 5 linear layers (6 dims), got dims {dims}")
        lin = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]
        self.layers = nn.Sequential(lin[0], nn.Dropout(HEAD_DROPOUTS[0]), lin[1], nn.Dropout(HEAD_DROPOUTS[1]),
                                    lin[2], nn.Dropout(HEAD_DROPOUTS[2]), lin[3], lin[4])

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "AestheticHead":
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        keys = [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]
        if not all(k in state for k in keys):
            raise KeyError(f"not a LAION aesthetic head state dict: expected keys {keys}, got {sorted(state)[:8]}")
        dims = (state[keys[0]].shape[1], *(state[k].shape[0] for k in keys))
        head = cls(dims)
        head.load_state_dict(state, strict=True)
        return head

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.layers(e)


@dataclass
class AestheticConfig:
    """``reward=aesthetic`` (model=sd3): r = MLP(CLIP ViT-L/14 image embedding / ‖·‖), about 1–10. Each weight is
    resolved: the key → its environment variable → the Hugging Face cache, downloaded into it on first use when
    online (the cache only with HF_HUB_OFFLINE=1) → an error saying where to get it."""
    name: str = "aesthetic"
    clip_model: str = "ViT-L-14"    # open_clip architecture (OpenAI CLIP ViT-L/14, quick_gelu)
    quick_gelu: bool = True
    # OpenAI CLIP ViT-L/14 in open_clip format: open_clip_pytorch_model.bin (or open_clip_model.safetensors) of the
    # hub repo timm/vit_large_patch14_clip_224.openai (OpenAI's original ViT-L-14.pt also loads).
    # Env var: ALIGN_AESTHETIC_CLIP_WEIGHTS.
    clip_weights: Optional[str] = None
    # MLP head sac+logos+ava1-l14-linearMSE.pth from https://github.com/christophschuhmann/improved-aesthetic-predictor
    # (mirror: hub repo camenduru/improved-aesthetic-predictor). Env var: ALIGN_AESTHETIC_HEAD_WEIGHTS.
    head_weights: Optional[str] = None
    dtype: Dtype = Dtype.fp32       # backbone dtype; scores are returned in fp32


@register_reward("aesthetic", config=AestheticConfig)
class AestheticReward(AlwaysEval, Reward):
    @classmethod
    def weight_needs(cls, reward: dict) -> list[WeightNeed]:
        """The CLIP tower and the head a run of ``reward`` (its config) loads."""
        from align.metrics.clip import open_clip_weight_spec

        model_name = reward.get("clip_model", "ViT-L-14")
        tower = open_clip_weight_spec(model_name, "openai", what=f"CLIP image features ({model_name})",
                                      config_key="reward.clip_weights", env_var="ALIGN_AESTHETIC_CLIP_WEIGHTS")
        return [WeightNeed(tower, reward.get("clip_weights")), WeightNeed(HEAD_SPEC, reward.get("head_weights"))]

    """r(x) = MLP(CLIP-L/14 image embedding / ‖·‖) — LAION aesthetic score, ≈ 1–10."""

    name, domain = "aesthetic", "sd3"

    def __init__(self, clip_model: str = "ViT-L-14", clip_weights: str | None = None,
                 head_weights: str | None = None, quick_gelu: bool = True, dtype: str = "fp32", **_: Any):
        super().__init__()
        head_path = resolve(HEAD_SPEC, head_weights)  # both files checked before any model is built
        # shared with model.features when both use the same ViT-L/14 file (one copy in memory)
        self.clip = shared_clip_image_features(clip_model, clip_weights, env_var="ALIGN_AESTHETIC_CLIP_WEIGHTS",
                                               quick_gelu=quick_gelu, pretrained="openai",
                                               config_key="reward.clip_weights", dtype=dtype)
        self.head = freeze(AestheticHead.from_state_dict(torch.load(head_path, map_location="cpu",
                                                                    weights_only=True)))
        if self.head.layers[0].in_features != self.clip.num_features:
            raise ValueError(f"aesthetic head expects {self.head.layers[0].in_features}-d CLIP embeddings, "
                             f"{clip_model} gives {self.clip.num_features}-d")
        self.eval()

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        return self.head(self.clip(images)).squeeze(-1).float()
