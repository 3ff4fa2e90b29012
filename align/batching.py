"""Indexing helpers for conditioning objects (None, tensors, or nested tuples/dicts of tensors)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map


def index_cond(cond: Any, index: torch.Tensor) -> Any:
    """cond[index] applied to every tensor leaf (batch dimension first); None stays None."""
    return tree_map(lambda c: c[index.to(c.device)] if isinstance(c, torch.Tensor) else c, cond)


def cat_cond(conds: list[Any]) -> Any:
    """Concatenate a list of conditionings of the same structure along the batch dimension."""
    if conds[0] is None:
        return None
    if isinstance(conds[0], torch.Tensor):
        return torch.cat(conds)
    if isinstance(conds[0], (tuple, list)):
        return type(conds[0])(cat_cond(list(parts)) for parts in zip(*conds))
    if isinstance(conds[0], dict):
        return {k: cat_cond([c[k] for c in conds]) for k in conds[0]}
    return conds[0]
