"""A tiny random Stable Diffusion 3 pipeline with the real directory layout, for CPU tests.

``build_tiny_sd3(directory)`` writes what ``StableDiffusion3Pipeline.save_pretrained`` writes for
stabilityai/stable-diffusion-3-medium-diffusers (model_index.json, transformer/, vae/, text_encoder/,
text_encoder_2/, text_encoder_3/, tokenizer*/, scheduler/), only tiny and random:

* SD3Transformer2DModel: 2 joint blocks, 2 heads of 8, patch 2, 16 latent channels, joint_attention_dim 32;
* AutoencoderKL: 4 resolution levels (downsampling 8), 16 latent channels, SD3's scaling_factor 1.5305
  and shift_factor 0.0609, no quant convs (as SD3's VAE);
* two CLIPTextModelWithProjection (hidden 16, projection 16: 16 + 16 = 32 = joint_attention_dim, pooled 32)
  with CLIPTokenizers built from open_clip's BPE vocabulary (the first ``n_merges`` merges: the vocabulary
  is a consistent prefix of CLIP's), the second with SD3's pad token "!";
* optionally a one-layer T5EncoderModel (d_model 32) with a small Unigram T5 tokenizer;
* FlowMatchEulerDiscreteScheduler with shift 3 (SD3-medium's).

``build_tiny_taesd3(directory)`` writes a tiny AutoencoderTiny with TAESD3's config (16 latent channels, its own
scaling_factor 1 and shift_factor 0, not the VAE's).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from torch.nn import functional as F

from align.core.interfaces import Reward
from helpers.tiny_clip import clip_vocab_and_merges

SCALING_FACTOR = 1.5305     # SD3's VAE (vae/config.json of stable-diffusion-3-medium-diffusers)
SHIFT_FACTOR = 0.0609
JOINT_DIM = 32
CLIP_HIDDEN = 16
LATENT_SIZE = 4             # the transformer's sample_size: resolution 32 / 8
RESOLUTION = 32


def clip_tokenizer(pad_token: str = "<|endoftext|>", n_merges: int = 2000):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(n_merges)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def clip_text_encoder(vocab_size: int, bos: int, eos: int, pad: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=CLIP_HIDDEN, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=CLIP_HIDDEN,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, hidden_act="gelu")
    return CLIPTextModelWithProjection(cfg).eval()


def t5_parts(seed: int):
    """A one-layer T5 encoder (d_model = joint_attention_dim) and a Unigram tokenizer over a few pieces."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces += [("▁" + w, -1.0) for w in ("a", "photo", "of", "cat", "dog", "painting", "the")]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(pieces), d_model=JOINT_DIM, d_ff=32, d_kv=8, num_layers=1, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval(), tok


def build_tiny_pipeline(t5: bool = True, seed: int = 0):
    """The tiny random ``StableDiffusion3Pipeline`` (all components in fp32, eval mode)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=JOINT_DIM, caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_HIDDEN, pos_embed_max_size=8)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=RESOLUTION, scaling_factor=SCALING_FACTOR,
        shift_factor=SHIFT_FACTOR, use_quant_conv=False, use_post_quant_conv=False)
    tok1 = clip_tokenizer()
    tok2 = clip_tokenizer(pad_token="!")
    ids = tok1.get_vocab()
    enc1 = clip_text_encoder(len(ids), ids["<|startoftext|>"], ids["<|endoftext|>"], ids["<|endoftext|>"], seed + 2)
    enc2 = clip_text_encoder(len(ids), ids["<|startoftext|>"], ids["<|endoftext|>"], ids["!"], seed + 3)
    enc3, tok3 = t5_parts(seed + 4) if t5 else (None, None)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=enc1,
                                    tokenizer=tok1, text_encoder_2=enc2, tokenizer_2=tok2, text_encoder_3=enc3,
                                    tokenizer_3=tok3)


def build_tiny_sd3(directory: str, t5: bool = True, seed: int = 0) -> str:
    """Save the tiny pipeline to ``directory`` (the real SD3 layout) and return the directory."""
    build_tiny_pipeline(t5=t5, seed=seed).save_pretrained(directory)
    return directory


def build_tiny_taesd3(directory: str, seed: int = 5) -> str:
    """A tiny random AutoencoderTiny shaped like madebyollin/taesd3's config.json, shrunk, saved to ``directory``.

    As the real one: 16 latent channels, ×8 (4 levels), relu, nearest upsampling, latent_magnitude 3 /
    latent_shift 0.5, and ``scaling_factor`` 1.0 / ``shift_factor`` 0.0 (diffusers' AutoencoderTiny defaults,
    which TAESD3 keeps: it takes the diffusion latents themselves, "no extra scale factor"), NOT the SD3 VAE's
    1.5305 / 0.0609. Shrunk: 8 channels per block and (1, 2, 2, 2) / (2, 2, 2, 1) blocks instead of 64 and
    (1, 3, 3, 3) / (3, 3, 3, 1).
    """
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=(8, 8, 8, 8),
                    decoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 2, 2, 2),
                    num_decoder_blocks=(2, 2, 2, 1), latent_channels=16, act_fn="relu", upsample_fn="nearest",
                    upsampling_scaling_factor=2, latent_magnitude=3, latent_shift=0.5, scaling_factor=1.0,
                    shift_factor=0.0).save_pretrained(directory)
    return directory


# ---- helpers shared by the SD3 and SD3.5 tests -----------------------------------------------------------------
def load_model(path: str, **kw):
    """Our SD3 backend on a tiny checkpoint directory (fp32, VAE decoder, pixel features, text encoders kept)."""
    from align.core.registry import MODELS

    args = dict(pretrained=path, dtype="float32", resolution=RESOLUTION, decoder="vae", t5=False,
                features={"kind": "pixels"}, keep_text_encoders=True)
    args.update(kw)
    torch.manual_seed(0)
    return MODELS.get("sd3")(**args)


def load_pipe(path: str, t5: bool = True):
    """diffusers' own StableDiffusion3Pipeline on the same directory (the reference the tests compare with)."""
    from diffusers import StableDiffusion3Pipeline

    kw = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    return StableDiffusion3Pipeline.from_pretrained(path, dtype=torch.float32, **kw)


def perturb_lora(model, scale: float = 0.2, seed: int = 1) -> None:
    """Move the LoRA weights off their zero-effect init so that the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def fixed_noise(model, n: int = 2, seed: int = 0) -> torch.Tensor:
    return model.sample_noise(n, torch.Generator().manual_seed(seed))


class TinyImageReward(Reward):
    """A fixed differentiable score of 4×4-pooled images, offset + w·pool(x) (tests only; ``reward.offset`` > the
    pooled term's range keeps ReFL's / DRaFT's −ReLU(r) active)."""

    name, domain = "sd3_test_tiny", "sd3"

    def __init__(self, offset: float = 1.0, **_):
        super().__init__()
        self.offset = float(offset)
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, 48), requires_grad=False)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.offset + (F.adaptive_avg_pool2d(images.float(), 4).flatten(1) * self.w).sum(1)


@contextlib.contextmanager
def tiny_reward_registered():
    """Register TinyImageReward for the duration (the registry stays clean for other test modules)."""
    from align.core.registry import REWARDS, register_reward

    register_reward(TinyImageReward.name)(TinyImageReward)
    try:
        yield TinyImageReward.name
    finally:
        REWARDS._entries.pop(TinyImageReward.name, None)
