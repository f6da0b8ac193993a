"""Slimming engine: trace -> channel graph -> value analysis -> plan -> rewrite -> verify."""

from slimship.slimming.api import (
    ChannelGroup,
    GroupSet,
    SlimReport,
    SlimResult,
    count_flops,
    count_params,
    find_groups,
    make_random_identical,
    slim,
    verify_outputs,
    zero_group,
    zero_random_groups,
)
from slimship.slimming.ops import OpRecord, register_op

__all__ = [
    "ChannelGroup",
    "GroupSet",
    "OpRecord",
    "SlimReport",
    "SlimResult",
    "count_flops",
    "count_params",
    "find_groups",
    "make_random_identical",
    "register_op",
    "slim",
    "verify_outputs",
    "zero_group",
    "zero_random_groups",
]
