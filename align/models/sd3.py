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

import gc
import glob
import os
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from align.models.flow_transformer import (LORA_TARGET_MODULES, LORA_WEIGHT_NAME, FlowTransformerModel,
                                           enable_gradient_checkpointing)
from align.models.value_unet import ValueUNet
from align.registry import register_model

DEFAULT_PRETRAINED = "stabilityai/stable-diffusion-3-medium-diffusers"
# SD3.5: the same diffusers layout and scheduler (shift 3); the transformer config adds dual attention / QK-norm
SD35_PRETRAINED = ("stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large")
DEFAULT_TAESD3 = "madebyollin/taesd3"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
WEIGHT_GLOBS = ("*.safetensors", "*.bin")


class SD3WeightsError(FileNotFoundError):
    """A missing or unreadable SD3 component; the message names it, where to get it and the config key."""


# ---- locating the checkpoint ---------------------------------------------------------------------------------
def _looks_local(spec: str) -> bool:
    """A filesystem path rather than a hub id ``owner/name``."""
    return (os.path.isabs(spec) or spec.startswith((".", "~")) or os.path.exists(spec)
            or spec.count("/") != 1 or os.sep == "\\" and "\\" in spec)


def _has_weights(folder: str) -> bool:
    return any(glob.glob(os.path.join(folder, g)) for g in WEIGHT_GLOBS)


def resolve_directory(spec: str, parts: dict[str, tuple[str, bool]], key: str, how_to_get: str) -> str:
    """The local directory of ``spec`` (a local path, or a hub id resolved from the HF cache/hub), with every
    subfolder of ``parts`` present: ``{subfolder: (config file, needs weights)}`` ("" = the root).

    Hub ids go through ``huggingface_hub.snapshot_download`` limited to the needed subfolders (with
    HF_HUB_OFFLINE=1 only the cache is used). Raises SD3WeightsError naming what is missing.
    """
    spec = os.path.expanduser(str(spec))
    if _looks_local(spec):
        if not os.path.isdir(spec):
            raise SD3WeightsError(f"{key}={spec}: no such directory. {how_to_get}")
        root = spec
    else:
        from huggingface_hub import snapshot_download

        patterns = ["model_index.json", "*.json"] + [f"{p}/*" if p else "*" for p in parts]
        try:
            root = snapshot_download(repo_id=spec, allow_patterns=patterns)
        except Exception as err:  # noqa: BLE001 - offline, gated, unknown repo: all the same to the user
            raise SD3WeightsError(f"{key}={spec}: could not get it from the Hugging Face hub or cache "
                                  f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
                                  f"{how_to_get}") from err
    missing = []
    for sub, (config, needs_weights) in parts.items():
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder):
            missing.append(f"{sub or '.'}/ (folder)")
            continue
        if config and not os.path.isfile(os.path.join(folder, config)):
            missing.append(f"{os.path.join(sub, config)}")
        if needs_weights and not _has_weights(folder):
            missing.append(f"{sub or '.'}/ weights (*.safetensors or *.bin)")
    if missing:
        raise SD3WeightsError(f"{key}={spec}: the checkpoint directory {root} lacks {', '.join(missing)}. "
                              f"{how_to_get}")
    return root


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


class SD3LoadError(RuntimeError):
    """A component that failed to load inside its library for a reason other than its files (typically a
    library version our call does not fit); the message names the component and the installed versions."""


# Errors that say our call and the installed library disagree (an unknown keyword, a missing attribute), not that
# a file is missing or corrupt: reported as such, never as missing weights.
LIBRARY_ERRORS = (TypeError, AttributeError, ImportError, NameError, NotImplementedError)
# ``from_pretrained``'s dtype keyword: ``dtype`` from diffusers 0.40 / transformers 4.56 on, ``torch_dtype``
# before (older diffusers ignore ``dtype`` and load fp32, twice the memory; older transformers raise).
DTYPE_KEYWORD_SINCE = {"diffusers": (0, 40), "transformers": (4, 56)}


def library_versions() -> str:
    import importlib

    out = []
    for name in ("torch", "diffusers", "transformers", "peft"):
        try:
            out.append(f"{name} {importlib.import_module(name).__version__}")
        except Exception:  # noqa: BLE001 - a version report must not fail
            out.append(f"{name} ?")
    return ", ".join(out)


def dtype_kwargs(library: str, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``{"dtype": dtype}`` or ``{"torch_dtype": dtype}``, whichever the installed ``library`` reads."""
    import importlib

    from packaging.version import Version

    release = Version(importlib.import_module(library).__version__).release
    return {"dtype" if release >= DTYPE_KEYWORD_SINCE[library] else "torch_dtype": dtype}


def _load(what: str, key: str, how_to_get: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except LIBRARY_ERRORS as err:
        raise SD3LoadError(f"{key}: loading the {what} failed inside its library, not for a missing or corrupt "
                           f"file ({type(err).__name__}: {err}). Installed: {library_versions()}; align needs the "
                           f"versions in its pyproject.toml (`pip install -e .` installs them)") from err
    except Exception as err:  # noqa: BLE001 - missing / corrupt / incompatible files: say which component
        raise SD3WeightsError(f"{key}: could not load the {what} ({type(err).__name__}: {err}). "
                              f"{how_to_get}") from err


def enable_tf32() -> bool:
    """TF32 matmuls on CUDA (the authors' setting; the fp32 parts: LoRA, decoder, value net, rewards); nothing
    on a machine without CUDA. Returns whether it was enabled."""
    if not torch.cuda.is_available():
        return False
    torch.set_float32_matmul_precision("high")      # = torch.backends.cuda.matmul.allow_tf32 = True, every torch
    torch.backends.cudnn.allow_tf32 = True           # convolutions (torch's default already)
    return True


# ---- prompt encoding, as StableDiffusion3Pipeline.encode_prompt ------------------------------------------------
class SD3TextEncoders:
    """CLIP-L + CLIP-G (+ T5) and their tokenizers; ``encode`` reproduces the diffusers pipeline's
    ``encode_prompt`` (clip_skip None: penultimate hidden states; pooled = the projected text embeddings;
    T5 at ``max_sequence_length`` tokens, or zeros of width ``joint_dim`` without T5).

    Returns per prompt the CLIP part unpadded [77, D_L + D_G], the pooled vector [D_L + D_G] and the T5 part
    [L_T5, joint_dim] (None for the zeros), so a cache stores no padding.
    """

    def __init__(self, tokenizers: Sequence[Any], encoders: Sequence[nn.Module], max_sequence_length: int):
        self.tokenizers, self.encoders = list(tokenizers), list(encoders)
        self.max_sequence_length = int(max_sequence_length)

    @property
    def has_t5(self) -> bool:
        return len(self.encoders) == 3

    def to(self, device: torch.device | str) -> "SD3TextEncoders":
        for e in self.encoders:
            e.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        enc1 = self.encoders[0]
        device = next(enc1.parameters()).device
        max_len = self.tokenizers[0].model_max_length       # the pipeline uses tokenizer 1's length for both
        hidden, pooled = [], []
        for tok, enc in zip(self.tokenizers[:2], self.encoders[:2]):
            ids = tok(prompts, padding="max_length", max_length=max_len, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids.to(device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2].to(enc1.dtype))
        t5 = None
        if self.has_t5:
            ids = self.tokenizers[2](prompts, padding="max_length", max_length=self.max_sequence_length,
                                     truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.encoders[2](ids.to(device))[0].to(self.encoders[2].dtype)
        return torch.cat(hidden, dim=-1), torch.cat(pooled, dim=-1), t5


# ---- features for the diversity / FID metrics ------------------------------------------------------------------
class PixelFeatures(nn.Module):
    """A weight-free fallback feature map: the image average-pooled to ``size``×``size`` (3·size² features)."""

    def __init__(self, size: int = 8):
        super().__init__()
        self.size = int(size)
        self.num_features = 3 * self.size ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float(), self.size).flatten(1)


INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS


class InceptionFeatures(nn.Module):
    """The 2048-d pool features of the FID Inception-v3 (torchmetrics' ``NoTrainInceptionV3``, via the optional
    package torch-fidelity), from a local weights file; images in [0, 1] are quantised to uint8 as FID does."""

    num_features = 2048

    def __init__(self, weights: str | None = None):
        super().__init__()
        weights = weights or os.environ.get("ALIGN_INCEPTION_WEIGHTS")
        if not weights or not os.path.isfile(os.path.expanduser(weights)):
            raise FileNotFoundError(
                f"model.features.kind=inception needs the FID Inception weights {INCEPTION_WEIGHTS} (from "
                f"{INCEPTION_URL}); point model.features.weights or $ALIGN_INCEPTION_WEIGHTS at it"
                + (f" (not found: {weights})" if weights else ""))
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=os.path.expanduser(weights))
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError("model.features.kind=inception needs the optional package torch-fidelity "
                                      "(pip install torch-fidelity); or use model.features.kind=clip") from err

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.clamp(0, 1) * 255).round().to(torch.uint8)).reshape(images.shape[0], -1).float()


# DreamSim (Fu et al. 2023), the paper's diversity features, re-implemented on timm from DreamSim's published
# checkpoint files (the `dreamsim` package's cache directory, i.e. its release zip extracted), no download.
DREAMSIM_URL = "https://github.com/ssundaram21/dreamsim/releases/download/v0.2.0-checkpoints/dreamsim_{}_checkpoint.zip"
# dreamsim_type → branches (DreamSim's model_config) and its LoRA directory
DREAMSIM_TYPES = {"ensemble": (("dino_vitb16", "clip_vitb16", "open_clip_vitb16"), "ensemble_lora"),
                  "dino_vitb16": (("dino_vitb16",), "dino_vitb16_single_lora"),
                  "clip_vitb32": (("clip_vitb32",), "clip_vitb32_single_lora"),
                  "open_clip_vitb32": (("open_clip_vitb32",), "open_clip_vitb32_single_lora")}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _dreamsim_branch_file(branch: str) -> str:
    if branch == "dino_vitb16":     # the backbone torch.hub's facebookresearch/dino caches under the same dir
        return os.path.join("checkpoints", "dino_vitbase16_pretrain.pth")
    return f"{branch}_pretrain.pth.tar"    # {"state_dict": DINO-layout ViT + "proj"} (DreamSim's conversion)


class DreamSimFeatures(nn.Module):
    """DreamSim embeddings [B, D]: per branch a ViT (timm) with DreamSim's LoRA merged — DINO ViT-B/16's CLS token
    after the last block (before the final norm), CLIP / OpenCLIP ViT-B's image embedding (final norm, CLS,
    ``@ proj``) — concatenated, then centred and L2-normalised as DreamSim's ``normalize_embeds`` does, so
    1 − cos of two embeddings is the DreamSim distance. Images in [0, 1] are resized to 224² (bicubic,
    antialiased; DreamSim resizes PIL images) and normalised per branch (ImageNet for DINO, OpenAI CLIP else).
    ``weights``: DreamSim's cache directory (its release zip for ``dreamsim_type`` extracted there)."""

    def __init__(self, weights: str | None = None, dreamsim_type: str = "ensemble", image_size: int = 224):
        super().__init__()
        from functools import partial

        from timm.layers import QuickGELU
        from timm.models.vision_transformer import VisionTransformer

        if dreamsim_type not in DREAMSIM_TYPES:
            raise ValueError(f"model.features.dreamsim_type={dreamsim_type!r}: valid choices are "
                             f"{', '.join(DREAMSIM_TYPES)}")
        branches, lora_dir = DREAMSIM_TYPES[dreamsim_type]
        weights = weights or os.environ.get("ALIGN_DREAMSIM_DIR")
        root = os.path.expanduser(weights) if weights else None
        need = [_dreamsim_branch_file(b) for b in branches] + [os.path.join(lora_dir, "adapter_config.json")]
        missing = need if root is None else [f for f in need if not os.path.isfile(os.path.join(root, f))]
        if not (root and os.path.isdir(root)) or missing:
            dino = ("; the DINO backbone checkpoints/dino_vitbase16_pretrain.pth is facebookresearch/dino's "
                    "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
                    if "dino_vitb16" in branches else "")
            raise FileNotFoundError(
                f"model.features.kind=dreamsim (dreamsim_type={dreamsim_type}) needs DreamSim's checkpoint "
                f"directory with {', '.join(missing)}" + (f" (looked in {root})" if root else "")
                + f": extract {DREAMSIM_URL.format(dreamsim_type)} there{dino}; then set "
                  "model.features.weights=<dir> or $ALIGN_DREAMSIM_DIR")
        self.branches, self.image_size = branches, int(image_size)
        self.nets, projs = nn.ModuleList(), []
        for b in branches:
            sd = torch.load(os.path.join(root, _dreamsim_branch_file(b)), map_location="cpu", weights_only=True)
            sd = dict(sd.get("state_dict", sd)) if isinstance(sd, dict) else sd
            projs.append(sd.pop("proj", None))
            if "pos_drop.weight" in sd:          # DreamSim's CLIP conversion: ln_pre stored as pos_drop
                sd["norm_pre.weight"], sd["norm_pre.bias"] = sd.pop("pos_drop.weight"), sd.pop("pos_drop.bias")
            dim, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
            grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
            depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
            dino = b.startswith("dino")
            net = VisionTransformer(img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth,
                                    num_heads=dim // 64, mlp_ratio=4.0, qkv_bias=True, num_classes=0,
                                    global_pool="token", norm_layer=partial(nn.LayerNorm, eps=1e-6 if dino else 1e-5),
                                    act_layer=QuickGELU if b.startswith("clip") else nn.GELU)
            if not dino:   # CLIP's ln_pre (timm's pre_norm=True would drop the patch-embedding bias DreamSim keeps)
                net.norm_pre = nn.LayerNorm(dim, eps=1e-5)
            net.load_state_dict(sd, strict=True)
            self.nets.append(net)
        self._merge_lora(os.path.join(root, lora_dir))
        for i, p in enumerate(projs):
            self.register_buffer(f"proj{i}", torch.empty(0) if p is None else p.float())
        self.eval().requires_grad_(False)
        with torch.no_grad():
            self.num_features = int(self(torch.zeros(1, 3, self.image_size, self.image_size)).shape[1])

    def _merge_lora(self, directory: str) -> None:
        """W ← W + (lora_alpha / r)·B·A for each LoRA pair of DreamSim's peft adapter (keys
        ``base_model.model.extractor_list.<i>.model.<module>.lora_A.weight``); other saved tensors (bias
        training) are copied."""
        import json

        with open(os.path.join(directory, "adapter_config.json")) as fh:
            conf = json.load(fh)
        scale = float(conf["lora_alpha"]) / float(conf["r"])
        if conf.get("use_rslora"):
            scale = float(conf["lora_alpha"]) / float(conf["r"]) ** 0.5
        path = os.path.join(directory, "adapter_model.safetensors")
        if os.path.isfile(path):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(os.path.join(directory, "adapter_model.bin"), map_location="cpu", weights_only=True)

        def target(key: str) -> tuple[nn.Module, str]:
            rest = key.split("extractor_list.", 1)[1]
            i, rest = rest.split(".", 1)
            rest = rest.removeprefix("model.").replace("pos_drop.", "norm_pre.")
            module = self.nets[int(i)]
            *parents, leaf = rest.split(".")
            for p in parents:
                module = getattr(module, p)
            return module, leaf

        for key, a in state.items():
            if ".lora_A." in key:
                base = key.split(".lora_A.")[0]
                b = state[key.replace(".lora_A.", ".lora_B.")]
                mod, leaf = target(base + ".weight")
                w = getattr(mod, leaf)
                # Linear: B [out, r] · A [r, in]; Conv2d: B [out, r, 1, 1] · A [r, in, k, k] flattened
                w.data += scale * (b.double().flatten(1) @ a.double().flatten(1)).to(w.dtype).reshape(w.shape)
            elif ".lora_B." not in key:
                mod, leaf = target(key)
                getattr(mod, leaf).data.copy_(state[key])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
        feats = []
        for i, (b, net) in enumerate(zip(self.branches, self.nets)):
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if b.startswith("dino") else (OPENAI_MEAN, OPENAI_STD)
            xi = (x - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)
            if b.startswith("dino"):             # DreamSim's 'cls': block 11's output token 0, no final norm
                h = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(xi))))
                feats.append(net.blocks(h)[:, 0])
            else:                                # 'embedding': ln_post(CLS) @ proj
                feats.append(net(xi) @ getattr(self, f"proj{i}"))
        e = torch.cat(feats, dim=-1)
        e = e - e.mean(dim=1, keepdim=True)
        return e / e.norm(dim=1, keepdim=True)


def build_features(spec: dict[str, Any] | None) -> nn.Module:
    """``model.features``: ``{kind: clip, model_name, weights, quick_gelu}`` (CLIP image embeddings, the
    paper's; weights: the key, else $ALIGN_CLIP_FEATURES_WEIGHTS, else the HF cache), ``{kind: inception,
    weights}`` (FID's Inception-v3; needs torch-fidelity), ``{kind: dreamsim, weights: <DreamSim's checkpoint dir>,
    dreamsim_type: ensemble}`` (the paper's diversity features, ``DreamSimFeatures``) or ``{kind: pixels}``."""
    spec = dict(spec or {})
    kind = spec.pop("kind", "clip")
    if kind == "pixels":
        return PixelFeatures(size=spec.get("size", 8))
    if kind == "inception":
        return InceptionFeatures(spec.get("weights"))
    if kind == "dreamsim":
        return DreamSimFeatures(spec.get("weights"), spec.get("dreamsim_type", "ensemble"))
    if kind != "clip":
        raise ValueError(f"model.features.kind={kind!r}: valid choices are clip, dreamsim, inception, pixels")
    try:
        from rewards.clip_common import shared_clip_image_features
    except ImportError as err:
        raise ImportError("model.features.kind=clip needs rewards/clip_common.py (ClipImageFeatures); "
                          "use model.features.kind=pixels without it") from err
    spec.setdefault("model_name", "ViT-L-14")
    spec.setdefault("config_key", "model.features.weights")
    return shared_clip_image_features(**spec)     # the aesthetic reward's tower when it is the same file


# ---- the backend ------------------------------------------------------------------------------------------------
@register_model("sd3")
class SD3Model(FlowTransformerModel):
    """SD3 latents as the paper's flow: v_θ(x, t, c) = −[u_uncond + w (u_cond − u_uncond)] at σ = 1 − t."""

    name = "sd3"

    def __init__(self, pretrained: str = DEFAULT_PRETRAINED, dtype: str = "bfloat16", t5: bool = True,
                 max_sequence_length: int = 256, resolution: int = 1024, decoder: str = "taesd3",
                 taesd3_path: str = DEFAULT_TAESD3, gradient_checkpointing: bool = False,
                 guidance_scale: float = 5.0, lora_rank: int = 8, lora_alpha: float = 8.0,
                 lora_target_modules: Sequence[str] = LORA_TARGET_MODULES, grid: str = "sd3",
                 value_net: dict[str, Any] | None = None, features: dict[str, Any] | None = None,
                 prompts: str | None = None, keep_text_encoders: bool = False, encode_device: str = "auto",
                 decode_batch_size: int = 8, forward_batch_size: int | None = None,
                 sampler_shift: float | None = None, **_: Any):
        if dtype not in DTYPES:
            raise ValueError(f"model.dtype={dtype!r}: valid choices are {', '.join(DTYPES)}")
        if decoder not in ("vae", "taesd3"):
            raise ValueError(f"model.decoder={decoder!r}: valid choices are vae, taesd3")
        net_dtype = DTYPES[dtype]
        enable_tf32()
        # cheap checks first: the prompt set and the feature extractor's weights, before gigabytes load
        from align.prompts import load_prompts

        prompt_set = load_prompts(prompts, self)
        feature_net = build_features(features).eval().requires_grad_(False)
        repo = pretrained if not _looks_local(os.path.expanduser(str(pretrained))) else DEFAULT_PRETRAINED
        how = (f"Get it with `huggingface-cli download {repo}` (accept the model's license on the hub first; "
               f"SD3.5: {' or '.join(SD35_PRETRAINED)}) and set model.pretrained=<local directory or hub id>")
        if t5:
            how += "; or set model.t5=false to run without the T5 encoder (zero T5 embeddings)"
        parts = {"scheduler": ("scheduler_config.json", False), "transformer": ("config.json", True),
                 "vae": ("config.json", decoder == "vae"), "text_encoder": ("config.json", True),
                 "text_encoder_2": ("config.json", True), "tokenizer": ("", False), "tokenizer_2": ("", False)}
        if t5:
            parts.update({"text_encoder_3": ("config.json", True), "tokenizer_3": ("", False)})
        root = resolve_directory(pretrained, parts, "model.pretrained", how)
        taesd_root = None
        how_taesd = (f"Get TAESD3 with `huggingface-cli download {DEFAULT_TAESD3}` and set model.taesd3_path=<dir>, "
                     "or use model.decoder=vae (the full SD3 VAE; more memory under reward gradients)")
        if decoder == "taesd3":
            taesd_root = resolve_directory(taesd3_path, {"": ("config.json", True)}, "model.taesd3_path", how_taesd)

        from diffusers import (AutoencoderKL, AutoencoderTiny, FlowMatchEulerDiscreteScheduler,
                               SD3Transformer2DModel)
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        key = "model.pretrained"
        transformer = _load("transformer", key, how, lambda: SD3Transformer2DModel.from_pretrained(
            root, subfolder="transformer", **dtype_kwargs("diffusers", net_dtype)))
        sched_cfg = FlowMatchEulerDiscreteScheduler.load_config(root, subfolder="scheduler")
        check_scheduler(sched_cfg, sampler_shift)
        vae_cfg = AutoencoderKL.load_config(root, subfolder="vae")
        if decoder == "vae":
            dec = _load("VAE", key, how, lambda: AutoencoderKL.from_pretrained(
                root, subfolder="vae", **dtype_kwargs("diffusers", torch.float32)))
        else:
            dec = _load("TAESD3 decoder", "model.taesd3_path", how_taesd,
                        lambda: AutoencoderTiny.from_pretrained(
                            taesd_root, **dtype_kwargs("diffusers", torch.float32)))
        toks = [_load(f"tokenizer {s}", key, how, lambda s=s: CLIPTokenizer.from_pretrained(root, subfolder=s))
                for s in ("tokenizer", "tokenizer_2")]
        encs = [_load(f"text encoder {s}", key, how, lambda s=s: CLIPTextModelWithProjection.from_pretrained(
            root, subfolder=s, **dtype_kwargs("transformers", net_dtype)))
            for s in ("text_encoder", "text_encoder_2")]
        if t5:
            from transformers import T5EncoderModel, T5TokenizerFast

            toks.append(_load("T5 tokenizer", key, how,
                              lambda: T5TokenizerFast.from_pretrained(root, subfolder="tokenizer_3")))
            encs.append(_load("T5 text encoder", key, how, lambda: T5EncoderModel.from_pretrained(
                root, subfolder="text_encoder_3", **dtype_kwargs("transformers", net_dtype))))

        # latent geometry
        vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        patch = int(transformer.config.patch_size)
        if resolution % (vae_factor * patch):
            raise ValueError(f"model.resolution={resolution} must be a multiple of {vae_factor * patch} "
                             f"(VAE factor {vae_factor} × patch size {patch})")
        side = resolution // vae_factor
        max_side = int(transformer.config.pos_embed_max_size or side // patch) * patch
        if side > max_side:
            raise ValueError(f"model.resolution={resolution}: latents of {side}² exceed the transformer's "
                             f"position embedding ({max_side}²); use at most {max_side * vae_factor}")

        super().__init__(transformer, guidance_scale, lora_rank, lora_alpha, lora_target_modules)
        self.data_shape = (int(transformer.config.in_channels), side, side)
        self.resolution, self.grid, self.pretrained_dir = int(resolution), grid, root
        self.scheduler_shift = float(sched_cfg.get("shift", 1.0))
        # the decoder's own latent factors, as the diffusers pipeline uses its vae's (TAESD3: 1 and 0)
        self.scaling_factor = float(getattr(dec.config, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(dec.config, "shift_factor", None) or 0.0)
        self.decoder_kind = decoder
        self.decoder = dec.eval().requires_grad_(False)
        self.decode_batch_size = int(decode_batch_size)
        self.forward_batch_size = forward_batch_size
        self.joint_dim = int(transformer.config.joint_attention_dim)
        self.value_net_kwargs = dict(value_net or {})
        if gradient_checkpointing:
            enable_gradient_checkpointing(transformer)     # recomputes with the forward's LoRA on/off state
            if hasattr(self.decoder, "enable_gradient_checkpointing"):
                self.decoder.enable_gradient_checkpointing()
        self.feature_net = feature_net

        # prompt embeddings: the run's prompt set + the empty negative prompt, then the encoders go
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._t5_len = int(max_sequence_length)
        dev = encode_device
        if dev == "auto":       # this process's GPU (accelerate / torchrun set LOCAL_RANK)
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        text = SD3TextEncoders(toks, [e.eval().requires_grad_(False) for e in encs], max_sequence_length)
        self._text: SD3TextEncoders | None = text.to(dev)
        self.prompt_set = prompt_set
        self.cache_prompts(["", *self.prompt_set])
        if keep_text_encoders:
            self._text.to("cpu")
        else:
            self.free_text_encoders()

    # -- prompts
    def default_prompts(self) -> list[str]:
        """The aesthetic task's prompt set: our list of common animals (``prompts=animals``)."""
        from align.prompt_sets import load_named_set

        return load_named_set("animals")

    def free_text_encoders(self) -> None:
        """Drop the text encoders (the cached prompt embeddings stay)."""
        self._text = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def cache_prompts(self, prompts: Sequence[str], batch_size: int = 16) -> None:
        """Encode the prompts not yet cached (CPU cache: CLIP part, pooled, T5 part or None)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if not todo:
            return
        if self._text is None:
            raise KeyError(f"sd3: no cached embedding for the prompt(s) {todo[:3]} and the text encoders were freed "
                           "after encoding the run's prompt set; set model.keep_text_encoders=true to encode new "
                           "prompts on the fly")
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            clip, pooled, t5 = self._text.encode(chunk)
            for j, p in enumerate(chunk):
                self._cache[p] = (clip[j].cpu(), pooled[j].cpu(), None if t5 is None else t5[j].cpu())

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

    # -- the network, chunked when no graph is kept (evaluation batches)
    def transformer_u(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        n = self.forward_batch_size
        if not n or torch.is_grad_enabled() or x.shape[0] <= n:
            return super().transformer_u(x, sigma, cond)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        return torch.cat([super(SD3Model, self).transformer_u(x[i:i + n], sigma[i:i + n],
                                                              {k: v[i:i + n] for k, v in cond.items()})
                          for i in range(0, x.shape[0], n)])

    # -- images
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] [B, 3, res, res], fp32, differentiable: decoder(x / scaling + shift) ∈ [−1, 1] → [0, 1],
        with the decoder's own ``scaling_factor``/``shift_factor`` (SD3 VAE: 1.5305 / 0.0609; TAESD3: 1 / 0, it
        decodes the diffusion latents themselves), as ``StableDiffusion3Pipeline`` does with the vae it holds."""
        z = x.float() / self.scaling_factor + self.shift_factor
        n = max(1, self.decode_batch_size)
        out = [self.decoder.decode(z[i:i + n]).sample for i in range(0, z.shape[0], n)]
        return (torch.cat(out).float() * 0.5 + 0.5).clamp(0.0, 1.0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``model.features`` of the decoded images [B, F] (CLIP image embeddings by default)."""
        n = max(1, self.decode_batch_size)
        return torch.cat([self.feature_net(self.decode(x[i:i + n])).float() for i in range(0, x.shape[0], n)])

    def preview_grid(self, x: torch.Tensor, n: int = 16, size: int = 256) -> torch.Tensor:
        """[3, H, W] grid of up to n decoded samples, each resized to ``size``² for TensorBoard / PNGs."""
        from torchvision.utils import make_grid

        with torch.no_grad():
            img = self.decode(x[:n].detach()).cpu()
        if img.shape[-1] != size:
            img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return make_grid(img.clamp(0, 1), nrow=4, padding=2, pad_value=0.5)

    # -- VGG-Flow's value network
    def make_value_network(self) -> nn.Module:
        kw = {"sample_size": self.data_shape[-1], **self.value_net_kwargs}
        return ValueUNet(channels=self.data_shape[0], cross_attention_dim=self.joint_dim, **kw)

    # -- export
    def save_finetuned(self, directory: str) -> None:
        """``<dir>/pytorch_lora_weights.safetensors`` in diffusers' SD3 format, with the LoRA config (rank, alpha,
        targets) as adapter metadata so that ``StableDiffusion3Pipeline.load_lora_weights(dir)`` restores the
        same scale α/r."""
        from diffusers.loaders import SD3LoraLoaderMixin

        os.makedirs(directory, exist_ok=True)
        # only what LoraConfig needs to rebuild the same scale α/r on the same modules: keys every peft version
        # knows (a full to_dict() carries fields older peft's LoraConfig rejects)
        cfg = self.transformer.peft_config["default"]
        targets = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
        meta = {"r": int(cfg.r), "lora_alpha": float(cfg.lora_alpha), "target_modules": targets}
        SD3LoraLoaderMixin.save_lora_weights(directory, transformer_lora_layers=self.lora_state_dict(),
                                             weight_name=LORA_WEIGHT_NAME, transformer_lora_adapter_metadata=meta)
