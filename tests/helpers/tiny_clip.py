"""Tiny random stand-ins for the real CLIP reward weights, written to disk in the real formats.

* open_clip models: ``write_tiny_open_clip`` (config JSON + state dict), loaded by name or config path.
* LAION aesthetic head: a state dict with keys layers.{0,2,4,6,7}, small hidden sizes.
* PickScore: a tiny transformers ``CLIPModel`` saved with ``save_pretrained`` and a ``CLIPTokenizer``
  built from open_clip's bundled CLIP BPE file (the same vocabulary as the real tokenizer), also saved
  with ``save_pretrained`` — so the reward loads them exactly like the real hub directories.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import torch

from align.metrics.clip import quiet_random_init_warning


def clip_vocab_and_merges(n_merges: int = 49152 - 256 - 2) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and its merges as open_clip's SimpleTokenizer builds them from its bundled file
    (all 48894 merges: the 49408-token vocabulary; fewer: a consistent prefix of it)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:1 + n_merges]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def write_aesthetic_head(path: str | os.PathLike, dims=(16, 24, 12, 8, 4, 1), seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (a, b) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        sd[f"layers.{key}.weight"] = torch.randn(b, a, generator=g) / a ** 0.5
        sd[f"layers.{key}.bias"] = torch.randn(b, generator=g) * 0.1
    torch.save(sd, path)
    return str(path)


def write_tiny_hf_clip(directory: str | os.PathLike, seed: int = 0, logit_scale: float = 2.5) -> str:
    """A tiny random transformers CLIPModel (ViT patch 32 on 224, width 32, 2 layers) + CLIPTokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    directory = Path(directory)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32, hidden_act="gelu"),
        projection_dim=16, logit_scale_init_value=logit_scale)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    model.save_pretrained(directory)
    vocab, merges = clip_vocab_and_merges()
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(directory)
    return str(directory)


def tiny_open_clip_config(embed_dim: int = 16, width: int = 32, layers: int = 2, patch_size: int = 32,
                          image_size: int = 224, context_length: int = 77) -> dict[str, Any]:
    """An open_clip model config small enough to run forward + backward in milliseconds on a CPU.

    Real BPE vocabulary (49408) so open_clip's tokenizer works unchanged; 7×7 patches of 32 px.
    """
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "head_width": 16,
                       "patch_size": patch_size},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width, "heads": 2,
                     "layers": layers},
    }


def write_tiny_open_clip(directory: str | os.PathLike, name: str = "tiny-clip", seed: int = 0,
                         quick_gelu: bool = False, wrap_state_dict: bool = False,
                         **cfg: Any) -> tuple[str, str]:
    """Write a tiny random open_clip model: ``<directory>/<name>.json`` (the config) and
    ``<directory>/<name>.pt`` (its weights; ``{"state_dict": ...}`` when ``wrap_state_dict``, like the
    HPS checkpoints). Returns (config path, weights path) — pass them as ``model_name`` / ``weights``.
    Use a distinct ``name`` per distinct config: open_clip registers configs by file stem."""
    import open_clip

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg_path, w_path = directory / f"{name}.json", directory / f"{name}.pt"
    cfg_path.write_text(json.dumps(tiny_open_clip_config(**cfg)))
    open_clip.add_model_config(cfg_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with quiet_random_init_warning():
            model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    sd = model.state_dict()
    torch.save({"state_dict": sd} if wrap_state_dict else sd, w_path)
    return str(cfg_path), str(w_path)
