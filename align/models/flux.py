"""``model=flux``: FLUX.1 (dev or schnell) as the flow prior, finetuned through LoRA, on the same interface as SD3.

The checkpoint is a diffusers directory (``model.pretrained``: a hub id, default ``black-forest-labs/FLUX.1-dev``,
or ``black-forest-labs/FLUX.1-schnell``, or a local directory with the same layout). Each component is loaded with
its library's own ``from_pretrained``:

* ``transformer`` (FluxTransformer2DModel, in ``model.dtype``, bf16 by default) + peft LoRA (rank, α and targets as
  for SD3, ``model.lora_*``) in fp32. It runs on *packed* latents: 2×2 patches of the 16-channel latents become
  tokens of 64 channels, with image position ids (0, row, col) and text position ids 0 (``FluxPipeline``'s
  ``_pack_latents`` / ``_prepare_latent_image_ids``). Our data space stays the unpacked latents
  x ∈ R^{16 × res/8 × res/8}: packing happens inside each network call, so samplers, decoders, rewards and ν_φ
  see the same layout as SD3's;
* the convention is SD3's (``flow_transformer``): σ = 1 − t, u = −v; the transformer is fed σ itself (it
  multiplies by 1000 inside, as the pipeline feeds ``timestep / 1000``);
* guidance: FLUX.1-dev is guidance-distilled. ``model.guidance_scale`` (3.5) goes into its guidance embedding, one
  network call per velocity, no unconditional branch (FluxPipeline's default, ``true_cfg_scale`` 1). schnell has
  no guidance embedding and ignores it;
* ``text_encoder`` (CLIP-L: its pooled vector) and ``text_encoder_2`` (T5-XXL: the token sequence,
  ``model.max_sequence_length``), run once per prompt of the run's prompt set as ``FluxPipeline.encode_prompt``
  does, cached on the CPU, then freed;
* the decoder (``model.decoder``): the FLUX VAE (its scaling 0.3611 and shift 0.1159) or TAEF1 (``AutoencoderTiny``
  for FLUX latents, factors 1 / 0), fp32 and frozen;
* the time grid (``sampler.grid=flux``): FluxPipeline's s = linspace(1, 1/N, N) shifted by the scheduler, with
  dynamic shifting μ = calculate_shift(image tokens) from the scheduler config (dev at 1024²: 4096 tokens, μ = 1.15,
  shift e^μ ≈ 3.16; at 512²: μ ≈ 0.63), or the static shift of a scheduler without it (schnell: 1).

bf16 timesteps: FluxTransformer2DModel casts the timestep to its hidden states' dtype before ×1000, so in bf16
σ is rounded to 8 significant bits (steps of 2⁻⁹ near σ = 0.5) and nearby times (a grid's and a finite
difference's t ± δ) give the same network. ``model.exact_timesteps=true`` (default) feeds the time embedding the
fp32 1000σ instead (as the SD3 backend does), through a pre-hook on ``time_text_embed``; ``false`` feeds what the
pipeline feeds (its 1000σ in the network's dtype, / 1000), bit for bit. In fp32 the two agree to rounding.
"""
from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from align.metrics.features import build_features
from align.core.loading import DTYPES, dtype_kwargs, load_component
from align.models.flow_transformer import LORA_TARGET_MODULES, LORA_WEIGHT_NAME, sigma_to_timestep
from align.models.flux_text import FluxTextEncoders
from align.models.latent_image import LatentImageModel, check_reward_grad_batch_size
from align.models.latent_image import encode_device as _encode_device
from align.models.sd3 import component_files, enable_tf32
from align.core.registry import register_model
from align.core.schema import Dtype, Grid, config_object
from align.core.weights import WEIGHT_GLOBS, WeightNeed, WeightSpec, looks_local, resolve
from samplers.time_grid import dynamic_shift_mu

DEFAULT_PRETRAINED = "black-forest-labs/FLUX.1-dev"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
DEFAULT_TAEF1 = "madebyollin/taef1"
PACK = 2       # FLUX packs 2×2 latent patches into one token


def check_flux_scheduler(cfg: dict[str, Any]) -> None:
    """Our flux grid is FluxPipeline's: the exponential time shift (dynamic) or a static shift of linspace(1, 1/N, N),
    no sigma remapping; refuse anything else."""
    if int(cfg.get("num_train_timesteps", 1000)) != 1000:
        raise ValueError(f"flux: scheduler num_train_timesteps={cfg['num_train_timesteps']}, but the grid assumes "
                         "1000 (the transformer is fed σ = timestep / 1000)")
    if cfg.get("use_dynamic_shifting") and cfg.get("time_shift_type", "exponential") != "exponential":
        raise ValueError(f"flux: scheduler time_shift_type={cfg['time_shift_type']!r}; the flux grid implements the "
                         "exponential shift (FLUX.1's)")
    for key in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                "stochastic_sampling"):
        if cfg.get(key):
            raise ValueError(f"flux: the checkpoint's scheduler sets {key}={cfg[key]}, which the flux grid does "
                             "not implement")


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] → [B, (h/2)(w/2), 4C]: each 2×2 patch one token, channels-major within it (FluxPipeline's
    ``_pack_latents``). Public: a run's samples_final.pt holds unpacked latents; ``pack_latents(x0)`` is what
    ``FluxPipeline(latents=...)`` takes (docs/flux.md, "Regenerating a run's samples with diffusers")."""
    b, c, h, w = x.shape
    return x.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5).reshape(
        b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack_latents``: [B, (h/2)(w/2), 4C] → [B, C, h, w], with h, w the latent height and width
    (resolution / 8; FluxPipeline's ``_unpack_latents`` takes the pixel size and the VAE factor instead). Turns the
    pipeline's ``output_type="latent"`` tokens into samples_final.pt's layout."""
    b, _, d = tokens.shape
    c = d // (PACK * PACK)
    return tokens.view(b, h // PACK, w // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_position_ids(h: int, w: int) -> torch.Tensor:
    """[(h/2)(w/2), 3] ids (0, row, col) of the packed tokens, row-major (FluxPipeline's latent image ids)."""
    rows = torch.arange(h // PACK).repeat_interleave(w // PACK)
    cols = torch.arange(w // PACK).repeat(h // PACK)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()


def _checkpoint_specs(pretrained: str, vae: bool) -> tuple[WeightSpec, WeightSpec]:
    """The FLUX.1 checkpoint directory (``model.pretrained``) with the components a run loads, and TAEF1
    (``model.taef1_path``)."""
    repo = pretrained if not looks_local(os.path.expanduser(str(pretrained))) else DEFAULT_PRETRAINED
    required = (component_files("scheduler", "scheduler_config.json", weights=False) + component_files("transformer")
                + component_files("vae", weights=vae) + component_files("text_encoder") + component_files("text_encoder_2")
                + component_files("tokenizer", None, weights=False) + component_files("tokenizer_2", None, weights=False))
    spec = WeightSpec(
        what="flux: the checkpoint", filename="the FLUX.1 diffusers directory", config_key="model.pretrained",
        get=(f"`huggingface-cli download {repo}` (FLUX.1-dev is gated: accept its license on the hub first; "
             f"{SCHNELL} is Apache-2.0)"),
        is_dir=True, required=required, hub_ids=True, value_hint="<local directory or hub id>")
    taef1 = WeightSpec(
        what="flux: the TAEF1 decoder", filename="the TAEF1 diffusers directory", config_key="model.taef1_path",
        hub_repo=DEFAULT_TAEF1, is_dir=True, required=(("config.json",), WEIGHT_GLOBS), hub_ids=True,
        value_hint="<dir>", alternative="use model.decoder=vae (the FLUX VAE)")
    return spec, taef1


Decoder = enum.StrEnum("Decoder", "vae taef1")


@dataclass
class FluxConfig:
    """``model=flux``: FLUX.1 (dev by default, schnell too) as the flow prior, finetuned with LoRA. Needs a GPU in
    practice (≈ 24 GB of bf16 transformer weights); FLUX.1-dev is gated on the hub (accept its license, then
    ``huggingface-cli download black-forest-labs/FLUX.1-dev``)."""
    name: str = "flux"
    # a hub id (black-forest-labs/FLUX.1-dev | black-forest-labs/FLUX.1-schnell; resolved through the HF cache, only
    # the needed subfolders) or a local diffusers directory of the same layout
    pretrained: str = DEFAULT_PRETRAINED
    dtype: Dtype = Dtype.bfloat16   # transformer and text encoders (bfloat16 | float16 | float32); LoRA weights fp32
    max_sequence_length: int = 512  # T5 tokens (FluxPipeline's default 512; schnell's model card: 256)
    # pixels (a multiple of 16); latents are 16 × res/8 × res/8, packed to (res/16)² tokens. FLUX.1's native size is
    # 1024; the FLUX peers (flow_grpo, DanceGRPO) train at 512
    resolution: int = 1024
    # taef1 (tiny, as SD3's taesd3: 2.3 GB per decode with grad at 1024²) | vae (FLUX's own, what the policy-gradient
    # peers decode with; ≈ 24 GB per decode with grad, so VGG-Flow on 80 GB also needs reward_grad_batch_size=1)
    decoder: Decoder = Decoder.taef1
    taef1_path: str = DEFAULT_TAEF1  # hub id or local directory of TAEF1 (used when decoder=taef1)
    # recompute transformer (and decoder) activations in backward: on by default, since one forward with grad holds
    # ≈ 32 GB at 1024² without it (1.6 GB kept with it)
    gradient_checkpointing: bool = True
    guidance_scale: float = 3.5     # FLUX.1-dev's guidance embedding (FluxPipeline's 3.5); schnell has none
    exact_timesteps: bool = True    # fp32 1000σ into the time embedding (false: the bf16 rounding of the pipeline)
    lora_rank: int = 8              # as SD3: r = 8, lora_alpha = 8, gaussian init
    lora_alpha: float = 8.0
    # matched by suffix: the double blocks' to_q/k/v/out.0 and the single blocks' to_q/k/v (which have no to_out)
    lora_target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGET_MODULES))
    grid: Grid = Grid.flux          # FluxPipeline's grid with the checkpoint's resolution-dependent shift
    keep_text_encoders: bool = False  # true: keep CLIP and T5 (on the CPU) to encode prompts outside the set
    encode_device: str = "auto"     # where the text encoders run for the one-off encoding (auto: cuda if available)
    decode_batch_size: int = 4      # images decoded per decoder call (evaluation batches)
    # images per reward-gradient pass (VGG-Flow's and the adjoint methods' ∇r(decode(x))): one pass's decode-and-
    # reward graph alive at a time instead of the whole batch's, for rewards that score each image independently;
    # null: the whole batch at once (with the VAE, 1 takes VGG-Flow's peak at 1024² from ≈ 110 to ≈ 57 GB:
    # docs/flux.md#hardware-and-memory)
    reward_grad_batch_size: Optional[int] = None
    forward_batch_size: Optional[int] = 8  # transformer batch under no_grad (evaluation / rollouts); null: no chunking
    # VGG-Flow's ν_φ: the scaled-down SD1.5 UNet2DConditionModel on the (unpacked) latents, cross-attending to the
    # T5 tokens (dim 4096); conv_out × out_scale (ν ≈ 0 at the start)
    value_net: Dict[str, Any] = field(default_factory=lambda: {
        "block_out_channels": [64, 128, 256, 256], "layers_per_block": 1, "attention_head_dim": 8,
        "out_scale": 1.0e-3})
    # image features of the diversity and FID metrics: as model=sd3 (align/metrics/features.py)
    features: Dict[str, Any] = field(default_factory=lambda: {"kind": "clip", "model_name": "ViT-L-14",
                                                             "weights": None})

    def validate(self) -> None:
        check_reward_grad_batch_size(self.reward_grad_batch_size)
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError(f"model.max_sequence_length={self.max_sequence_length}: FLUX takes 1..512 T5 tokens")


@register_model("flux", config=FluxConfig)
class FluxModel(LatentImageModel):
    @classmethod
    def weight_needs(cls, model: dict) -> list[WeightNeed]:
        """The weights a run of ``model`` (its config section) loads: the checkpoint, and TAEF1 unless
        ``model.decoder=vae`` (align.setup.preflight lists the missing ones at once)."""
        decoder = str(model.get("decoder", "taef1"))
        checkpoint, taef1 = _checkpoint_specs(model["pretrained"], decoder == "vae")
        needs = [WeightNeed(checkpoint, model["pretrained"])]
        return needs + ([WeightNeed(taef1, model.get("taef1_path"))] if decoder == "taef1" else [])

    """FLUX.1 latents as the paper's flow: v_θ(x, t, c) = −u(pack(x), σ = 1 − t, c, guidance w), unpacked."""

    name = "flux"
    reward_domain = "sd3"           # scored by the image rewards (aesthetic, hpsv2, pickscore, ...)

    def __init__(self, cfg: FluxConfig | None = None, **overrides: Any):
        cfg = config_object(FluxConfig, cfg, overrides, owner="model=flux")
        decoder, resolution = cfg.decoder, cfg.resolution
        net_dtype = DTYPES[cfg.dtype]
        enable_tf32()
        feature_net = build_features(cfg.features).eval().requires_grad_(False)     # cheap checks first
        spec, taef1_spec = _checkpoint_specs(cfg.pretrained, decoder == "vae")
        root = resolve(spec, cfg.pretrained)
        taef1_root = resolve(taef1_spec, cfg.taef1_path) if decoder == "taef1" else None

        from diffusers import AutoencoderKL, AutoencoderTiny, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        sched_cfg = FlowMatchEulerDiscreteScheduler.load_config(root, subfolder="scheduler")
        check_flux_scheduler(sched_cfg)
        vae_cfg = AutoencoderKL.load_config(root, subfolder="vae")
        vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        if resolution % (vae_factor * PACK):
            raise ValueError(f"model.resolution={resolution} must be a multiple of {vae_factor * PACK} "
                             f"(VAE factor {vae_factor} × the 2×2 packing)")
        transformer = load_component("transformer", spec, lambda: FluxTransformer2DModel.from_pretrained(
            root, subfolder="transformer", **dtype_kwargs("diffusers", net_dtype)))
        if decoder == "vae":
            dec = load_component("VAE", spec, lambda: AutoencoderKL.from_pretrained(
                root, subfolder="vae", **dtype_kwargs("diffusers", torch.float32)))
        else:
            dec = load_component("TAEF1 decoder", taef1_spec, lambda: AutoencoderTiny.from_pretrained(
                taef1_root, **dtype_kwargs("diffusers", torch.float32)))
        clip_tok = load_component("tokenizer", spec, lambda: CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"))
        clip = load_component("text encoder (CLIP-L)", spec, lambda: CLIPTextModel.from_pretrained(
            root, subfolder="text_encoder", **dtype_kwargs("transformers", net_dtype)))
        t5_tok = load_component("T5 tokenizer", spec,
                                lambda: T5TokenizerFast.from_pretrained(root, subfolder="tokenizer_2"))
        t5 = load_component("T5 text encoder", spec, lambda: T5EncoderModel.from_pretrained(
            root, subfolder="text_encoder_2", **dtype_kwargs("transformers", net_dtype)))

        super().__init__(transformer, cfg.guidance_scale, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
        side = resolution // vae_factor
        self.data_shape = (int(transformer.config.in_channels) // (PACK * PACK), side, side)
        self.resolution, self.grid, self.pretrained_dir = resolution, cfg.grid, root
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        self.exact_timesteps = cfg.exact_timesteps
        self._sched_cfg = dict(sched_cfg)
        self.register_buffer("img_ids", image_position_ids(side, side), persistent=False)
        self.set_decoder(dec, decoder, cfg.decode_batch_size)
        self.forward_batch_size = cfg.forward_batch_size
        self.reward_grad_batch_size = cfg.reward_grad_batch_size
        self.context_dim = int(transformer.config.joint_attention_dim)
        self.value_net_kwargs = dict(cfg.value_net)
        if cfg.gradient_checkpointing:
            self.enable_gradient_checkpointing()
        self.feature_net = feature_net
        self._time_override: tuple[torch.Tensor, torch.Tensor | None] | None = None
        transformer.time_text_embed.register_forward_pre_hook(self._exact_time_hook)

        self.init_prompt_cache()
        text = FluxTextEncoders(clip_tok, clip.eval().requires_grad_(False), t5_tok, t5.eval().requires_grad_(False),
                                cfg.max_sequence_length)
        self._text: FluxTextEncoders | None = text.to(_encode_device(cfg.encode_device))
        self.keep_text_encoders = cfg.keep_text_encoders

    # -- the time grid
    @property
    def image_seq_len(self) -> int:
        return int(self.img_ids.shape[0])

    @property
    def grid_mu(self) -> float:
        """μ = calculate_shift(image tokens) with the scheduler config's constants, as FluxPipeline computes it."""
        c = self._sched_cfg
        return dynamic_shift_mu(self.image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    @property
    def grid_shift(self) -> float:
        """The flux grid's shift: exp(μ) under dynamic shifting, else the scheduler's static shift."""
        if self._sched_cfg.get("use_dynamic_shifting"):
            return math.exp(self.grid_mu)
        return float(self._sched_cfg.get("shift", 1.0))

    # -- prompts
    def prepare(self, prompts: list[str], grid: str, shift: float) -> None:
        """Refuse the SD3 grid (FLUX has its own), encode the run's prompt set and "" once, free the encoders."""
        if grid == "sd3":
            raise ValueError("model=flux samples on FluxPipeline's grid: set sampler.grid=flux (the checkpoint's "
                             "resolution-dependent shift; sampler.mu overrides μ) or sampler.grid=uniform")
        self.prepare_prompts(prompts)

    def _assemble(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        self.cache_prompts(prompts)
        tokens = torch.stack([self._cache[p][0] for p in prompts])
        pooled = torch.stack([self._cache[p][1] for p in prompts])
        return {"encoder_hidden_states": tokens.to(self.device), "pooled_projections": pooled.to(self.device)}

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self._assemble(list(prompts))

    def negative_cond(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The empty prompt "", repeated (unused by FLUX.1's guidance-distilled sampling; for callers that want a
        null prompt)."""
        one = self._assemble([""])
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in one.items()}

    # -- the network
    def _exact_time_hook(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        """Replace the transformer's dtype-rounded 1000σ (and 1000w) by the fp32 values of this call."""
        if self._time_override is None:
            return None
        tau, guidance = self._time_override
        return (tau, *args[1:]) if guidance is None else (tau, guidance, *args[2:])

    def _forward_u(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
                   guidance: float | None = None) -> torch.Tensor:
        """u(x, σ, c; w) on packed tokens, unpacked, in x's dtype. The transformer takes σ (×1000 inside)."""
        net_dtype = self.transformer.dtype
        b, _, h, w = x.shape
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(b)
        sigma = sigma.to(torch.promote_types(sigma.dtype, torch.float32))
        g = None
        if self.guidance_embeds:
            g = torch.full((b,), self.guidance_scale if guidance is None else float(guidance), device=x.device,
                           dtype=torch.float32)
        tokens = cond["encoder_hidden_states"].to(net_dtype)
        if self.exact_timesteps:
            self._time_override = (sigma_to_timestep(sigma.float()), None if g is None else 1000.0 * g)
            fed = sigma
        else:       # FluxPipeline's: the scheduler's 1000σ in the latents' dtype, divided by 1000
            fed = sigma_to_timestep(sigma.float()).to(net_dtype) / 1000
        try:
            out = self.transformer(hidden_states=pack_latents(x).to(net_dtype), encoder_hidden_states=tokens,
                                   pooled_projections=cond["pooled_projections"].to(net_dtype), timestep=fed,
                                   img_ids=self.img_ids.to(net_dtype),
                                   txt_ids=tokens.new_zeros(tokens.shape[1], 3), guidance=g, return_dict=False)[0]
        finally:
            self._time_override = None
        return unpack_latents(out, h, w).to(x.dtype)

    def guided_u(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
                 guidance_scale: float | None = None, detach_uncond: bool | None = None) -> torch.Tensor:
        """FLUX.1's guidance-distilled field: one call with the guidance embedding w (no unconditional branch, so
        nothing to detach); ``guidance_scale`` overrides ``model.guidance_scale``."""
        return self.transformer_u(x, sigma, cond, guidance=guidance_scale)

    # -- export
    def save_finetuned(self, directory: str) -> None:
        """``<dir>/pytorch_lora_weights.safetensors`` in diffusers' FLUX format with the LoRA config as adapter
        metadata, so that ``FluxPipeline.load_lora_weights(dir)`` restores the same scale α/r."""
        from diffusers.loaders import FluxLoraLoaderMixin

        os.makedirs(directory, exist_ok=True)
        FluxLoraLoaderMixin.save_lora_weights(directory, transformer_lora_layers=self.lora_state_dict(),
                                              weight_name=LORA_WEIGHT_NAME,
                                              transformer_lora_adapter_metadata=self.lora_adapter_metadata())
