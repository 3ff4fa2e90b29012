"""A fixed work list split over processes by whole chunks of the one-process chunking.

Every process runs the same chunks (same rows, same shapes) that one process would run, so each result is the
one-process result exactly (no batch-composition rounding); the main process gathers them in the original order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """Process ``rank`` of ``world`` (the default, 0 of 1, is one process: no collective is ever called)."""
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Shard:
        """This process's place in torch.distributed's default group (one process when none is initialised)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def starts(self, n: int, size: int) -> range:
        """First rows of this process's chunks: of the ``ceil(n / size)`` chunks ``range(0, n, size)`` of one
        process, a contiguous run, as even as whole chunks allow (rank order is row order)."""
        k = -(-n // size)
        return range(self.rank * k // self.world * size, (self.rank + 1) * k // self.world * size, size)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's picklable ``obj`` in rank order on the main process; None on the others."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's picklable ``obj`` in rank order, on every process."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out
