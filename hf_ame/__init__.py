"""hf_ame: merge fine-tuned Hugging Face checkpoints with Amortized Model Ensembling (AME).

The merge is an optimizer run in weight space: (merge - ingredient) differences are
pseudogradients fed to a real torch optimizer. See ``docs/ame.md`` for the definition.

Public API: :class:`AMEMerger` (``from_pretrained`` / ``from_recipe`` -> ``plan`` / ``merge``),
:class:`MergeResult`, :class:`AMEConfig`, recipes (mergekit configs too), the optimizer and merge-method
registries, the lower-level folder-to-folder :func:`merge_checkpoints` / :func:`plan_merge` /
:func:`stack_checkpoints`, mixtures of experts from mergekit-moe configs (:func:`build_moe` /
:func:`plan_moe`), the pure tensor functions
:func:`ame_merge` / :func:`soup`, and the errors (all derive from :class:`HFAMEError`).
"""
from . import adapters  # noqa: F401 - registers LoRA adapter folders as a checkpoint kind
from . import gguf  # noqa: F401 - registers GGUF files (dequantized as read, as transformers does) as a checkpoint kind
from . import quantization  # noqa: F401 - registers FP8 checkpoints (dequantized as read) as a checkpoint kind
from . import robust_methods  # noqa: F401 - registers geometric_median, huber
from . import selection_methods  # noqa: F401 - registers sce, ram, ramplus_tl, nearswap, arcee_fusion
from . import sphere_methods  # noqa: F401 - registers nuslerp, multislerp, karcher
from . import svd_methods  # noqa: F401 - registers tsv, iso_c, iso_cts
from .algorithm import ame_merge, ame_merge_many, soup
from .checkpoints import Checkpoint, TensorInfo
from .config import AMEConfig
from .engine import merge_checkpoints, plan_merge, stack_checkpoints
from .errors import (
    CheckpointError,
    ConfigError,
    DevicePlacementError,
    HFAMEError,
    IncompatibleCheckpointsError,
    IngredientError,
    MetricError,
    NonFiniteWeightsError,
    UnchangedMergeError,
    OptimizerArgumentError,
    OutputExistsError,
    PushError,
    RecipeError,
    UnknownOptimizerError,
)
from .executor import MergeReport
from .hub import Ingredient
from .merger import AMEMerger
from .result import MergeResult
from .methods import get_method, list_methods, register_method
from .moe import MoEPlan, MoEResult, build_moe, plan_moe
from .moe_config import MoEConfig
from .optimizers import build_optimizer, get_optimizer, list_optimizers, register_optimizer
from .plan import MergePlan, TensorPlan
from .recipe import Recipe, load_recipe
from .schedules import amplification, learning_rate
from .version import __version__

__all__ = [
    "AMEMerger",
    "MergeResult",
    "MergePlan",
    "TensorPlan",
    "MergeReport",
    "Ingredient",
    "AMEConfig",
    "Recipe",
    "load_recipe",
    "merge_checkpoints",
    "plan_merge",
    "stack_checkpoints",
    "build_moe",
    "plan_moe",
    "MoEConfig",
    "MoEPlan",
    "MoEResult",
    "ame_merge",
    "ame_merge_many",
    "soup",
    "Checkpoint",
    "TensorInfo",
    "build_optimizer",
    "get_optimizer",
    "list_optimizers",
    "register_optimizer",
    "register_method",
    "get_method",
    "list_methods",
    "amplification",
    "learning_rate",
    "HFAMEError",
    "ConfigError",
    "RecipeError",
    "UnknownOptimizerError",
    "OptimizerArgumentError",
    "CheckpointError",
    "IncompatibleCheckpointsError",
    "NonFiniteWeightsError",
    "UnchangedMergeError",
    "IngredientError",
    "DevicePlacementError",
    "MetricError",
    "OutputExistsError",
    "PushError",
    "__version__",
]
