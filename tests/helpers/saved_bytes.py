"""The bytes autograd holds for backward, counted through its saved-tensor hooks (not timed, not allocator
figures): each saved tensor counts from its packing until the graph holding it is freed (the packed holder's
finalizer). Tensors that share storage with the given weights are left out; a ``tag`` names what is being saved."""
from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from typing import Iterator

import torch


class AliveSavedBytes:
    def __init__(self, weights: set[int]):
        self.weights, self.peak, self.tag = weights, 0, "other"
        self.alive_by: dict[str, int] = defaultdict(int)

    @property
    def alive(self) -> int:
        return sum(self.alive_by.values())

    @contextlib.contextmanager
    def tagged(self, tag: str) -> Iterator[None]:
        """Count what is saved inside as ``tag``."""
        outer, self.tag = self.tag, tag
        try:
            yield
        finally:
            self.tag = outer

    @contextlib.contextmanager
    def counting(self) -> Iterator["AliveSavedBytes"]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self

    def pack(self, t: torch.Tensor) -> "_Box":
        box = _Box(t)
        if t.untyped_storage().data_ptr() not in self.weights:
            n, tag = t.untyped_storage().nbytes(), self.tag
            self.alive_by[tag] += n
            self.peak = max(self.peak, self.alive)
            weakref.finalize(box, self._release, tag, n)
        return box

    def _release(self, tag: str, n: int) -> None:
        self.alive_by[tag] -= n

    @staticmethod
    def unpack(box: "_Box") -> torch.Tensor:
        return box.tensor


def storages(*modules: torch.nn.Module) -> set[int]:
    """The storage pointers of the modules' parameters and buffers (the weights to leave out)."""
    return {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}


class _Box:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
