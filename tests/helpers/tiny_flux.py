"""A tiny random FLUX.1 pipeline with the real directory layout, for CPU tests.

``build_tiny_flux(directory)`` writes what ``FluxPipeline.save_pretrained`` writes for black-forest-labs/FLUX.1-dev
(model_index.json, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/), from
the published configs, shrunk:

* FluxTransformer2DModel (dev: 19 double + 38 single blocks, 24 heads × 128, in_channels 64 = 16 latent channels ×
  2×2 packing, joint_attention_dim 4096, pooled 768, guidance_embeds true, rope axes (16, 56, 56)): 1 + 1 blocks,
  2 heads × 16, joint 32, pooled 16, rope axes (4, 6, 6) (they sum to the head dim, as 16 + 56 + 56 = 128);
  ``guidance=False`` is schnell's (no guidance embedding);
* AutoencoderKL (FLUX's vae/config.json: 4 levels, 16 latent channels, scaling_factor 0.3611, shift_factor 0.1159,
  no quant convs): 8 channels per level;
* CLIPTextModel (CLIP-L, only the pooled output is used; hidden 768 → 16) and T5EncoderModel (d_model 4096 → 32)
  with the tokenizers of tests/helpers/tiny_sd3.py;
* FlowMatchEulerDiscreteScheduler with dev's config (use_dynamic_shifting, base/max_image_seq_len 256 / 4096,
  base/max_shift 0.5 / 1.15, shift 3) or schnell's (static shift 1).

``build_tiny_taef1(directory)``: an AutoencoderTiny shaped like madebyollin/taef1 (16 latent channels, factors 1 / 0).
"""
from __future__ import annotations

import torch

from helpers.tiny_sd3 import build_tiny_taesd3, clip_tokenizer, t5_parts

SCALING_FACTOR = 0.3611     # FLUX.1's vae/config.json
SHIFT_FACTOR = 0.1159
RESOLUTION = 32             # latents 16 × 4 × 4 → 4 packed tokens
CLIP_HIDDEN = 16
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                         max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def build_tiny_flux_pipeline(guidance: bool = True, seed: int = 0):
    """The tiny random ``FluxPipeline`` (fp32, eval mode); ``guidance=False``: schnell-shaped."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=CLIP_HIDDEN, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=RESOLUTION, scaling_factor=SCALING_FACTOR,
        shift_factor=SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False)
    tok = clip_tokenizer()
    ids = tok.get_vocab()
    torch.manual_seed(seed + 2)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(ids), hidden_size=CLIP_HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=ids["<|startoftext|>"], eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"], hidden_act="quick_gelu")).eval()
    t5, t5_tok = t5_parts(seed + 3)
    scheduler = FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if guidance else SCHNELL_SCHEDULER))
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=t5_tok, transformer=transformer)


def build_tiny_flux(directory: str, guidance: bool = True, seed: int = 0) -> str:
    """Save the tiny pipeline to ``directory`` (the real FLUX.1 layout) and return the directory."""
    build_tiny_flux_pipeline(guidance=guidance, seed=seed).save_pretrained(directory)
    return directory


def build_tiny_taef1(directory: str, seed: int = 5) -> str:
    """madebyollin/taef1's config is TAESD3's (16 latent channels, relu, nearest upsampling, latent_magnitude 3 /
    shift 0.5, scaling 1 / shift 0; only the weights differ): the same tiny shrunk AutoencoderTiny."""
    return build_tiny_taesd3(directory, seed)


def load_flux(path: str, **kw):
    """Our FLUX backend on a tiny checkpoint directory (fp32, VAE decoder, pixel features, text encoders kept)."""
    from align.core.registry import MODELS

    args = dict(pretrained=path, dtype="float32", resolution=RESOLUTION, decoder="vae", max_sequence_length=16,
                features={"kind": "pixels"}, keep_text_encoders=True)
    args.update(kw)
    torch.manual_seed(0)
    return MODELS.get("flux")(**args)


def load_flux_pipe(path: str, dtype: torch.dtype = torch.float32):
    """diffusers' own FluxPipeline on the same directory (the reference the tests compare with)."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(path, dtype=dtype)
