"""ADC / AMC: a DDPG agent chooses how much of each channel space to keep, under a FLOPs or latency budget.

The agent walks the prunable channel spaces ``find_groups`` finds, one step per space. Its state
describes the space (position, op kind, channels, kernel size, FLOPs, FLOPs already removed, FLOPs still
left, previous action); its action is the fraction of the space's groups to keep. An episode zeroes the
least important groups per space and scores the pruned network (no fine-tuning); the score is the
reward. The budget is enforced in the action, as in AMC: each action is clipped so that the budget stays
reachable with later spaces at the minimum.

- :func:`adc_search` scores policies with your own ``evaluate(model) -> float`` and returns the best
  :class:`AdcPolicy`; :func:`apply_policy` zeros its groups on your model (``slimship.slim`` removes them).
- ``compress("adc", ...)`` (:func:`adc`) runs the same search with the accuracy on a validation split
  held back from the training data, and supports a latency budget: a per-space latency table measured
  on the target runtime, then the policy checked on the measured latency of the slimmed model.

Modules: ``budget`` (spaces, FLOPs model, budget), ``policy`` (pruning, policies), ``agent`` (DDPG),
``search`` (the search), ``latency`` (table and measured loop), ``method`` (the registered method).
"""

from slimship.compress.adc.agent import DDPG, Agent
from slimship.compress.adc.budget import (
    Budget,
    FlopsModel,
    Snap,
    Space,
    aligned_counts,
    build_spaces,
    grow_to_budget,
    layer_flops,
    shrink_to_budget,
    uniform_counts,
)
from slimship.compress.adc.latency import (
    RUNTIMES,
    LatencyTable,
    build_latency_table,
    close_latency_loop,
    measure_latency_ms,
)
from slimship.compress.adc.method import AdcOptions, adc, split_validation, validation_scores
from slimship.compress.adc.policy import (
    IMPORTANCES,
    AdcPolicy,
    Pruner,
    apply_policy,
    importance_scores,
    recalibrate_batchnorm,
)
from slimship.compress.adc.search import (
    SEARCHES,
    SearchOptions,
    SearchResult,
    adc_search,
    select_policy,
    top_policies,
)

__all__ = [
    "DDPG",
    "IMPORTANCES",
    "RUNTIMES",
    "SEARCHES",
    "AdcOptions",
    "AdcPolicy",
    "Agent",
    "Budget",
    "FlopsModel",
    "LatencyTable",
    "Pruner",
    "SearchOptions",
    "SearchResult",
    "Snap",
    "Space",
    "adc",
    "adc_search",
    "aligned_counts",
    "apply_policy",
    "build_latency_table",
    "build_spaces",
    "close_latency_loop",
    "grow_to_budget",
    "importance_scores",
    "layer_flops",
    "measure_latency_ms",
    "recalibrate_batchnorm",
    "select_policy",
    "shrink_to_budget",
    "split_validation",
    "top_policies",
    "uniform_counts",
    "validation_scores",
]
