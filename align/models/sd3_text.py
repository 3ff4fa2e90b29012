"""SD3's prompt encoding, as ``StableDiffusion3Pipeline.encode_prompt``: CLIP-L + CLIP-G (+ T5)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


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
