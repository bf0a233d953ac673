"""Learning-rate and amplification schedules of AME. Steps ``t`` count globally from 1."""
from __future__ import annotations

import math
from typing import Callable, Union

__all__ = ["LR_SCHEDULES", "learning_rate", "amplification", "Amplification"]

LR_SCHEDULES = ("constant", "harmonic", "power")

Amplification = Union[float, int, str, Callable[[int], float]]


def learning_rate(t: int, base_lr: float, schedule: str = "constant", power: float = -0.5) -> float:
    """eta_t for global step ``t`` (>= 1).

    ``constant``: base_lr; ``harmonic``: base_lr / t; ``power``: base_lr * t ** power.
    """
    if t < 1:
        raise ValueError(f"step t counts from 1, got {t}")
    if schedule == "constant":
        return float(base_lr)
    if schedule == "harmonic":
        return float(base_lr) / t
    if schedule == "power":
        return float(base_lr) * float(t) ** power
    raise ValueError(f"lr_schedule: expected one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")


def amplification(t: int, zeta: Amplification = 1.0) -> float:
    """zeta_t for global step ``t`` (>= 1): a number, ``"linear"`` (t + 1) or a callable of t."""
    if callable(zeta):
        value = float(zeta(t))
    elif isinstance(zeta, str):
        if zeta != "linear":
            raise ValueError(f"amplification: expected a number, 'linear' or a callable, got {zeta!r}")
        value = float(t + 1)
    else:
        value = float(zeta)
    if not math.isfinite(value):
        raise ValueError(f"amplification at step {t} is not finite: {value}")
    return value
