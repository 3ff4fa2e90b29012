"""FLUX.1's prompt encoding, as ``FluxPipeline.encode_prompt``: CLIP-L's pooled vector and T5's token embeddings."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FluxTextEncoders:
    """CLIP-L (``text_encoder``, only its pooled output) + T5 (``text_encoder_2``, the token sequence) and their
    tokenizers; ``encode`` reproduces ``FluxPipeline.encode_prompt``: CLIP at its tokenizer's 77 tokens, pooled
    output in CLIP's dtype; T5 at ``max_sequence_length`` tokens (dev: 512, schnell: 256), last hidden state in
    T5's dtype. Returns (T5 tokens [B, L, 4096], pooled [B, 768])."""

    def __init__(self, clip_tokenizer: Any, clip: nn.Module, t5_tokenizer: Any, t5: nn.Module,
                 max_sequence_length: int):
        self.clip_tokenizer, self.clip, self.t5_tokenizer, self.t5 = clip_tokenizer, clip, t5_tokenizer, t5
        self.max_sequence_length = int(max_sequence_length)

    def to(self, device: torch.device | str) -> "FluxTextEncoders":
        self.clip.to(device)
        self.t5.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.clip.parameters()).device
        ids = self.clip_tokenizer(prompts, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        pooled = self.clip(ids.to(device), output_hidden_states=False).pooler_output.to(self.clip.dtype)
        ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, return_tensors="pt").input_ids
        tokens = self.t5(ids.to(next(self.t5.parameters()).device), output_hidden_states=False)[0]
        return tokens.to(self.t5.dtype), pooled
