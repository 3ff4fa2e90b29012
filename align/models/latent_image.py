"""What the latent-image backends (SD3, FLUX.1) share once their components are loaded.

A backend sets, in its ``__init__``: ``data_shape`` (the unpacked latents [C, h, w]), ``decoder`` with its
``scaling_factor`` / ``shift_factor``, ``decode_batch_size``, ``forward_batch_size``, ``feature_net``,
``value_net_kwargs``, ``context_dim`` (the width of the prompt tokens ν_φ cross-attends to), ``_text`` (an object
whose ``encode(prompts)`` returns a tuple of batched tensors, or None for a part that is absent) and
``keep_text_encoders``; then ``init_prompt_cache()``. It implements ``_forward_u`` (one network call in the
σ-convention, ``FlowTransformerModel.transformer_u``'s contract) and assembles its conditioning from the cache.

Data space: latents x; ``decode(x)`` = decoder(x / scaling_factor + shift_factor) mapped from [−1, 1] to images
in [0, 1] (clamped), fp32, differentiable, with the decoder's own factors, as the diffusers pipelines do.
"""
from __future__ import annotations

import gc
import os
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from align.models.flow_transformer import FlowTransformerModel, enable_gradient_checkpointing
from align.models.value_unet import ValueUNet
from align.core.schema import require


def check_reward_grad_batch_size(n: int | None) -> None:
    require(n is None or int(n) >= 1, "model.reward_grad_batch_size", n, ">= 1 (or null: the whole batch at once)")


def encode_device(choice: str) -> str:
    """Where the text encoders run for the one-off encoding: ``auto`` is this process's GPU (accelerate / torchrun
    set LOCAL_RANK), else the CPU."""
    if choice != "auto":
        return choice
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


class LatentImageModel(FlowTransformerModel):
    """A diffusers transformer on VAE latents, its prompt-embedding cache, decoder, features and value network."""

    forward_batch_size: int | None = None
    reward_grad_batch_size: int | None = None     # images per reward-gradient pass (algorithms/common/reward_grad.py)

    def set_decoder(self, decoder: nn.Module, kind: str, decode_batch_size: int) -> None:
        """The frozen decoder with its own latent factors, as the diffusers pipeline uses its vae's (a tiny decoder:
        1 and 0)."""
        self.scaling_factor = float(getattr(decoder.config, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(decoder.config, "shift_factor", None) or 0.0)
        self.decoder_kind = kind
        self.decoder = decoder.eval().requires_grad_(False)
        self.decode_batch_size = int(decode_batch_size)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute transformer blocks (with the forward's LoRA on/off state) and decoder activations in backward."""
        enable_gradient_checkpointing(self.transformer)
        if hasattr(self.decoder, "enable_gradient_checkpointing"):
            self.decoder.enable_gradient_checkpointing()

    def init_prompt_cache(self) -> None:
        self._cache: dict[str, tuple[torch.Tensor | None, ...]] = {}
        self.prompt_set: list[str] = []

    # -- prompts
    def prepare_prompts(self, prompts: list[str]) -> None:
        """Encode the run's prompt set and the empty prompt once, then free the text encoders (or move them to the
        CPU with ``keep_text_encoders``)."""
        self.prompt_set = list(prompts)
        self.cache_prompts(["", *self.prompt_set])
        if self.keep_text_encoders:
            self._text.to("cpu")
        else:
            self.free_text_encoders()

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
        """Encode the prompts not yet cached (on the CPU, one tuple of per-prompt tensors each)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if not todo:
            return
        if self._text is None:
            raise KeyError(f"{self.name}: no cached embedding for the prompt(s) {todo[:3]} and the text encoders "
                           "were freed after encoding the run's prompt set; set model.keep_text_encoders=true to "
                           "encode new prompts on the fly")
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            parts = self._text.encode(chunk)
            for j, p in enumerate(chunk):
                self._cache[p] = tuple(None if part is None else part[j].cpu() for part in parts)

    # -- the network, chunked when no graph is kept (evaluation batches)
    def _forward_u(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor], **kw: Any
                   ) -> torch.Tensor:
        return super().transformer_u(x, sigma, cond)

    def transformer_u(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor], **kw: Any
                      ) -> torch.Tensor:
        n = self.forward_batch_size
        if not n or torch.is_grad_enabled() or x.shape[0] <= n:
            return self._forward_u(x, sigma, cond, **kw)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        return torch.cat([self._forward_u(x[i:i + n], sigma[i:i + n], {k: v[i:i + n] for k, v in cond.items()}, **kw)
                          for i in range(0, x.shape[0], n)])

    # -- images
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] [B, 3, res, res], in the decoder's dtype (fp32; fp64 for a float64 copy), differentiable:
        decoder(x / scaling + shift) ∈ [−1, 1] → [0, 1], with the decoder's own ``scaling_factor``/``shift_factor``
        (a tiny decoder: 1 / 0, it decodes the diffusion latents themselves), as the diffusers pipeline does with
        the vae it holds."""
        dtype = torch.promote_types(next(self.decoder.parameters()).dtype, torch.float32)
        z = x.to(dtype) / self.scaling_factor + self.shift_factor
        n = max(1, self.decode_batch_size)
        out = [self.decoder.decode(z[i:i + n]).sample for i in range(0, z.shape[0], n)]
        return (torch.cat(out).to(dtype) * 0.5 + 0.5).clamp(0.0, 1.0)

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
        return ValueUNet(channels=self.data_shape[0], cross_attention_dim=self.context_dim, **kw)
