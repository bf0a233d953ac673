"""hf_ame: merge fine-tuned Hugging Face checkpoints with Amortized Model Ensembling (AME).

The merge is an optimizer run in weight space: (merge - ingredient) differences are
pseudogradients fed to a real torch optimizer. See ``shared/spec/AME.md`` for the definition.
"""
from . import adapters  # noqa: F401 - registers LoRA adapter folders as a checkpoint kind
from .algorithm import AMEStep, AMEStepper, ame_merge, ame_merge_many, plan_steps, soup
from .checkpoints import Checkpoint, CheckpointError, TensorInfo
from .checks import IncompatibleCheckpointsError, NonFiniteWeightsError, check_compatible
from .config import AMEConfig, ConfigError
from .engine import MergeReport, merge_checkpoints
from .hub import Ingredient, IngredientError
from .merger import AMEMerger, MergeResult
from .optimizers import (
    OptimizerArgumentError,
    UnknownOptimizerError,
    build_optimizer,
    get_optimizer,
    list_optimizers,
    register_optimizer,
)
from .output import OutputExistsError
from .placement import DevicePlacementError
from .schedules import amplification, learning_rate

__version__ = "0.1.0"

__all__ = [
    "AMEMerger",
    "MergeResult",
    "Ingredient",
    "IngredientError",
    "DevicePlacementError",
    "AMEConfig",
    "ConfigError",
    "AMEStep",
    "AMEStepper",
    "ame_merge",
    "ame_merge_many",
    "plan_steps",
    "soup",
    "Checkpoint",
    "CheckpointError",
    "TensorInfo",
    "IncompatibleCheckpointsError",
    "NonFiniteWeightsError",
    "check_compatible",
    "MergeReport",
    "merge_checkpoints",
    "OutputExistsError",
    "OptimizerArgumentError",
    "UnknownOptimizerError",
    "build_optimizer",
    "get_optimizer",
    "list_optimizers",
    "register_optimizer",
    "amplification",
    "learning_rate",
    "__version__",
]
