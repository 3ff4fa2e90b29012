"""The reward objective's settings, shared by the direct-backpropagation baselines (ReFL, DRaFT); the loss
itself is ``algorithms/common/objectives.py``."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from algorithms.common.objectives import OBJECTIVES

Objective = enum.StrEnum("Objective", list(OBJECTIVES))


@dataclass
class ObjectiveConfig:
    objective: Objective = Objective.relu  # relu: −ReLU(r) (paper) | hinge: ReLU(hinge_c − r) | raw: −r
    hinge_c: float = 1.0                   # target reward of objective=hinge
