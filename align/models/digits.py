"""``model=digits``: a small pretrained class-conditional SD3-architecture flow model on handwritten digits.

Data: scikit-learn's bundled ``load_digits`` (1,797 grey 8×8 images, 10 classes), pixel space, values
scaled from [0, 16] to [−1, 1]; ``decode`` maps back to images in [0, 1] (ink = 1, background = 0).

Prompts are the class names ``"zero"`` … ``"nine"``; ``"3"``, ``"three"`` and ``"a handwritten digit 3"``
are accepted too (the last word decides), and ``""`` is the null prompt used for classifier-free guidance.
Each class and the null prompt has a learned prompt embedding (2 tokens of width 32 + a pooled vector),
trained with the flow and frozen afterwards: they play the part of SD3's text encoders.

The network is a diffusers ``SD3Transformer2DModel`` (patch 2, 4 joint blocks, 4 heads of 16) trained by
rectified flow in SD3's u-convention (``python -m align.pretrain model=digits``), run through exactly the
code SD3 uses (``FlowTransformerModel``: σ = 1 − t, u = −v, τ = 1000σ, CFG, peft LoRA on attention).
``features`` are the 32-d penultimate activations of a small CNN classifier trained on the same data
(``align/metrics/digits_classifier.py``, shared with the ``digits_classifier`` reward); they feed the diversity and
prior-preservation (FID) metrics.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from align.metrics.digits_classifier import (DIGIT_NAMES, NULL_INDEX, REGENERATE_HOW, WEIGHTS_DIR, DigitClassifier,
                                             load_digit_classifier, prompts_to_classes)
from align.models.flow_transformer import LORA_TARGET_MODULES, FlowTransformerModel
from align.models.value_unet import ValueUNet
from align.core.registry import register_model
from align.core.schema import Grid, config_object
from align.core.weights import WeightSpec, load_json, load_state, load_tensors, resolve

FLOW_WEIGHTS = os.path.join(WEIGHTS_DIR, "digits_flow.safetensors")
FLOW_CONFIG = os.path.join(WEIGHTS_DIR, "digits_flow.json")
FLOW_SPEC = WeightSpec(what="digits: the pretrained flow",
                       filename=f"{os.path.basename(FLOW_WEIGHTS)} (+ {os.path.basename(FLOW_CONFIG)} beside it)",
                       config_key="model.weights", get=REGENERATE_HOW, default=FLOW_WEIGHTS)

# The pretrained transformer's architecture (written to digits_flow.json by the pretraining script).
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=4, attention_head_dim=16,
    num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
    pos_embed_max_size=4)
PROMPT_TOKENS = 2


# ---- data and prompts --------------------------------------------------------------------------------------
def load_digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as x ∈ [−1, 1]^{1×8×8} (float32) and their labels (int64)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.as_tensor(d.target, dtype=torch.int64)


DECODE_SHARPNESS = 50.0


def to_image(x: torch.Tensor, sharpness: float = DECODE_SHARPNESS) -> torch.Tensor:
    """Model space [−1, 1] → image in (0, 1): z = (x + 1)/2 through a smooth clamp
    softplus_k(z) − softplus_k(z − 1), k = ``sharpness``.

    Like SD3's clamped images it saturates at 0 and 1, but it is C∞: a hard clamp puts kinks exactly
    where generated backgrounds sit (x ≈ −1), and VGG-Flow's finite differences of ∇r then explode
    (measured: the mean-square HJB residual at t = 0.73 is 5.2 with a hard clamp, 0.013 without kinks).
    Cost: exact 0 / 1 pixels read as 0.014 / 0.986 (log 2 / k).
    """
    z = (x + 1.0) * 0.5
    return F.softplus(z, beta=sharpness) - F.softplus(z - 1.0, beta=sharpness)


# ---- prompt embeddings (the "text encoder") ---------------------------------------------------------------
class PromptEmbedding(nn.Module):
    """Learned embeddings of the 10 classes and the null prompt, in SD3's two conditioning streams."""

    def __init__(self, tokens: int = PROMPT_TOKENS, dim: int = 32, pooled_dim: int = 32):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(NULL_INDEX + 1, tokens, dim))
        self.pooled = nn.Parameter(torch.randn(NULL_INDEX + 1, pooled_dim))

    def forward(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        idx = idx.to(self.tokens.device)
        return {"encoder_hidden_states": self.tokens[idx], "pooled_projections": self.pooled[idx]}


def build_transformer(config: dict[str, Any] | None = None) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**(TRANSFORMER_CONFIG if config is None else config))


# ---- the backend ------------------------------------------------------------------------------------------
@dataclass
class DigitsConfig:
    """``model=digits`` (see the module docstring). Weights: align/models/weights/ (regenerate:
    ``python -m align.pretrain model=digits``)."""
    name: str = "digits"
    grid: Grid = Grid.sd3           # SD3's shifted 20-step grid (shift 3), the paper's sampler; also good on uniform
    # CFG w (SD3 uses 5). w = 2 keeps 100 % recognisable digits at about half the real feature variance; w = 1:
    # 98.5 %, real-like variance; w = 3–5: less diverse still.
    guidance_scale: float = 2.0
    weights: Optional[str] = None   # null: align/models/weights/digits_flow.safetensors (+ .json beside it)
    classifier_weights: Optional[str] = None  # null: the shipped classifier (features for FID/diversity)
    lora_rank: int = 8              # paper: r = 8, lora_alpha = 8, gaussian init, on to_q, to_k, to_v, to_out.0
    lora_alpha: float = 8.0
    # VGG-Flow's ν_φ: a scaled-down UNet2DConditionModel (its keyword arguments), conv_out × out_scale. (16, 32):
    # 0.2 M parameters beside the flow transformer's 0.6 M, the paper's proportion (a small U-Net beside SD3's);
    # (32, 64) had 0.79 M and cost more than the transformer per call, with the same reward and FID over 4 seeds
    # (docs/speed.md)
    value_net: Dict[str, Any] = field(default_factory=lambda: {
        "block_out_channels": [16, 32], "attention_head_dim": 8, "out_scale": 1.0e-3})


@register_model("digits", config=DigitsConfig)
class DigitsFlow(FlowTransformerModel):
    """Pretrained class-conditional flow on 8×8 digits, finetuned through LoRA (see the module docstring)."""

    name = "digits"
    data_shape = (1, 8, 8)

    def __init__(self, cfg: DigitsConfig | None = None, *, pretrained: bool = True, **overrides: Any):
        """``pretrained=False`` builds random weights of the shipped architecture (tests only)."""
        cfg = config_object(DigitsConfig, cfg, overrides, owner="model=digits")
        config: dict[str, Any] = {"transformer": dict(TRANSFORMER_CONFIG), "prompt_tokens": PROMPT_TOKENS}
        state = None
        if pretrained:
            weights = resolve(FLOW_SPEC, cfg.weights)
            cfg_path = os.path.splitext(weights)[0] + ".json"
            if not os.path.isfile(cfg_path):
                raise FLOW_SPEC.error(f"{cfg_path}, the architecture beside the weights, is missing")
            config = load_json(FLOW_SPEC, cfg_path, keys=("transformer", "prompt_tokens"))
            state = load_tensors(FLOW_SPEC, weights)
        tcfg = config["transformer"]
        transformer = build_transformer(tcfg)
        embedding = PromptEmbedding(config["prompt_tokens"], tcfg["joint_attention_dim"],
                                    tcfg["pooled_projection_dim"])
        if state is not None:
            for prefix, part in (("transformer.", transformer), ("prompt_embedding.", embedding)):
                load_state(FLOW_SPEC, part, {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                           weights)
        super().__init__(transformer, cfg.guidance_scale, cfg.lora_rank, cfg.lora_alpha, LORA_TARGET_MODULES)
        self.prompt_embedding = embedding.requires_grad_(False)
        self.config = config
        self.grid = cfg.grid
        self.value_net_kwargs = dict(cfg.value_net)
        if pretrained or cfg.classifier_weights is not None:
            self.classifier = load_digit_classifier(cfg.classifier_weights, config_key="model.classifier_weights")
        else:
            self.classifier = DigitClassifier().eval().requires_grad_(False)

    # -- prompts
    def default_prompts(self) -> list[str]:
        return list(DIGIT_NAMES)

    @classmethod
    def check_prompts(cls, prompts: list[str]) -> None:
        """Only the class names (and the forms ``prompt_to_class`` reads) are known."""
        prompts_to_classes(prompts)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.prompt_embedding(prompts_to_classes(prompts))

    def negative_cond(self, batch_size: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.prompt_embedding(torch.full((batch_size,), NULL_INDEX, dtype=torch.int64))

    # -- images and features
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in (0, 1), [B, 1, 8, 8], differentiable (smoothly saturating, see ``to_image``)."""
        return to_image(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(self.decode(x).float())

    def preview_grid(self, x: torch.Tensor, n: int = 80, nrow: int = 8) -> torch.Tensor:
        """[3, H, W] grid of up to n decoded samples, ``nrow`` per row, upscaled ×4 (the trainer passes
        8 samples of each prompt in turn: one digit class per row)."""
        from torchvision.utils import make_grid

        img = self.decode(x[:n].detach().float().cpu())
        img = F.interpolate(img, scale_factor=4, mode="nearest")
        return make_grid(img, nrow=int(min(len(img), nrow)), padding=2, pad_value=0.5)

    # -- VGG-Flow's value network
    def make_value_network(self) -> nn.Module:
        """The paper's scaled-down U-Net, sized for 8×8 (cross-attention on the prompt tokens, output ×1e−3)."""
        kw = self.value_net_kwargs
        return ValueUNet(channels=1, sample_size=8, layers_per_block=1,
                         cross_attention_dim=self.config["transformer"]["joint_attention_dim"],
                         norm_num_groups=min(8, min(kw["block_out_channels"])), **kw)
