"""Counting what a run spends: rows of v_θ, v_base and the reward evaluated (``EvalCounter``).

One counter serves the trainer (``compute/*`` in metrics.jsonl, cumulative from step 0) and ``align.bench``
(evaluations per trajectory and per trained state). It wraps, on the instances, the model's ``velocity`` and
``base_velocity``, the reward's ``forward`` and the algorithm's ``rollout`` / ``prepare`` / ``loss``; a wrapped
call runs the original with the same arguments and returns its result unchanged, so counting changes no number.

What a row is (the keys, ``KEYS``):
  ``v_nograd`` / ``v_grad``  a row of x passed to ``model.velocity`` with grad disabled / enabled. Under
                             classifier-free guidance the CFG-combined v_θ of one row is ONE row, although the
                             network sees two (conditional and unconditional): the count is of the field the
                             algorithm asks for, not of network forwards.
  ``v_base``                 a row of ``model.base_velocity`` called from outside ``velocity`` (a backend's
                             v_θ = v_base + residual is one v_θ row, not also a v_base row).
  ``reward_grad`` / ``reward``  a row scored by the reward with grad enabled and images that require grad (a
                             reward gradient) / otherwise.
``VELOCITY`` are the velocity keys; their sum is the compute axis of ``align.report``.
"""
from __future__ import annotations

import contextlib
import copy
import types
from typing import Any, Callable, Iterator

import torch

KEYS = ("v_nograd", "v_grad", "v_base", "reward", "reward_grad")
VELOCITY = ("v_nograd", "v_grad", "v_base")
PHASES = ("rollout", "update")


class _Counted:
    """The method ``name`` of ``owner`` with the counter's bookkeeping around it. A method the class defines is
    looked up on the class at each call (so patching the class later still takes effect); one set on the
    instance before (``fn``, e.g. another counter's wrapper) is called as it is. A deep copy of ``owner`` (e.g. a
    frozen snapshot of the model) gets a wrapper of its own method counting into the same counter, never one
    calling back into the original."""

    def __init__(self, counter: "EvalCounter", owner: Any, name: str, around: Callable, fn: Callable | None):
        self.counter, self.owner, self.name, self.around, self.fn = counter, owner, name, around, fn

    def __call__(self, *args, **kwargs):
        fn = self.fn if self.fn is not None else types.MethodType(getattr(type(self.owner), self.name), self.owner)
        return self.around(fn, *args, **kwargs)

    def __deepcopy__(self, memo):
        owner = copy.deepcopy(self.owner, memo)
        return _Counted(self.counter, owner, self.name, self.around, copy.deepcopy(self.fn, memo))


class EvalCounter:
    """Counts evaluated rows (see the module docstring). ``rows[phase][key]``: phase ``rollout`` (inside
    ``algorithm.rollout``) or ``update`` (everything else); ``total()`` sums the phases; ``paused()`` stops
    counting inside a ``with`` block (the trainer's evaluation, final samples, preflight and its log scoring of
    r(x_1)). With ``track_trained`` it also counts ``trained``: rows of v_θ evaluated with grad whose output
    receives a gradient outside the algorithm's methods (the trainer's backward), through a tensor hook that
    returns nothing (the gradient is unchanged)."""

    def __init__(self, model: Any, reward: Any, algorithm: Any, track_trained: bool = False):
        self.inside_v, self.in_algorithm, self.phase, self.counting = False, False, "update", True
        self.track_trained = track_trained
        self.reset()
        self._install(model, "velocity", self._velocity)
        self._install(model, "base_velocity", self._base_velocity)
        self._install(reward, "forward", self._reward)
        for name in ("rollout", "prepare", "loss"):
            self._install(algorithm, name, self._algorithm_method(name == "rollout"))

    def _install(self, owner: Any, name: str, around: Callable) -> None:
        own = vars(owner).get(name)                    # set on the instance (e.g. another counter's wrapper)
        setattr(owner, name, _Counted(self, owner, name, around, own))

    # ---- the counts -------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.rows = {phase: dict.fromkeys(KEYS, 0) for phase in PHASES}
        self.trained = 0

    def total(self) -> dict[str, int]:
        """Rows per key since the last ``reset``, both phases together."""
        return {k: sum(self.rows[p][k] for p in PHASES) for k in KEYS}

    def take(self) -> dict[str, int]:
        """``total()``, then ``reset()``: what was counted since the last call."""
        out = self.total()
        self.reset()
        return out

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing evaluated inside is counted (nests: the outer pause holds)."""
        outer, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = outer

    def _add(self, key: str, n: int) -> None:
        if self.counting:
            self.rows[self.phase][key] += n

    # ---- the wrappers -----------------------------------------------------------------------------------
    def _velocity(self, fn, x, t, cond=None):
        grad = torch.is_grad_enabled()
        self._add("v_grad" if grad else "v_nograd", x.shape[0])
        outer, self.inside_v = self.inside_v, True
        try:
            v = fn(x, t, cond)
        finally:
            self.inside_v = outer
        if self.track_trained and grad and v.requires_grad and self.counting:
            v.register_hook(lambda _, n=x.shape[0]: self._reached(n))
        return v

    def _base_velocity(self, fn, x, t, cond=None):
        if not self.inside_v:
            self._add("v_base", x.shape[0])
        return fn(x, t, cond)

    def _reward(self, fn, images, *args, **kwargs):
        self._add("reward_grad" if torch.is_grad_enabled() and images.requires_grad else "reward", images.shape[0])
        return fn(images, *args, **kwargs)

    def _reached(self, n: int) -> None:
        if not self.in_algorithm:
            self.trained += n

    def _algorithm_method(self, rollout: bool) -> Callable:
        def around(fn, *args, **kwargs):
            outer = self.in_algorithm, self.phase
            self.in_algorithm, self.phase = True, "rollout" if rollout else self.phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.in_algorithm, self.phase = outer
        return around
