"""Random-weight stand-ins for ``python -m align.bench --random-weights``: the real model code, no weights download.

``write_checkpoint`` writes a directory with the diffusers layout's configs only (scheduler, transformer, vae) from
the published configs shipped in align/bench/configs/ (see its README.md), shrunk with ``tiny``, plus the reward's
random weight files (aesthetic: open_clip's ViT-L/14 architecture and the MLP head; hpsv2: ViT-H-14). ``random_components`` then
lets ``align.models.sd3`` / ``align.models.flux`` load from it: every diffusers ``from_pretrained`` builds the
module from its config with random weights, the weight lookup returns the given directory, and the text encoders
are replaced by random prompt embeddings of the real shapes (the text encoders run once before training and are
freed, so they take no training memory). Everything else (LoRA, decoders, rewards, algorithms) is the code a run
uses.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator
from unittest import mock

import torch
from torch import nn

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
MODELS = {   # --model → (backend, transformer config, vae config, tiny decoder config, scheduler config)
    "sd3": ("sd3", "sd3_medium_transformer", "sd3_vae", "taesd3", "sd3_scheduler"),
    "sd35": ("sd3", "sd35_medium_transformer", "sd3_vae", "taesd3", "sd3_scheduler"),
    "flux": ("flux", "flux_dev_transformer", "flux_vae", "taef1", "flux_scheduler"),
}
TINY_RESOLUTION = 32
# --tiny: the same architectures with few layers and narrow widths (a CPU runs an update in well under a second)
TINY = {
    "SD3Transformer2DModel": dict(sample_size=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                  joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                                  pos_embed_max_size=8),
    "FluxTransformer2DModel": dict(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                   joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[2, 2, 4]),
    "AutoencoderKL": dict(block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4,
                          sample_size=TINY_RESOLUTION),
    "AutoencoderTiny": dict(encoder_block_out_channels=[8] * 4, decoder_block_out_channels=[8] * 4,
                            num_encoder_blocks=[1, 1, 1, 1], num_decoder_blocks=[1, 1, 1, 1]),
}
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}


def load_config(name: str, tiny: bool) -> dict[str, Any]:
    """A shipped published config, shrunk with ``tiny``."""
    with open(os.path.join(CONFIG_DIR, f"{name}.json")) as f:
        cfg = json.load(f)
    if tiny:
        cfg.update(TINY.get(cfg["_class_name"], {}))
        if "dual_attention_layers" in cfg:
            cfg["dual_attention_layers"] = [0]
    return cfg


def _write_json(path: str, cfg: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)


def write_checkpoint(model: str, tiny: bool, directory: str, reward: str = "aesthetic") -> list[str]:
    """Config-only checkpoint and decoder directories, and the random reward weights, under ``directory``;
    returns the Hydra overrides that point a run at them (model, decoder, reward and the pixel metric features,
    which need no weights)."""
    backend, transformer, vae, tiny_decoder, scheduler = MODELS[model]
    ckpt, tae = os.path.join(directory, "checkpoint"), os.path.join(directory, tiny_decoder)
    _write_json(os.path.join(ckpt, "transformer", "config.json"), load_config(transformer, tiny))
    _write_json(os.path.join(ckpt, "vae", "config.json"), load_config(vae, tiny))
    _write_json(os.path.join(ckpt, "scheduler", "scheduler_config.json"), load_config(scheduler, False))
    _write_json(os.path.join(tae, "config.json"), load_config(tiny_decoder, tiny))
    decoder_key = "taesd3_path" if backend == "sd3" else "taef1_path"
    overrides = [f"model.pretrained={ckpt}", f"model.{decoder_key}={tae}",
                 "model.features.kind=pixels", *REWARDS[reward](tiny, directory)]
    if tiny:
        overrides += [f"model.resolution={TINY_RESOLUTION}", "model.max_sequence_length=8"]
    return overrides


def write_open_clip(name: str, tiny: bool, directory: str, quick_gelu: bool) -> tuple[str, str]:
    """Random weights of open_clip's architecture ``name`` (``tiny``: a one-layer CLIP whose config JSON is written
    beside them) saved to ``directory``; returns (the architecture as the reward's ``clip_model``, the file)."""
    import open_clip

    if tiny:
        config = os.path.join(directory, "tiny-clip.json")
        _write_json(config, {**TINY_CLIP, "quick_gelu": quick_gelu})
        open_clip.add_model_config(config)
        name, arch = config, "tiny-clip"
    else:
        arch = name
    torch.manual_seed(0)
    path = os.path.join(directory, f"{arch}.pt")
    torch.save(open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu).state_dict(), path)
    return name, path


def write_aesthetic(tiny: bool, directory: str) -> list[str]:
    """Random weights for ``reward=aesthetic``: open_clip's ViT-L/14 and the MLP head."""
    from rewards.aesthetic import AestheticHead

    name, clip_path = write_open_clip("ViT-L-14", tiny, directory, quick_gelu=True)
    head_path = os.path.join(directory, "head.pt")
    width = TINY_CLIP["embed_dim"] if tiny else 768
    torch.save(AestheticHead((width, 1024, 128, 64, 16, 1)).state_dict(), head_path)
    return ["reward=aesthetic", f"reward.clip_model={name}", f"reward.clip_weights={clip_path}",
            f"reward.head_weights={head_path}"]


def write_hpsv2(tiny: bool, directory: str) -> list[str]:
    """Random weights for ``reward=hpsv2``: open_clip's ViT-H-14 (image and text towers)."""
    name, path = write_open_clip("ViT-H-14", tiny, directory, quick_gelu=False)
    return ["reward=hpsv2", f"reward.clip_model={name}", f"reward.weights={path}"]


REWARDS = {"aesthetic": write_aesthetic, "hpsv2": write_hpsv2}   # --reward → its random weight files


class RandomPromptEmbeddings:
    """Stands in for the text encoders: ``encode(prompts)`` gives random embeddings of the real shapes (SD3: CLIP
    hidden states [77, pooled width], pooled, T5 [max_len, joint width]; FLUX: T5 [max_len, joint], pooled)."""

    def __init__(self, shapes: list[tuple[int, ...] | None], seed: int = 0):
        self.shapes, self.generator = shapes, torch.Generator().manual_seed(seed)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor | None, ...]:
        return tuple(None if s is None else torch.randn(len(prompts), *s, generator=self.generator)
                     for s in self.shapes)

    def to(self, *_: Any) -> "RandomPromptEmbeddings":
        return self


def _from_config(cls: type, root: str, subfolder: str | None = None, dtype: torch.dtype | None = None,
                 torch_dtype: torch.dtype | None = None, **_: Any) -> nn.Module:
    """``from_pretrained``'s stand-in: the module built from its config, random weights, in the asked dtype."""
    module = cls.from_config(cls.load_config(root, subfolder=subfolder))
    return module.to(dtype or torch_dtype or torch.float32)


@contextlib.contextmanager
def random_components() -> Iterator[None]:
    """While active, the sd3 and flux backends build their components with random weights from config-only
    directories (see the module docstring)."""
    from diffusers import AutoencoderKL, AutoencoderTiny, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from align.models import flux, sd3

    def sd3_text(tokenizers: Any, encoders: Any, max_len: int) -> RandomPromptEmbeddings:
        return RandomPromptEmbeddings([(77, _SHAPES["pooled"]), (_SHAPES["pooled"],), (max_len, _SHAPES["joint"])])

    def flux_text(*args: Any) -> RandomPromptEmbeddings:
        return RandomPromptEmbeddings([(args[-1], _SHAPES["joint"]), (_SHAPES["pooled"],)])

    def transformer_from_config(cls: type, root: str, **kw: Any) -> nn.Module:
        module = _from_config(cls, root, **kw)
        _SHAPES.update(pooled=int(module.config.pooled_projection_dim), joint=int(module.config.joint_attention_dim))
        return module

    with contextlib.ExitStack() as stack:
        for cls in (AutoencoderKL, AutoencoderTiny):
            stack.enter_context(mock.patch.object(cls, "from_pretrained", classmethod(_from_config)))
        for cls in (SD3Transformer2DModel, FluxTransformer2DModel):
            stack.enter_context(mock.patch.object(cls, "from_pretrained", classmethod(transformer_from_config)))
        for cls in (CLIPTokenizer, T5TokenizerFast, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel):
            stack.enter_context(mock.patch.object(cls, "from_pretrained", classmethod(lambda *a, **k: nn.Module())))
        for module in (sd3, flux):
            stack.enter_context(mock.patch.object(module, "resolve", lambda spec, value=None, **k: value))
        stack.enter_context(mock.patch.object(sd3, "SD3TextEncoders", sd3_text))
        stack.enter_context(mock.patch.object(flux, "FluxTextEncoders", flux_text))
        yield


_SHAPES: dict[str, int] = {}   # the widths of the transformer being built (its prompt embeddings' shapes)
