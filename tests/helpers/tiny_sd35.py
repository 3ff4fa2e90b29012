"""Tiny random Stable Diffusion 3.5 pipelines (medium and large) in the real diffusers layout, for CPU tests.

The transformers are the published ``transformer/config.json`` of stabilityai/stable-diffusion-3.5-medium and
-large shrunk in width and depth only; every option SD3.5 adds over SD3 is kept as published:

===========================  ======================================  ==========================  =====================
key                          SD3.5-medium (published)                SD3.5-large (published)     tiny medium / large
===========================  ======================================  ==========================  =====================
num_layers                   24                                      38                          3 / 2
num_attention_heads          24                                      38                          2 / 3
attention_head_dim           64                                      64                          8 / 8
caption_projection_dim       1536 (= heads × head dim)               2432 (= heads × head dim)   16 / 24
dual_attention_layers        [0 … 12] (the first 13 of 24 blocks)    absent (= ())               (0, 1) / ()
qk_norm                      "rms_norm"                              "rms_norm"                  "rms_norm"
pos_embed_max_size           384                                     192                         384 / 192
sample_size, patch_size      128, 2                                  128, 2                      128, 2
in/out_channels              16                                      16                          16
joint_attention_dim          4096 (T5-XXL width)                     4096                        32 (tiny T5 / CLIPs)
pooled_projection_dim        2048 (CLIP-L 768 + CLIP-G 1280)         2048                        32 (16 + 16)
===========================  ======================================  ==========================  =====================

In the medium model the dual-attention blocks come first and the last block (``context_pre_only``) is a plain
one; the tiny medium keeps that order (blocks 0, 1 dual, block 2 plain and last).

Everything else is SD3's, as published for SD3.5 too: ``scheduler/scheduler_config.json`` of both is
``{"num_train_timesteps": 1000, "shift": 3.0}`` (static shift 3, as SD3-medium), the VAE is SD3's (scaling 1.5305,
shift 0.0609), and the text encoders are CLIP-L, CLIP-G and T5-XXL. The VAE and the tiny text encoders /
tokenizers are taken from ``tiny_sd3`` (its ``build_tiny_pipeline``), only the transformer and the scheduler are
SD3.5's.
"""
from __future__ import annotations

import torch

from helpers.tiny_sd3 import CLIP_HIDDEN, JOINT_DIM, build_tiny_pipeline

# published values (transformer/config.json of each hub repository) that the tiny models keep
SD35_PUBLISHED = {
    "medium": {"num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64, "caption_projection_dim": 1536,
               "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm", "pos_embed_max_size": 384,
               "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
               "joint_attention_dim": 4096, "pooled_projection_dim": 2048},
    "large": {"num_layers": 38, "num_attention_heads": 38, "attention_head_dim": 64, "caption_projection_dim": 2432,
              "dual_attention_layers": (), "qk_norm": "rms_norm", "pos_embed_max_size": 192,
              "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
              "joint_attention_dim": 4096, "pooled_projection_dim": 2048},
}
SD35_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}     # both repositories' scheduler_config.json

TINY = {
    "medium": {"num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 8, "dual_attention_layers": (0, 1)},
    "large": {"num_layers": 2, "num_attention_heads": 3, "attention_head_dim": 8, "dual_attention_layers": ()},
}


def tiny_sd35_transformer_config(variant: str = "medium") -> dict:
    """The published config of ``variant`` shrunk: depth/width from TINY, text widths of the tiny encoders."""
    cfg = dict(SD35_PUBLISHED[variant])
    cfg.update(TINY[variant])
    cfg["caption_projection_dim"] = cfg["num_attention_heads"] * cfg["attention_head_dim"]   # as published
    cfg["joint_attention_dim"] = JOINT_DIM
    cfg["pooled_projection_dim"] = 2 * CLIP_HIDDEN
    return cfg


def build_tiny_sd35_pipeline(variant: str = "medium", t5: bool = True, seed: int = 0):
    """The tiny random SD3.5 ``StableDiffusion3Pipeline`` (fp32, eval mode)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    parts = build_tiny_pipeline(t5=t5, seed=seed).components
    torch.manual_seed(seed + 10)
    transformer = SD3Transformer2DModel(**tiny_sd35_transformer_config(variant)).eval()
    with torch.no_grad():           # random norms / gates: the qk-norm weights and AdaLN outputs not all 1 / 0
        for name, p in transformer.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    parts.update(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER))
    return StableDiffusion3Pipeline(**parts)


def build_tiny_sd35(directory: str, variant: str = "medium", t5: bool = True, seed: int = 0) -> str:
    """Save the tiny SD3.5 pipeline to ``directory`` (the real layout) and return the directory."""
    build_tiny_sd35_pipeline(variant=variant, t5=t5, seed=seed).save_pretrained(directory)
    return directory
