"""slimship.compress: methods that create slimmable structure (zero or identical channel groups).

``compress("hesso", model, example_inputs, train, test, target=0.5)`` runs one method by name; every
method also stays importable on its own.
"""

from slimship.compress.adc import (
    AdcOptions,
    AdcPolicy,
    SearchOptions,
    SearchResult,
    adc,
    adc_search,
    apply_policy,
)
from slimship.compress.csgd import CsgdOptions, csgd
from slimship.compress.distill import (
    DistillationLoss,
    HakdOptions,
    build_student,
    hakd,
    latency_table,
    thinned,
)
from slimship.compress.drop import DropOptions, drop
from slimship.compress.groups import group_norms, group_sparsity
from slimship.compress.hspg import HessoOptions, HspgOptions, hesso, hspg
from slimship.compress.imports import (
    fold_mask_keys,
    import_pruned,
    load_state_checkpoint,
    make_prune_permanent,
)
from slimship.compress.lorita import (
    LoritaOptions,
    LowRankParametrization,
    factorize,
    lorita,
    parametrize_low_rank,
)
from slimship.compress.registry import (
    METHODS,
    CompressResult,
    compress,
    load_builtin_methods,
    method_options,
    register,
)
from slimship.compress.simguided import magnitude, simguided
from slimship.compress.sparsifier import SPARSIFIERS, Sparsifier, sparsifier, sparsifier_options
from slimship.compress.training import LoopOptions, Training, train_loop

__all__ = [
    "METHODS",
    "SPARSIFIERS",
    "AdcOptions",
    "AdcPolicy",
    "CompressResult",
    "CsgdOptions",
    "DistillationLoss",
    "DropOptions",
    "HakdOptions",
    "HessoOptions",
    "HspgOptions",
    "LoopOptions",
    "LoritaOptions",
    "LowRankParametrization",
    "SearchOptions",
    "SearchResult",
    "Sparsifier",
    "Training",
    "adc",
    "adc_search",
    "apply_policy",
    "build_student",
    "compress",
    "csgd",
    "drop",
    "factorize",
    "fold_mask_keys",
    "group_norms",
    "group_sparsity",
    "hakd",
    "hesso",
    "hspg",
    "import_pruned",
    "latency_table",
    "load_builtin_methods",
    "load_state_checkpoint",
    "lorita",
    "magnitude",
    "make_prune_permanent",
    "method_options",
    "parametrize_low_rank",
    "register",
    "simguided",
    "sparsifier",
    "sparsifier_options",
    "thinned",
    "train_loop",
]
