"""slimship.compress: methods that create slimmable structure (zero or identical channel groups).

``compress("hesso", model, example_inputs, train, test, target=0.5)`` runs one method by name; every
method also stays importable on its own.
"""

from slimship.compress.base import (
    METHODS,
    CompressResult,
    compress,
    group_norms,
    group_sparsity,
    load_builtin_methods,
    method_options,
    register,
    train_loop,
)
from slimship.compress.csgd import csgd
from slimship.compress.distill import DistillationLoss, build_student, hakd, latency_table, thinned
from slimship.compress.drop import drop
from slimship.compress.hspg import hesso, hspg
from slimship.compress.imports import (
    fold_mask_keys,
    import_pruned,
    load_state_checkpoint,
    make_prune_permanent,
)
from slimship.compress.sparsifier import SPARSIFIERS, Sparsifier, sparsifier, sparsifier_options

__all__ = [
    "METHODS",
    "SPARSIFIERS",
    "CompressResult",
    "DistillationLoss",
    "Sparsifier",
    "build_student",
    "compress",
    "csgd",
    "drop",
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
    "make_prune_permanent",
    "method_options",
    "register",
    "sparsifier",
    "sparsifier_options",
    "thinned",
    "train_loop",
]

# methods written alongside (ADC, simulation-guided pruning, LoRITa): re-exported when present
try:
    from slimship.compress.adc import AdcPolicy, SearchResult, adc, adc_search, apply_policy

    __all__ += ["AdcPolicy", "SearchResult", "adc", "adc_search", "apply_policy"]
except ModuleNotFoundError:  # pragma: no cover
    pass
try:
    from slimship.compress.simguided import magnitude, simguided

    __all__ += ["magnitude", "simguided"]
except ModuleNotFoundError:  # pragma: no cover
    pass
try:
    from slimship.compress.lorita import LowRankParametrization, factorize, lorita, parametrize_low_rank

    __all__ += ["LowRankParametrization", "factorize", "lorita", "parametrize_low_rank"]
except ModuleNotFoundError:  # pragma: no cover
    pass
