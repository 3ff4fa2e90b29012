"""Shared CLIP pieces for the SD3 rewards (aesthetic, hpsv2, pickscore) and the SD3 metrics.

* ``clip_preprocess``: the official CLIP image pipeline as differentiable tensor ops. For images
  x ∈ [0, 1]^{B×3×H×W}:
      resize the shorter side to 224 (bicubic, antialiased, a = −0.5 like PIL; the longer side to
      ⌊224·long/short⌋ as torchvision/transformers do) as PIL does it: a horizontal then a vertical
      1-D pass, each clamped to [0, 1] (PIL's uint8 buffers clip the bicubic overshoot),
      center-crop 224×224 (top = round((h' − 224)/2)), then (x − mean)/std with the OpenAI CLIP
      mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954, 0.26130258, 0.27577711).
* ``WeightSpec`` / ``resolve_weights``: where a weight file comes from — the config key, else an
  environment variable, else the Hugging Face cache (never the network); otherwise a
  FileNotFoundError naming the file, where to get it, the config key and the environment variable.
* ``create_open_clip``: an open_clip model from a built-in architecture name ("ViT-L-14") or a path
  to an open_clip model-config JSON (tiny test models), then the weights file loaded strictly.
* ``ClipImageFeatures``: frozen open_clip image tower → L2-normalised embeddings [B, D].

Heavy imports (open_clip, huggingface_hub) are local so that importing this module is cheap (the
reward registry imports every module of ``rewards/``).
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
import weakref
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------------

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
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------------------------------
# weight files
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightSpec:
    """Where one weight file (or ``is_dir``: a from_pretrained directory) comes from.

    ``hub_files``: files looked up in the HF cache of ``hub_repo`` (first found wins; for
    ``is_dir`` the directory holding it is returned). ``required``: for directories, groups of
    alternative files of which one must be present (e.g. model.safetensors | pytorch_model.bin).
    """

    what: str
    filename: str
    config_key: str
    env_var: str
    hub_repo: str | None = None
    hub_files: tuple[str, ...] = ()
    url: str | None = None
    is_dir: bool = False
    required: tuple[tuple[str, ...], ...] = ()

    def how_to_get(self) -> str:
        where = []
        if self.url:
            where.append(self.url)
        if self.hub_repo:
            files = ", ".join(self.hub_files) if self.hub_files else self.filename
            where.append(f"the Hugging Face hub repo '{self.hub_repo}' ({files}), e.g. "
                         f"`huggingface-cli download {self.hub_repo}` on a machine with network")
        src = " or ".join(where) if where else "its authors"
        return (f"Get {self.filename} from {src}; then set the config key `{self.config_key}=<path>` or the "
                f"environment variable {self.env_var}=<path> (a populated Hugging Face cache also works).")


def _check_dir(spec: WeightSpec, path: str) -> None:
    for group in spec.required:
        if not any(os.path.isfile(os.path.join(path, f)) for f in group):
            raise FileNotFoundError(f"{spec.what}: directory {path} has none of {' / '.join(group)} "
                                    f"({spec.filename}). {spec.how_to_get()}")


def _hf_cached(repo: str, filename: str, cache_dir: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers / open_clip
        return None
    try:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - a malformed cache is the same as no cache
        return None
    return found if isinstance(found, str) and os.path.isfile(found) else None


def resolve_weights(spec: WeightSpec, value: str | None, cache_dir: str | None = None) -> str:
    """Path of the weights: ``value`` (the config key), else $``env_var``, else the HF cache.

    Raises FileNotFoundError (naming the file, its source, the config key and the env var) when the
    path given does not exist or nothing is found. Never touches the network.
    """
    for source, given in ((f"config key `{spec.config_key}`", value),
                          (f"environment variable {spec.env_var}", os.environ.get(spec.env_var) or None)):
        if given:
            path = os.path.expanduser(str(given))
            ok = os.path.isdir(path) if spec.is_dir else os.path.isfile(path)
            if not ok:
                kind = "directory" if spec.is_dir else "file"
                raise FileNotFoundError(f"{spec.what}: {source} points to {path!r}, which is not an existing "
                                        f"{kind} ({spec.filename}). {spec.how_to_get()}")
            if spec.is_dir:
                _check_dir(spec, path)
            return path
    if spec.hub_repo:
        for f in spec.hub_files or (spec.filename,):
            found = _hf_cached(spec.hub_repo, f, cache_dir)
            if found:
                path = os.path.dirname(found) if spec.is_dir else found
                if spec.is_dir:
                    _check_dir(spec, path)
                return path
    raise FileNotFoundError(f"{spec.what}: weights not found ({spec.filename}); neither the config key "
                            f"`{spec.config_key}` nor the environment variable {spec.env_var} is set"
                            + (f", and the Hugging Face cache has no '{spec.hub_repo}'" if spec.hub_repo else "")
                            + f". {spec.how_to_get()}")


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


# --------------------------------------------------------------------------------------------------
# open_clip models
# --------------------------------------------------------------------------------------------------

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
    with _quiet_random_init_warning():  # the weights are loaded right below
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


class _quiet_random_init_warning:
    """Drop open_clip's 'No pretrained weights loaded ... initialized randomly' log record."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "initialized randomly" not in record.getMessage()

    def __enter__(self) -> None:
        self._f = self._Filter()
        logging.getLogger().addFilter(self._f)

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().removeFilter(self._f)


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


class ClipImageFeatures(AlwaysEval, nn.Module):
    """f(x) = normalize(visual(clip_preprocess(x))) ∈ R^D, ‖f‖ = 1; frozen open_clip image tower.

    Default: OpenAI CLIP ViT-L/14 (quick_gelu, D = 768). ``weights``: a file path; None → the env var
    ``env_var`` → the HF cache of open_clip's hub repo for (model_name, ``pretrained``) → a
    FileNotFoundError raised here, in the constructor. ``model_name`` may be a path to an open_clip
    model-config JSON (see ``write_tiny_open_clip`` for tests). ``num_features`` = D (torchmetrics FID).
    """

    def __init__(self, model_name: str = "ViT-L-14", weights: str | None = None,
                 env_var: str = "ALIGN_CLIP_FEATURES_WEIGHTS", quick_gelu: bool = True,
                 pretrained: str | None = "openai", config_key: str = "clip_weights", dtype: str = "fp32"):
        super().__init__()
        spec = open_clip_weight_spec(model_name, pretrained, what=f"CLIP image features ({model_name})",
                                     config_key=config_key, env_var=env_var)
        path = resolve_weights(spec, weights)
        model = create_open_clip(model_name, path, quick_gelu=quick_gelu)
        self.visual = freeze(model.visual)
        self.dtype = DTYPES[dtype]
        self.visual.to(self.dtype)
        self.image_size = _image_size(self.visual)
        self.num_features = int(model.embed_dim) if hasattr(model, "embed_dim") else _out_dim(self.visual)
        self.weights_path = path
        del model
        self.eval()

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
    FileNotFoundError as ``ClipImageFeatures``)."""
    spec = open_clip_weight_spec(model_name, pretrained, what=f"CLIP image features ({model_name})",
                                 config_key=config_key, env_var=env_var)
    path = resolve_weights(spec, weights)
    key = (str(model_name), os.path.realpath(path), bool(quick_gelu), str(DTYPES[dtype]))
    features = _SHARED_FEATURES.get(key)
    if features is None:
        features = ClipImageFeatures(model_name, path, env_var=env_var, quick_gelu=quick_gelu, pretrained=pretrained,
                                     config_key=config_key, dtype=dtype)
        _SHARED_FEATURES[key] = features
    return features


def _image_size(visual: nn.Module) -> int:
    size = getattr(visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _out_dim(visual: nn.Module) -> int:
    with torch.no_grad():
        return int(visual(torch.zeros(1, 3, _image_size(visual), _image_size(visual))).shape[-1])


# --------------------------------------------------------------------------------------------------
# tiny random models for tests
# --------------------------------------------------------------------------------------------------

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
        with _quiet_random_init_warning():
            model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
    sd = model.state_dict()
    torch.save({"state_dict": sd} if wrap_state_dict else sd, w_path)
    return str(cfg_path), str(w_path)
