"""Every error hf_ame raises on purpose: one base class to catch, one subclass per kind of failure.

Each subclass also derives from the builtin its callers would expect (``ValueError`` for bad input,
``FileExistsError`` for an existing output, ``KeyError`` for an unknown registry name), so code
written against those keeps working. Messages name the model, tensor, file or field at fault.
"""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = [
    "HFAMEError",
    "ConfigError",
    "RecipeError",
    "UnknownOptimizerError",
    "OptimizerArgumentError",
    "CheckpointError",
    "IncompatibleCheckpointsError",
    "NonFiniteWeightsError",
    "IngredientError",
    "DevicePlacementError",
    "MetricError",
    "OutputExistsError",
    "PushError",
    "Interrupted",
    "UnchangedMergeError",
    "error_line",
]


class HFAMEError(Exception):
    """Base class of every error hf_ame raises on purpose (catch this to catch them all)."""


class ConfigError(HFAMEError, ValueError):
    """A bad hyperparameter or argument; the message starts with the field's path (e.g. ``lr: ...``)."""


class RecipeError(ConfigError):
    """A recipe that cannot be used; the message starts with the field's path."""


class UnknownOptimizerError(ConfigError, KeyError):
    """An optimizer name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


class OptimizerArgumentError(ConfigError):
    """An optimizer hyperparameter the optimizer rejects; names the field at fault."""


class CheckpointError(HFAMEError, ValueError):
    """A checkpoint folder that cannot be read; the message names the folder or file."""


class IncompatibleCheckpointsError(HFAMEError, ValueError):
    """Ingredients that cannot be merged together; the message names the model and the tensor at fault."""


class NonFiniteWeightsError(IncompatibleCheckpointsError):
    """A NaN or Inf in an ingredient's tensor (or produced by the merge): the merge stops before its
    output lands. ``models``: the ingredients at fault (empty when the merge itself overflowed);
    ``optimizer``: the merge's (None: the exact soup, which has no learning rate to blame)."""

    def __init__(self, tensor: str, models: Sequence[str], optimizer: Optional[str] = ""):
        self.tensor, self.models = tensor, list(models)
        if self.models:
            msg = (f"model {self.models[0]!r} has NaN or Inf values in tensor {tensor!r}"
                   + (f" (so do {', '.join(repr(m) for m in self.models[1:])})" if len(self.models) > 1 else "")
                   + "; the merge was stopped and nothing was written")
        elif optimizer is None:
            msg = (f"tensor {tensor!r}: the average of finite ingredients is NaN or Inf in the output dtype (values "
                   "beyond its range, or sums beyond float32's); nothing was written")
        else:
            msg = (f"tensor {tensor!r}: the merge produced NaN or Inf values from finite ingredients (a learning "
                   f"rate or amplification too large for {optimizer or 'the optimizer'}, or an output dtype too "
                   "narrow); nothing was written")
        super().__init__(msg)


class UnchangedMergeError(HFAMEError, ValueError):
    """Every merged tensor equals one input (the base or the pivot ingredient) bit for bit although the
    other ingredients differ from it: the merge would publish that input as "the merge". Refused
    unless asked for (``merge(allow_unchanged=True)``, ``--allow-unchanged``)."""


class IngredientError(HFAMEError, ValueError):
    """An ingredient that cannot be found, fetched or read; the message names it."""


class DevicePlacementError(HFAMEError, ValueError):
    """A device map that cannot be honoured (e.g. it names a missing GPU)."""


class MetricError(HFAMEError, ValueError):
    """A metric, dataset or task that cannot be used for scoring; the message names it."""


class OutputExistsError(HFAMEError, FileExistsError):
    """The output folder exists and ``overwrite`` was not asked for (or it is an input)."""


class PushError(HFAMEError, RuntimeError):
    """A push that failed; the local folder is untouched and the message says where it is."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during a command-line run (``signum``): raised in the main thread so the
    merge ends as an error does (staging folder removed, lock released). A ``KeyboardInterrupt``,
    not an ``Exception``: no ``except Exception`` on the way may swallow it."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def error_line(exc: BaseException) -> str:
    """The one line an error prints (the CLI and ``hf-ame ui`` alike): ours name the field, file or tensor."""
    known = isinstance(exc, (HFAMEError, ValueError, OSError, KeyError))
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return f"hf-ame: error: {msg if known else f'{type(exc).__name__}: {msg}'}"
