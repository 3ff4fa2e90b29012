"""Methods compared at a matched reward rather than at a matched number of updates.

A run reaches reward level L between two evaluations; everything else at that moment (the cumulative velocity
evaluations, the diversity ÷ base, the FID, the held-out reward) is read off the straight line between the same two
evaluations. Over seeds that gives one value per seed that reached L, reported as their mean and their range
(min–max) with the number of seeds that got there."""
from __future__ import annotations

import math
from dataclasses import dataclass

from align.report.data import RunData, _num

REWARD = "eval/reward"


def crossing(evals: list[dict], level: float, keys: tuple[str, ...]) -> dict[str, float] | None:
    """``keys`` (and ``step``) linearly interpolated at the first point where the reward reaches ``level``
    along the evaluation rows (in step order); None if it never does."""
    rows = sorted((r for r in evals if math.isfinite(_num(r.get(REWARD)))), key=lambda r: r["step"])
    for prev, row in zip([None] + rows[:-1], rows):
        r1 = _num(row[REWARD])
        if r1 < level:
            continue
        if prev is None:
            w = 1.0
        else:
            r0 = _num(prev[REWARD])
            w = 1.0 if r1 == r0 else (level - r0) / (r1 - r0)
        out = {}
        for k in ("step",) + keys:
            v1 = _num(row.get(k))
            v0 = v1 if prev is None else _num(prev.get(k))
            out[k] = v0 + w * (v1 - v0)
        return out
    return None


@dataclass
class AtLevel:
    """One method at one level: per key, the values of the seeds that reached it."""
    reached: int
    n: int
    values: dict[str, list[float]]

    def stat(self, key: str) -> tuple[float, float, float] | None:
        """(mean, min, max) of ``key`` over the seeds that reached the level (finite values only)."""
        vals = [v for v in self.values.get(key, []) if math.isfinite(v)]
        if not vals:
            return None
        return sum(vals) / len(vals), min(vals), max(vals)


def at_level(runs: list[RunData], level: float, keys: tuple[str, ...]) -> AtLevel:
    hits = [crossing(r.evals, level, keys) for r in runs]
    got = [h for h in hits if h is not None]
    return AtLevel(len(got), len(runs), {k: [h[k] for h in got] for k in ("step",) + keys})


def nice_floor(x: float, gap: float) -> float:
    """``x`` rounded down to a round step: half a unit of the decade below ``gap`` (gap 0.5 → steps of 0.05)."""
    step = 5 * 10 ** (math.floor(math.log10(gap)) - 1) if gap > 0 else 1.0
    return math.floor(x / step + 1e-9) * step


def levels(base: float, finals: list[float]) -> list[float]:
    """Two reward levels worth comparing at: the second-highest final mean reward of the methods (so at least
    two reach it on average), rounded down, and half-way from the base to it. Empty if fewer than two methods
    finish above the base."""
    above = sorted((f for f in finals if f > base), reverse=True)
    if len(above) < 2:
        return []
    gap = above[1] - base
    high = nice_floor(above[1], gap)
    low = nice_floor(base + gap / 2, gap)
    return [lv for lv in sorted({round(low, 10), round(high, 10)}) if lv > base]


def matched_checkpoint(runs_by_label: dict[str, RunData]) -> tuple[float, list[dict]]:
    """For one seed's run of each method: the level L every one of them reaches at some evaluated checkpoint (the
    smallest of their best evaluated rewards), and each method's evaluated step whose reward is closest to L
    (``{"label", "step", "reward"}``, in the order given)."""
    best = {lab: max(_num(e[REWARD]) for e in r.evals if math.isfinite(_num(e.get(REWARD))))
            for lab, r in runs_by_label.items()}
    level = min(best.values())
    chosen = []
    for lab, r in runs_by_label.items():
        rows = [e for e in r.evals if math.isfinite(_num(e.get(REWARD))) and e["step"] > 0]
        e = min(rows, key=lambda e: (abs(_num(e[REWARD]) - level), e["step"]))
        chosen.append({"label": lab, "step": int(e["step"]), "reward": _num(e[REWARD])})
    return level, chosen
