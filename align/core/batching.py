"""Batch helpers: per-sample values broadcast against states, and indexing of conditioning objects (None,
tensors, or nested tuples/dicts of tensors)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map


def index_cond(cond: Any, index: torch.Tensor) -> Any:
    """cond[index] applied to every tensor leaf (batch dimension first); None stays None."""
    return tree_map(lambda c: c[index.to(c.device)] if isinstance(c, torch.Tensor) else c, cond)


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] tensor (one value per sample) shaped [B, 1, ..., 1] to broadcast against ``like`` [B, ...]."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))
