"""VGG-Flow's value network ν_φ(x, t, c) for image-like domains: a scaled-down ``UNet2DConditionModel``.

The paper's choice (reference §1.8): a "scaled-down SD1.5 U-Net" with a tiny-initialised output layer, so that
ν ≈ 0 at the start; on SD3 the authors' ``small`` option is ``UNet2DConditionModel(in = out = 16,
block_out_channels = (64, 128, 256, 256), layers_per_block = 1, cross_attention_dim = 4096)``. Each image backend
sizes it to its domain (``make_value_network``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ValueUNet(nn.Module):
    """ν_φ(x, t, c): ``UNet2DConditionModel`` with cross-attention blocks on the prompt tokens (all but the
    lowest resolution), ``layers_per_block`` layers per block, and its output conv's weight and bias scaled by
    ``out_scale`` = 1e−3 so that ν ≈ 0 at the start. t is fed as 1000·t. The defaults are the paper's SD3 sizes."""

    def __init__(self, channels: int = 16, sample_size: int = 128, cross_attention_dim: int = 4096,
                 block_out_channels: Sequence[int] = (64, 128, 256, 256), layers_per_block: int = 1,
                 attention_head_dim: int = 8, norm_num_groups: int | None = None, out_scale: float = 1e-3):
        super().__init__()
        from diffusers import UNet2DConditionModel

        n = len(block_out_channels)
        down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
        groups = norm_num_groups or min(32, min(block_out_channels))
        self.unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=channels, out_channels=channels, down_block_types=down,
            up_block_types=up, block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim, norm_num_groups=groups)
        with torch.no_grad():
            self.unet.conv_out.weight.mul_(out_scale)
            self.unet.conv_out.bias.mul_(out_scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        return self.unet(x, 1000.0 * t, encoder_hidden_states=cond["encoder_hidden_states"].to(x.dtype)).sample
