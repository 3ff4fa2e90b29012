"""CLIP for the SD3 rewards (aesthetic, hpsv2, pickscore) and the SD3 metrics' image features.

* ``clip_preprocess``: the official CLIP image pipeline as differentiable tensor ops. For images
  x ∈ [0, 1]^{B×3×H×W}:
      resize the shorter side to 224 (bicubic, antialiased, a = −0.5 like PIL; the longer side to
      ⌊224·long/short⌋ as torchvision/transformers do) as PIL does it: a horizontal then a vertical
      1-D pass, each clamped to [0, 1] (PIL's uint8 buffers clip the bicubic overshoot),
      center-crop 224×224 (top = round((h' − 224)/2)), then (x − mean)/std with the OpenAI CLIP
      mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954, 0.26130258, 0.27577711).
* ``create_open_clip``: an open_clip model from a built-in architecture name ("ViT-L-14") or a path
  to an open_clip model-config JSON (tiny test models), then the weights file loaded strictly.
* ``ClipImageFeatures`` / ``shared_clip_image_features``: frozen open_clip image tower → L2-normalised
  embeddings [B, D], one instance per weights file in the process (the aesthetic reward's ViT-L/14 and the
  metrics' features share it).
* ``TextFeatureCache``: prompt → text features, encoded once.

Weight files are found by ``align.core.weights``. Heavy imports (open_clip) are local so that importing this module
is cheap (the reward registry imports every module of ``rewards/``).
"""
from __future__ import annotations

import inspect
import logging
import os
import warnings
import weakref
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from align.core.loading import DTYPES
from align.core.weights import WeightSpec, resolve

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---- preprocessing -----------------------------------------------------------------------------------------
def resized_size(h: int, w: int, size: int = 224) -> tuple[int, int]:
    """Shorter side → ``size``, longer side → int(size·long/short) (torchvision / transformers rule)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def _clamp(x: torch.Tensor, on: bool) -> torch.Tensor:
    return x.clamp(0.0, 1.0) if on else x


def clip_preprocess(images: torch.Tensor, size: int = 224, mean: tuple[float, ...] = CLIP_MEAN,
                    std: tuple[float, ...] = CLIP_STD, clamp: bool = True) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] → [B, 3, size, size] normalised CLIP input (fp32, differentiable)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"CLIP rewards score RGB images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    x = images.float()
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        nh, nw = resized_size(h, w, size)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        # two 1-D passes like PIL (horizontal, then vertical), each clamped as PIL's uint8 buffers are;
        # columns outside the crop are dropped before the vertical pass (it acts per column)
        x = _clamp(F.interpolate(x, size=(h, nw), mode="bicubic", align_corners=False, antialias=True), clamp)
        x = x[..., :, left:left + size]
        x = _clamp(F.interpolate(x, size=(nh, size), mode="bicubic", align_corners=False, antialias=True), clamp)
        x = x[..., top:top + size, :]
    return normalize(x, mean, std)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x − mean) / std per channel of [B, C, H, W]."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


# ---- open_clip models --------------------------------------------------------------------------------------
def open_clip_weight_spec(model_name: str, pretrained: str | None, *, what: str, config_key: str,
                          env_var: str) -> WeightSpec:
    """A WeightSpec from open_clip's own pretrained table (hub repo, file names, URL) for a tag."""
    hub, url = None, None
    if pretrained:
        from open_clip.pretrained import get_pretrained_cfg

        cfg = get_pretrained_cfg(model_name, pretrained) or {}
        hub = (cfg.get("hf_hub") or "").strip("/") or None
        url = cfg.get("url") or None
    files = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    return WeightSpec(what=what, filename=f"{model_name} ({pretrained}) open_clip weights, e.g. {files[1]}",
                      config_key=config_key, env_var=env_var, hub_repo=hub, hub_files=files, url=url)


def register_open_clip_config(model_name: str) -> str:
    """A built-in open_clip name is returned as is; a path to a model-config JSON is registered with
    open_clip under its file stem (later registrations of the same stem win) and the stem returned."""
    if model_name.endswith(".json"):
        import open_clip

        path = Path(model_name)
        if not path.is_file():
            raise FileNotFoundError(f"open_clip model config {model_name} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    return model_name


_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def _is_torchscript(path: str) -> bool:
    """OpenAI's original ViT-L-14.pt is a TorchScript archive (needs torch.load(weights_only=False))."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def create_open_clip(model_name: str, weights: str, quick_gelu: bool = False) -> nn.Module:
    """open_clip model (architecture ``model_name``: built-in name or config-JSON path) with ``weights``
    loaded strictly (open_clip state dict, ``{"state_dict": ...}``, safetensors or the OpenAI TorchScript
    file); frozen and in eval mode."""
    import open_clip

    name = register_open_clip_config(model_name)
    with quiet_random_init_warning():  # the weights are loaded right below
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu, precision="fp32",
                                       device="cpu")
    if _is_torchscript(weights):  # OpenAI's ViT-L-14.pt: its state dict plus a few non-weight entries
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            state = torch.jit.load(weights, map_location="cpu").state_dict()
        model.load_state_dict({k: v for k, v in state.items() if k not in _JIT_EXTRA_KEYS}, strict=True)
    else:
        # handles {"state_dict": ...}, "module." prefixes and safetensors (weights_only: open_clip >= 2.27)
        has_wo = "weights_only" in inspect.signature(open_clip.load_checkpoint).parameters
        extra = {"weights_only": True} if has_wo else {}
        open_clip.load_checkpoint(model, weights, strict=True, **extra)
    return freeze(model)


class quiet_random_init_warning:
    """Drop open_clip's 'No pretrained weights loaded ... initialized randomly' log record."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "initialized randomly" not in record.getMessage()

    def __enter__(self) -> None:
        self._f = self._Filter()
        logging.getLogger().addFilter(self._f)

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().removeFilter(self._f)


def image_size(visual: nn.Module) -> int:
    """The input side of an open_clip image tower."""
    size = getattr(visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# ---- frozen scorers ----------------------------------------------------------------------------------------
class AlwaysEval:
    """Mixin for frozen scorers: ``train()`` keeps every submodule in eval mode (no dropout in rewards)."""

    def train(self, mode: bool = True):  # noqa: ARG002 - the argument is ignored on purpose
        return nn.Module.train(self, False)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class TextFeatureCache:
    """prompt string → detached feature row; ``get(prompts, encode)`` encodes only unseen prompts."""

    def __init__(self, max_size: int = 4096):
        self.max_size = max_size
        self._d: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, prompts: list[str], encode: Callable[[list[str]], torch.Tensor],
            device: torch.device) -> torch.Tensor:
        todo = list(dict.fromkeys(p for p in prompts if p not in self._d))
        if todo:
            with torch.no_grad():
                feats = encode(todo).detach().float()
            for p, f in zip(todo, feats):
                self._d[p] = f
        out = torch.stack([self._d[p].to(device) for p in prompts])
        while len(self._d) > self.max_size:  # oldest first, after this batch has been served
            self._d.popitem(last=False)
        return out

    def clear(self) -> None:
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)


# ---- the image tower ---------------------------------------------------------------------------------------
def _tower_spec(model_name: str, pretrained: str | None, config_key: str, env_var: str) -> WeightSpec:
    return open_clip_weight_spec(model_name, pretrained, what=f"CLIP image features ({model_name})",
                                 config_key=config_key, env_var=env_var)


class ClipImageFeatures(AlwaysEval, nn.Module):
    """f(x) = normalize(visual(clip_preprocess(x))) ∈ R^D, ‖f‖ = 1; frozen open_clip image tower.

    Default: OpenAI CLIP ViT-L/14 (quick_gelu, D = 768). ``weights``: a file path; None → the env var
    ``env_var`` → the HF cache of open_clip's hub repo for (model_name, ``pretrained``) → a
    WeightsError raised here, in the constructor. ``model_name`` may be a path to an open_clip
    model-config JSON (tiny test models). ``num_features`` = D (torchmetrics FID).
    """

    def __init__(self, model_name: str = "ViT-L-14", weights: str | None = None,
                 env_var: str = "ALIGN_CLIP_FEATURES_WEIGHTS", quick_gelu: bool = True,
                 pretrained: str | None = "openai", config_key: str = "clip_weights", dtype: str = "fp32"):
        super().__init__()
        path = resolve(_tower_spec(model_name, pretrained, config_key, env_var), weights)
        model = create_open_clip(model_name, path, quick_gelu=quick_gelu)
        self.visual = freeze(model.visual)
        self.dtype = DTYPES[dtype]
        self.visual.to(self.dtype)
        self.image_size = image_size(self.visual)
        self.num_features = int(model.embed_dim) if hasattr(model, "embed_dim") else self._out_dim()
        self.weights_path = path
        del model
        self.eval()

    def _out_dim(self) -> int:
        with torch.no_grad():
            return int(self.visual(torch.zeros(1, 3, self.image_size, self.image_size)).shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = clip_preprocess(images, size=self.image_size).to(self.dtype)
        return F.normalize(self.visual(x).float(), dim=-1)


_SHARED_FEATURES: "weakref.WeakValueDictionary[tuple, ClipImageFeatures]" = weakref.WeakValueDictionary()


def shared_clip_image_features(model_name: str = "ViT-L-14", weights: str | None = None,
                               env_var: str = "ALIGN_CLIP_FEATURES_WEIGHTS", quick_gelu: bool = True,
                               pretrained: str | None = "openai", config_key: str = "clip_weights",
                               dtype: str = "fp32") -> ClipImageFeatures:
    """``ClipImageFeatures``, one frozen instance per (model, resolved weights file, quick_gelu, dtype) alive in
    the process: the aesthetic reward and the SD3 metrics' CLIP features (both OpenAI ViT-L/14) then hold the same
    image tower (≈ 1.2 GB in fp32) instead of two copies. The weights are resolved first (the same
    WeightsError as ``ClipImageFeatures``)."""
    path = resolve(_tower_spec(model_name, pretrained, config_key, env_var), weights)
    key = (str(model_name), os.path.realpath(path), bool(quick_gelu), str(DTYPES[dtype]))
    features = _SHARED_FEATURES.get(key)
    if features is None:
        features = ClipImageFeatures(model_name, path, env_var=env_var, quick_gelu=quick_gelu, pretrained=pretrained,
                                     config_key=config_key, dtype=dtype)
        _SHARED_FEATURES[key] = features
    return features
