"""DreamSim (Fu et al. 2023) image embeddings, the paper's diversity features, re-implemented on timm from
DreamSim's published checkpoint files (the ``dreamsim`` package's cache directory, i.e. its release zip extracted),
no download."""
from __future__ import annotations

import json
import os
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from align.metrics.clip import CLIP_MEAN, CLIP_STD, normalize
from align.core.weights import WeightSpec, resolve

DREAMSIM_URL = "https://github.com/ssundaram21/dreamsim/releases/download/v0.2.0-checkpoints/dreamsim_{}_checkpoint.zip"
# dreamsim_type → branches (DreamSim's model_config) and its LoRA directory
DREAMSIM_TYPES = {"ensemble": (("dino_vitb16", "clip_vitb16", "open_clip_vitb16"), "ensemble_lora"),
                  "dino_vitb16": (("dino_vitb16",), "dino_vitb16_single_lora"),
                  "clip_vitb32": (("clip_vitb32",), "clip_vitb32_single_lora"),
                  "open_clip_vitb32": (("open_clip_vitb32",), "open_clip_vitb32_single_lora")}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"


def _dreamsim_branch_file(branch: str) -> str:
    if branch == "dino_vitb16":     # the backbone torch.hub's facebookresearch/dino caches under the same dir
        return os.path.join("checkpoints", "dino_vitbase16_pretrain.pth")
    return f"{branch}_pretrain.pth.tar"    # {"state_dict": DINO-layout ViT + "proj"} (DreamSim's conversion)


def dreamsim_weight_spec(dreamsim_type: str) -> WeightSpec:
    """DreamSim's checkpoint directory for ``dreamsim_type``: its branches' backbones and its LoRA adapter."""
    branches, lora_dir = DREAMSIM_TYPES[dreamsim_type]
    need = [_dreamsim_branch_file(b) for b in branches] + [os.path.join(lora_dir, "adapter_config.json")]
    get = f"extract {DREAMSIM_URL.format(dreamsim_type)} there"
    if "dino_vitb16" in branches:
        get += f" (the DINO backbone checkpoints/dino_vitbase16_pretrain.pth is facebookresearch/dino's {DINO_URL})"
    return WeightSpec(what=f"model.features.kind=dreamsim (dreamsim_type={dreamsim_type})",
                      filename=f"DreamSim's checkpoint directory with {', '.join(need)}",
                      config_key="model.features.weights", env_var="ALIGN_DREAMSIM_DIR", get=get, is_dir=True,
                      required=tuple((f,) for f in need), value_hint="<dir>")


class DreamSimFeatures(nn.Module):
    """DreamSim embeddings [B, D]: per branch a ViT (timm) with DreamSim's LoRA merged — DINO ViT-B/16's CLS token
    after the last block (before the final norm), CLIP / OpenCLIP ViT-B's image embedding (final norm, CLS,
    ``@ proj``) — concatenated, then centred and L2-normalised as DreamSim's ``normalize_embeds`` does, so
    1 − cos of two embeddings is the DreamSim distance. Images in [0, 1] are resized to 224² (bicubic,
    antialiased; DreamSim resizes PIL images) and normalised per branch (ImageNet for DINO, OpenAI CLIP else).
    ``weights``: DreamSim's cache directory (its release zip for ``dreamsim_type`` extracted there)."""

    def __init__(self, weights: str | None = None, dreamsim_type: str = "ensemble", image_size: int = 224):
        super().__init__()
        from timm.layers import QuickGELU
        from timm.models.vision_transformer import VisionTransformer

        if dreamsim_type not in DREAMSIM_TYPES:
            raise ValueError(f"model.features.dreamsim_type={dreamsim_type!r}: valid choices are "
                             f"{', '.join(DREAMSIM_TYPES)}")
        root = resolve(dreamsim_weight_spec(dreamsim_type), weights)
        branches, lora_dir = DREAMSIM_TYPES[dreamsim_type]
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
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if b.startswith("dino") else (CLIP_MEAN, CLIP_STD)
            xi = normalize(x, mean, std)
            if b.startswith("dino"):             # DreamSim's 'cls': block 11's output token 0, no final norm
                h = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(xi))))
                feats.append(net.blocks(h)[:, 0])
            else:                                # 'embedding': ln_post(CLS) @ proj
                feats.append(net(xi) @ getattr(self, f"proj{i}"))
        e = torch.cat(feats, dim=-1)
        e = e - e.mean(dim=1, keepdim=True)
        return e / e.norm(dim=1, keepdim=True)
