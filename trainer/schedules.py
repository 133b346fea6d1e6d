"""Per-step schedules (lr, weight decay, teacher momentum, teacher temperature), precomputed and indexed by step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.config import RunConfig


def cosine(start: float, end: float, steps: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """(steps,) linear warm-up from warmup_start to start, then half-cosine from start to end."""
    warmup_steps = min(warmup_steps, steps)
    warm = np.linspace(warmup_start, start, warmup_steps, endpoint=False)
    t = np.arange(steps - warmup_steps) / max(1, steps - warmup_steps - 1)
    return np.concatenate([warm, end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))])


@dataclass(frozen=True, slots=True)
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Schedules:
        o, loss, n = cfg.optim, cfg.loss, cfg.train.max_steps
        warm = min(loss.teacher_temp_warmup_steps, n)
        temp = np.concatenate([np.linspace(loss.teacher_temp_warmup, loss.teacher_temp, warm),
                               np.full(n - warm, loss.teacher_temp)])
        return cls(lr=cosine(o.lr, o.min_lr, n, o.warmup_steps),
                   weight_decay=cosine(o.weight_decay, o.weight_decay_end, n),
                   momentum=cosine(o.momentum_start, o.momentum_end, n),
                   teacher_temp=temp)

    def at(self, step: int) -> dict[str, float]:
        """The values for `step`, clamped to the last one (a run may go past max_steps when extended)."""
        i = min(step, len(self.lr) - 1)
        return {"lr": float(self.lr[i]), "weight_decay": float(self.weight_decay[i]),
                "momentum": float(self.momentum[i]), "teacher_temp": float(self.teacher_temp[i])}
