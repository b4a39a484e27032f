"""Curriculum scheduling: the ceiling on synthetic-defect difficulty rises over the epochs (easy first)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class CurriculumSchedule:
    """`none`: no ceiling (1.0). `linear`: from `start` at epoch 0 to `end` at `ramp_epochs`, then `end`.
    `step`: `start`, raised in 4 equal steps to `end` over `ramp_epochs`.

    >>> CurriculumSchedule("linear", 0.4, 1.0, 4).ceiling(2)
    0.7
    """

    schedule: str = "linear"
    start: float = 0.4
    end: float = 1.0
    ramp_epochs: int = 8

    def __post_init__(self):
        if self.schedule not in ("none", "linear", "step"):
            raise ValueError(f"train.curriculum.schedule: expected none, linear or step, got {self.schedule!r}")
        if not 0 <= self.start <= self.end <= 1:
            raise ValueError(f"train.curriculum: expected 0 <= start <= end <= 1, got {self.start}, {self.end}")

    def ceiling(self, epoch: int) -> float:
        if self.schedule == "none":
            return 1.0
        t = min(1.0, epoch / self.ramp_epochs) if self.ramp_epochs > 0 else 1.0
        if self.schedule == "step":
            t = math.floor(t * 4) / 4
        return round(self.start + (self.end - self.start) * t, 6)
