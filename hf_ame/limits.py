"""Bounds on every size or count a file, a recipe or a search space can set.

A shared recipe is data from a stranger: ``epochs: 1000000000000`` would build a per-step schedule
forever, ``pad_to_multiple_of: 1000000000`` a billion embedding rows, ``max_iter: .inf`` a loop that
never ends, and ``seed: 10**40`` fails only once every header has been read. Each value is checked
here, before it is used, and refused with an error naming its field. The limits are far above any
real merge (the README lists them).
"""
from __future__ import annotations

import math
from typing import Any, Optional

from .errors import ConfigError

__all__ = ["MAX_EPOCHS", "MAX_STEPS", "SEED_RANGE", "MAX_PAD_TO_MULTIPLE_OF", "MAX_ITER", "MAX_TRIALS",
           "MAX_FP8_BLOCK", "MAX_SCORE_BATCH", "check_count", "check_config_limits"]

MAX_EPOCHS = 10_000  # passes over the ingredients
MAX_STEPS = 1_000_000  # optimizer steps in all (epochs x steps per epoch): the schedule is one list
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts
MAX_PAD_TO_MULTIPLE_OF = 65_536  # embedding rows are padded up to a multiple of this
MAX_ITER = 10_000  # karcher's iterations (each re-reads every copy of the tensor)
MAX_TRIALS = 1_000  # search trials (each one is a full merge and an evaluation)
MAX_FP8_BLOCK = 65_536  # rows or columns of an FP8 weight_block_size tile
MAX_SCORE_BATCH = 65_536  # examples per scoring batch (ordering.batch_size)


def check_count(value: Any, field: str, low: int, high: int) -> int:
    """``value`` as an int in [low, high], else a :class:`ConfigError` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{field}: expected a whole number from {low:,} to {high:,}, got {value!r}")
    return int(value)


def check_config_limits(config: Any, n_ingredients: Optional[int] = None, prefix: str = "") -> None:
    """Refuse an :class:`~hf_ame.config.AMEConfig` whose epochs, step count or seed exceed the limits
    (``n_ingredients``: known at merge time; the step count is then checked too)."""
    check_count(config.epochs, f"{prefix}epochs", 1, MAX_EPOCHS)
    check_count(config.seed, f"{prefix}seed", *SEED_RANGE)
    if n_ingredients:
        per_epoch = math.ceil(n_ingredients / (config.batch_size or n_ingredients))
        if config.epochs * per_epoch > MAX_STEPS:
            raise ConfigError(f"{prefix}epochs: {config.epochs} epochs of {per_epoch} steps are "
                              f"{config.epochs * per_epoch:,} optimizer steps, more than the {MAX_STEPS:,} allowed; "
                              "use fewer epochs or a larger batch_size")
