"""Which rewards returned non-finite values during an update: the trainer's NaN guard skips such an update (every
algorithm's reward calls go through the reward module, so one watch covers first-order and policy-gradient ones
alike, whether or not the NaN would have reached the loss)."""
from __future__ import annotations

from typing import Any, Callable

import torch

from align.core.interfaces import Reward


class NonFiniteWatch:
    """Forward hooks on ``reward`` and on every reward inside it (a mix's parts) that note whether an output held a
    non-finite value, while ``active()`` is true (the trainer passes "training is being counted", so evaluation,
    the preflight and the log's scoring are left out). The note stays on the device (no synchronisation per
    call); ``take()`` reads and clears it once per update."""

    def __init__(self, reward: Reward, active: Callable[[], bool]):
        self.rewards = [m for m in reward.modules() if isinstance(m, Reward)]
        self.active = active
        self.flags: dict[int, torch.Tensor] = {}
        for index, module in enumerate(self.rewards):
            module.register_forward_hook(self._hook(index))

    def _hook(self, index: int) -> Callable[..., None]:
        def note(module: Reward, inputs: Any, output: Any) -> None:
            if self.active() and isinstance(output, torch.Tensor):
                bad = ~torch.isfinite(output.detach()).all()
                self.flags[index] = bad if index not in self.flags else self.flags[index] | bad
        return note

    def take(self) -> list[str]:
        """The descriptions of the rewards that returned a non-finite value since the last call (a mix's part
        rather than the mix it spoils), then forget them."""
        flagged = {index for index, bad in self.flags.items() if bool(bad)}
        self.flags = {}
        return [self.rewards[i].description() for i in sorted(flagged) if not self._holds_flagged(i, flagged)]

    def _holds_flagged(self, index: int, flagged: set[int]) -> bool:
        """Whether another flagged reward is inside reward ``index`` (then that one is the culprit)."""
        inside = {id(m) for m in self.rewards[index].modules()} - {id(self.rewards[index])}
        return any(id(self.rewards[j]) in inside for j in flagged)
