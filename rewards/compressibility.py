"""A black-box reward for ``model=sd3``: ``jpeg_compressibility``, minus the JPEG file size of the image.

    r(x) = −scale · |JPEG_q(u(x))| / 1000,   u(x) = round(255 x) clipped to [0, 255] as uint8, q = quality

|·| is the encoded file's size in bytes (PIL's encoder, libjpeg), so r is in kB with scale 1: DDPO's
``jpeg_compressibility`` (Black et al. 2023, kvablack/ddpo-pytorch ``rewards.py``: quality 95, size / 1000, negated),
which we follow. flow_grpo's version (yifan123/flow_grpo ``rewards.py``) divides it further by 500: ``scale=0.002``.
A compressor's output length is an integer of a discrete code, so there is no gradient (``differentiable = False``):
only the algorithms that need no reward gradient use it. Prompts are ignored.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

from align.core.interfaces import Reward
from align.core.registry import register_reward


@dataclass
class JpegCompressibilityConfig:
    """``reward=jpeg_compressibility`` (model=sd3): r = −scale · JPEG size in kB (DDPO's; not differentiable)."""
    name: str = "jpeg_compressibility"
    quality: int = 95               # PIL's JPEG quality (DDPO's and flow_grpo's: 95)
    scale: float = 1.0              # r × scale (DDPO: 1, kB; flow_grpo: 1/500 = 0.002)

    def validate(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ValueError(f"reward.quality must be in 1..100 (PIL's JPEG quality), got {self.quality}")


def jpeg_bytes(image: torch.Tensor, quality: int) -> int:
    """Size in bytes of the JPEG encoding of one image [C, H, W] in [0, 1] (C = 1 or 3)."""
    from PIL import Image

    u8 = (image.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
    array = u8.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=int(quality))
    return buffer.tell()


@register_reward("jpeg_compressibility", config=JpegCompressibilityConfig)
class JpegCompressibility(Reward):
    """r = −scale · (JPEG size in bytes) / 1000 of each decoded image."""

    name, domain, differentiable = "jpeg_compressibility", "sd3", False

    def __init__(self, quality: int = 95, scale: float = 1.0, **_: Any):
        super().__init__()
        self.quality, self.scale = int(quality), float(scale)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"jpeg_compressibility scores images [B, 3, H, W] in [0, 1], got shape "
                             f"{tuple(images.shape)}")
        sizes = torch.tensor([jpeg_bytes(im, self.quality) for im in images], dtype=torch.float32)
        return (-self.scale * sizes / 1000.0).to(images.device)
