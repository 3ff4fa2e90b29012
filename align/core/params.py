"""Holding trainable parameters constant for a stretch of computation."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

from torch import nn


@contextlib.contextmanager
def held_constant(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` off for the parameters that have it (no graph to them is built), restored on exit."""
    live = [p for p in params if p.requires_grad]
    for p in live:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in live:
            p.requires_grad_(True)
