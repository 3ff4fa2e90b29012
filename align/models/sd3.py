"""``model=sd3``: Stable Diffusion 3 (medium) as the flow prior, finetuned through LoRA (paper §5, reference §1.8).

The checkpoint is a diffusers directory (``model.pretrained``: a hub id, default
``stabilityai/stable-diffusion-3-medium-diffusers``, or a local directory with the same layout). Each component
is loaded with its library's own ``from_pretrained``. SD3.5 (``stabilityai/stable-diffusion-3.5-medium`` /
``-large``) has the same layout and loads unchanged: its transformer config carries the extra options
(``dual_attention_layers``, ``qk_norm="rms_norm"``, its own sizes and ``pos_embed_max_size``), which
``SD3Transformer2DModel.from_pretrained`` reads, and the LoRA targets match the dual-attention ``attn2``
projections by suffix (tests/test_sd35.py):

* ``transformer`` (SD3Transformer2DModel, in ``model.dtype``, bf16 by default) + peft LoRA r = 8 on
  to_q/to_k/to_v/to_out.0 in fp32 (``FlowTransformerModel``: σ = 1 − t, u = −v, τ = 1000σ, CFG w = 5 with the
  unconditional branch detached under grad);
* ``text_encoder`` / ``text_encoder_2`` (CLIP-L, CLIP-G) and optionally ``text_encoder_3`` (T5-XXL,
  ``model.t5``). Prompt embeddings are computed once per prompt of the run's prompt set (plus the empty
  negative prompt) exactly as ``StableDiffusion3Pipeline.encode_prompt`` does, cached on the CPU, and the
  text encoders are then freed. Without T5 the T5 part of the context is zeros, which is what the diffusers
  pipeline feeds when ``text_encoder_3`` is None;
* the decoder (``model.decoder``): the SD3 VAE or TAESD3 (``AutoencoderTiny``, the authors' code's choice
  for reward gradients), fp32 and frozen;
* ``scheduler`` config: its ``shift`` must agree with ``sampler.shift`` (the sd3 grid, t = 1 − σ).

Data space: SD3 latents x ∈ R^{16 × res/8 × res/8}; ``decode(x)`` = decoder(x / scaling_factor + shift_factor)
mapped from [−1, 1] to images in [0, 1] (clamped), fp32, differentiable, with the factors of the decoder's own
config (the SD3 VAE's 1.5305 / 0.0609; TAESD3's 1 / 0: it takes the diffusion latents as they are).
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import torch
from torch.nn import functional as F

from align.metrics.features import build_features
from align.core.loading import DTYPES, dtype_kwargs, load_component
from align.models.flow_transformer import LORA_TARGET_MODULES, LORA_WEIGHT_NAME
from align.models.latent_image import LatentImageModel, check_reward_grad_batch_size
from align.models.latent_image import encode_device as _encode_device
from align.models.sd3_text import SD3TextEncoders
from align.core.registry import register_model
from align.core.schema import Dtype, Grid, config_object
from align.core.weights import WEIGHT_GLOBS, WeightNeed, WeightSpec, looks_local, resolve

DEFAULT_PRETRAINED = "stabilityai/stable-diffusion-3-medium-diffusers"
# SD3.5: the same diffusers layout and scheduler (shift 3); the transformer config adds dual attention / QK-norm
SD35_PRETRAINED = ("stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large")
DEFAULT_TAESD3 = "madebyollin/taesd3"


def check_scheduler(sched_cfg: dict[str, Any], sampler_shift: float | None) -> None:
    """Our sd3 grid is the scheduler's static-shift schedule with τ = 1000σ: refuse anything else, and a
    ``sampler.shift`` that differs from the checkpoint's scheduler shift."""
    if sched_cfg.get("use_dynamic_shifting"):
        raise ValueError("sd3: the checkpoint's scheduler uses resolution-dependent (dynamic) shifting, which the "
                         "sd3 grid does not implement; use an SD3/SD3.5 checkpoint with a static shift")
    if int(sched_cfg.get("num_train_timesteps", 1000)) != 1000:
        raise ValueError(f"sd3: scheduler num_train_timesteps={sched_cfg['num_train_timesteps']}, but the "
                         "transformer is fed τ = 1000σ")
    shift = float(sched_cfg.get("shift", 1.0))
    if sampler_shift is not None and abs(float(sampler_shift) - shift) > 1e-9:
        raise ValueError(f"sampler.shift={sampler_shift} but the checkpoint's scheduler (scheduler/"
                         f"scheduler_config.json) uses shift {shift}; set sampler.shift={shift}")


def enable_tf32() -> bool:
    """TF32 matmuls on CUDA (the authors' setting; the fp32 parts: LoRA, decoder, value net, rewards); nothing
    on a machine without CUDA. Returns whether it was enabled."""
    if not torch.cuda.is_available():
        return False
    torch.set_float32_matmul_precision("high")      # = torch.backends.cuda.matmul.allow_tf32 = True, every torch
    torch.backends.cudnn.allow_tf32 = True           # convolutions (torch's default already)
    return True


def component_files(folder: str, config: str | None = "config.json", weights: bool = True) -> tuple[tuple[str, ...], ...]:
    """The files a component folder of the diffusers layout needs: its config and, with ``weights``, a weight
    file (a config-less folder, a tokenizer, needs any file)."""
    files = ((f"{folder}/{config}",),) if config else ((f"{folder}/*",),)
    return files + ((tuple(f"{folder}/{g}" for g in WEIGHT_GLOBS),) if weights else ())


def _checkpoint_specs(pretrained: str, t5: bool, vae: bool) -> tuple[WeightSpec, WeightSpec]:
    """The SD3 checkpoint directory (``model.pretrained``: a local diffusers directory or a hub id) with the
    components this run loads, and the TAESD3 decoder (``model.taesd3_path``)."""
    repo = pretrained if not looks_local(os.path.expanduser(str(pretrained))) else DEFAULT_PRETRAINED
    required = (component_files("scheduler", "scheduler_config.json", weights=False) + component_files("transformer")
                + component_files("vae", weights=vae) + component_files("text_encoder") + component_files("text_encoder_2")
                + component_files("tokenizer", None, weights=False) + component_files("tokenizer_2", None, weights=False))
    if t5:
        required += component_files("text_encoder_3") + component_files("tokenizer_3", None, weights=False)
    spec = WeightSpec(
        what="sd3: the checkpoint", filename="the SD3 diffusers directory", config_key="model.pretrained",
        get=(f"`huggingface-cli download {repo}` (accept the model's license on the hub first; SD3.5: "
             f"{' or '.join(SD35_PRETRAINED)})"),
        is_dir=True, required=required, hub_ids=True, value_hint="<local directory or hub id>",
        alternative="set model.t5=false to run without the T5 encoder (zero T5 embeddings)" if t5 else None)
    taesd = WeightSpec(
        what="sd3: the TAESD3 decoder", filename="the TAESD3 diffusers directory", config_key="model.taesd3_path",
        hub_repo=DEFAULT_TAESD3, is_dir=True, required=(("config.json",), WEIGHT_GLOBS), hub_ids=True,
        value_hint="<dir>", alternative="use model.decoder=vae (the full SD3 VAE; more memory under reward gradients)")
    return spec, taesd


# ---- the backend ------------------------------------------------------------------------------------------------
Decoder = enum.StrEnum("Decoder", "taesd3 vae")


@dataclass
class SD3Config:
    """``model=sd3``: Stable Diffusion 3 (medium) as the flow prior, finetuned with LoRA (the paper's image setting,
    §5, reference §1.8). Needs a GPU in practice; the weights are gated on the hub (accept the license, then
    ``huggingface-cli download stabilityai/stable-diffusion-3-medium-diffusers``)."""
    name: str = "sd3"
    # A hub id (resolved through the HF cache / hub, only the needed subfolders) or a local diffusers directory.
    # SD3.5 loads through the same code: stabilityai/stable-diffusion-3.5-medium (2.5B; dual attention in blocks
    # 0-12, QK RMS-norm, position embedding of 384² patches) or stabilityai/stable-diffusion-3.5-large (8.1B, QK
    # RMS-norm, ≈ 16 GB in bf16; 192² patches as SD3). Both ship the diffusers folders, the same scheduler (static
    # shift 3) and SD3's VAE and text encoders; the LoRA targets also match the dual-attention projections. Their
    # model cards sample with w = 4.5 / 40 steps (medium) and w = 3.5 / 28 steps (large); the paper's settings
    # (w 5, 20 steps, β, lr) are SD3-medium's, so on SD3.5 they are a starting point, not the paper's numbers.
    pretrained: str = DEFAULT_PRETRAINED
    dtype: Dtype = Dtype.bfloat16   # transformer and text encoders (bfloat16 | float16 | float32); LoRA weights fp32
    # false: skip text_encoder_3 (T5-XXL, ~9.5 GB in bf16) and feed zero T5 embeddings, as the diffusers pipeline
    # does with text_encoder_3=None (lower prompt fidelity)
    t5: bool = True
    max_sequence_length: int = 256  # T5 tokens (the pipeline's default; the context is 77 CLIP + this many tokens)
    # pixels; latents are 16 × res/8 × res/8. 1024 = SD3-medium's native size and the authors' code. 512 is 4×
    # cheaper per transformer call but off-distribution for SD3
    resolution: int = 1024
    decoder: Decoder = Decoder.taesd3  # taesd3 (AutoencoderTiny, the authors' decoder for reward gradients) | vae
    taesd3_path: str = DEFAULT_TAESD3  # hub id or local directory of TAESD3 (used when decoder=taesd3)
    gradient_checkpointing: bool = False  # recompute transformer (and decoder) activations in backward: less memory
    guidance_scale: float = 5.0     # CFG w, at sampling and in training (the unconditional branch is detached in losses)
    lora_rank: int = 8              # paper: r = 8, lora_alpha = 8, gaussian init, on to_q, to_k, to_v, to_out.0
    lora_alpha: float = 8.0
    grid: Grid = Grid.sd3           # SD3's shifted 20-step Euler grid (t = 1 − σ of FlowMatchEulerDiscreteScheduler)
    # The run's prompt set (top-level `prompts=`; null: animals, the aesthetic task's) is encoded once before
    # training (``prepare``), then the text encoders are freed; true: keep them (on the CPU) to encode prompts
    # outside the set on the fly
    keep_text_encoders: bool = False
    encode_device: str = "auto"     # where the text encoders run for the one-off encoding (auto: cuda if available)
    decode_batch_size: int = 8      # images decoded per decoder call (evaluation batches)
    # images per reward-gradient pass (VGG-Flow's and the adjoint methods' ∇r(decode(x))): one pass's decode-and-
    # reward graph alive at a time instead of the whole batch's, for rewards that score each image independently;
    # null: the whole batch at once
    reward_grad_batch_size: Optional[int] = None
    forward_batch_size: Optional[int] = 16  # transformer batch under no_grad (evaluation / rollouts); null: no chunking
    # VGG-Flow's ν_φ: the paper's scaled-down SD1.5 UNet2DConditionModel on latents (its keyword arguments),
    # cross-attending to the prompt embeddings (dim 4096); conv_out weight and bias × out_scale (ν ≈ 0 at the start)
    value_net: Dict[str, Any] = field(default_factory=lambda: {
        "block_out_channels": [64, 128, 256, 256], "layers_per_block": 1, "attention_head_dim": 8,
        "out_scale": 1.0e-3})
    # Image features of the diversity and FID metrics (align/metrics/features.py): kind clip (OpenAI CLIP ViT-L/14 image
    # embeddings; weights null: $ALIGN_CLIP_FEATURES_WEIGHTS, else the HF cache of open_clip's ViT-L-14/openai) |
    # inception (FID's Inception-v3 pool features: needs `pip install torch-fidelity` and its weights file in
    # `weights` or $ALIGN_INCEPTION_WEIGHTS) | pixels (8×8 average-pooled image) | dreamsim (the paper's diversity
    # features: DreamSim's ensemble DINO ViT-B/16 + CLIP ViT-B/16 + OpenCLIP ViT-B/16 with its LoRA merged;
    # `weights` = DreamSim's cache directory, i.e. its release zip extracted, plus
    # checkpoints/dino_vitbase16_pretrain.pth, or $ALIGN_DREAMSIM_DIR; single branch:
    # +model.features.dreamsim_type=open_clip_vitb32 | clip_vitb32 | dino_vitb16)
    features: Dict[str, Any] = field(default_factory=lambda: {"kind": "clip", "model_name": "ViT-L-14",
                                                             "weights": None})

    def validate(self) -> None:
        check_reward_grad_batch_size(self.reward_grad_batch_size)


@register_model("sd3", config=SD3Config)
class SD3Model(LatentImageModel):
    @classmethod
    def weight_needs(cls, model: dict) -> list[WeightNeed]:
        """The weights a run of ``model`` (its config section) loads: the checkpoint, and TAESD3 unless
        ``model.decoder=vae`` (align.setup.preflight lists the missing ones at once)."""
        decoder = str(model.get("decoder", "taesd3"))
        checkpoint, taesd = _checkpoint_specs(model["pretrained"], bool(model.get("t5", True)), decoder == "vae")
        needs = [WeightNeed(checkpoint, model["pretrained"])]
        return needs + ([WeightNeed(taesd, model.get("taesd3_path"))] if decoder == "taesd3" else [])

    """SD3 latents as the paper's flow: v_θ(x, t, c) = −[u_uncond + w (u_cond − u_uncond)] at σ = 1 − t."""

    name = "sd3"

    def __init__(self, cfg: SD3Config | None = None, **overrides: Any):
        cfg = config_object(SD3Config, cfg, overrides, owner="model=sd3")
        net_dtype = DTYPES[cfg.dtype]
        enable_tf32()
        # cheap checks first: the feature extractor's weights, before gigabytes load
        feature_net = build_features(cfg.features).eval().requires_grad_(False)
        decoder = cfg.decoder
        spec, taesd_spec = _checkpoint_specs(cfg.pretrained, cfg.t5, decoder == "vae")
        root = resolve(spec, cfg.pretrained)
        taesd_root = resolve(taesd_spec, cfg.taesd3_path) if decoder == "taesd3" else None

        from diffusers import (AutoencoderKL, AutoencoderTiny, FlowMatchEulerDiscreteScheduler,
                               SD3Transformer2DModel)
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        transformer = load_component("transformer", spec, lambda: SD3Transformer2DModel.from_pretrained(
            root, subfolder="transformer", **dtype_kwargs("diffusers", net_dtype)))
        sched_cfg = FlowMatchEulerDiscreteScheduler.load_config(root, subfolder="scheduler")
        check_scheduler(sched_cfg, None)
        vae_cfg = AutoencoderKL.load_config(root, subfolder="vae")
        if decoder == "vae":
            dec = load_component("VAE", spec, lambda: AutoencoderKL.from_pretrained(
                root, subfolder="vae", **dtype_kwargs("diffusers", torch.float32)))
        else:
            dec = load_component("TAESD3 decoder", taesd_spec, lambda: AutoencoderTiny.from_pretrained(
                taesd_root, **dtype_kwargs("diffusers", torch.float32)))
        toks = [load_component(f"tokenizer {s}", spec, lambda s=s: CLIPTokenizer.from_pretrained(root, subfolder=s))
                for s in ("tokenizer", "tokenizer_2")]
        encs = [load_component(f"text encoder {s}", spec, lambda s=s: CLIPTextModelWithProjection.from_pretrained(
            root, subfolder=s, **dtype_kwargs("transformers", net_dtype)))
            for s in ("text_encoder", "text_encoder_2")]
        if cfg.t5:
            from transformers import T5EncoderModel, T5TokenizerFast

            toks.append(load_component("T5 tokenizer", spec,
                                       lambda: T5TokenizerFast.from_pretrained(root, subfolder="tokenizer_3")))
            encs.append(load_component("T5 text encoder", spec, lambda: T5EncoderModel.from_pretrained(
                root, subfolder="text_encoder_3", **dtype_kwargs("transformers", net_dtype))))

        # latent geometry
        vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        patch = int(transformer.config.patch_size)
        resolution = cfg.resolution
        if resolution % (vae_factor * patch):
            raise ValueError(f"model.resolution={resolution} must be a multiple of {vae_factor * patch} "
                             f"(VAE factor {vae_factor} × patch size {patch})")
        side = resolution // vae_factor
        max_side = int(transformer.config.pos_embed_max_size or side // patch) * patch
        if side > max_side:
            raise ValueError(f"model.resolution={resolution}: latents of {side}² exceed the transformer's "
                             f"position embedding ({max_side}²); use at most {max_side * vae_factor}")

        super().__init__(transformer, cfg.guidance_scale, cfg.lora_rank, cfg.lora_alpha, LORA_TARGET_MODULES)
        self.data_shape = (int(transformer.config.in_channels), side, side)
        self.resolution, self.grid, self.pretrained_dir = resolution, cfg.grid, root
        self.scheduler_shift = float(sched_cfg.get("shift", 1.0))
        # the decoder's own latent factors, as the diffusers pipeline uses its vae's (TAESD3: 1 and 0)
        self.set_decoder(dec, decoder, cfg.decode_batch_size)
        self.forward_batch_size = cfg.forward_batch_size
        self.reward_grad_batch_size = cfg.reward_grad_batch_size
        self.joint_dim = self.context_dim = int(transformer.config.joint_attention_dim)
        self.value_net_kwargs = dict(cfg.value_net)
        if cfg.gradient_checkpointing:
            self.enable_gradient_checkpointing()
        self.feature_net = feature_net

        # prompt embeddings: cached on demand; ``prepare`` encodes the run's set and frees the encoders
        self.init_prompt_cache()
        self._t5_len = cfg.max_sequence_length
        text = SD3TextEncoders(toks, [e.eval().requires_grad_(False) for e in encs], cfg.max_sequence_length)
        self._text: SD3TextEncoders | None = text.to(_encode_device(cfg.encode_device))
        self.keep_text_encoders = cfg.keep_text_encoders
        self._sched_cfg = sched_cfg

    # -- prompts
    def prepare(self, prompts: list[str], grid: str, shift: float) -> None:
        """Check the sampler's shift against the checkpoint's scheduler, encode the run's prompt set and the
        empty negative prompt once, then free the text encoders (or move them to the CPU with
        ``keep_text_encoders``)."""
        check_scheduler(self._sched_cfg, shift)
        self.prepare_prompts(prompts)

    def _assemble(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """[clip ⊕ 0-pad to joint_dim ; T5 or zeros] along the sequence, as the pipeline concatenates them."""
        self.cache_prompts(prompts)
        seqs, pooled = [], []
        for p in prompts:
            clip, pool, t5 = self._cache[p]
            clip = F.pad(clip, (0, self.joint_dim - clip.shape[-1]))
            t5 = clip.new_zeros(self._t5_len, self.joint_dim) if t5 is None else t5
            seqs.append(torch.cat([clip, t5], dim=0))
            pooled.append(pool)
        device = self.device
        return {"encoder_hidden_states": torch.stack(seqs).to(device),
                "pooled_projections": torch.stack(pooled).to(device)}

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self._assemble(list(prompts))

    def negative_cond(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The empty prompt "" (SD3's negative prompt under CFG), repeated over the batch."""
        one = self._assemble([""])
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in one.items()}

    # -- export
    def save_finetuned(self, directory: str) -> None:
        """``<dir>/pytorch_lora_weights.safetensors`` in diffusers' SD3 format, with the LoRA config (rank, alpha,
        targets) as adapter metadata so that ``StableDiffusion3Pipeline.load_lora_weights(dir)`` restores the
        same scale α/r."""
        from diffusers.loaders import SD3LoraLoaderMixin

        os.makedirs(directory, exist_ok=True)
        SD3LoraLoaderMixin.save_lora_weights(directory, transformer_lora_layers=self.lora_state_dict(),
                                             weight_name=LORA_WEIGHT_NAME,
                                             transformer_lora_adapter_metadata=self.lora_adapter_metadata())
