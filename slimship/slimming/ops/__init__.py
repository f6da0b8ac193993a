"""One record per op (`OpRecord`: coupling rule, value rule, size rewrite), grouped by op family.

Importing this package registers every built-in record; `register_op` adds a user's own. An op
without a record pins every dimension it touches.
"""

from slimship.slimming.ops import (  # noqa: F401 - imported for their registrations
    attention,
    conv_pool,
    elementwise,
    factories,
    indexing,
    normalisation,
    products,
    reductions,
    reparam,
    shape_view,
)
from slimship.slimming.ops.common import new_size, pin_unknown
from slimship.slimming.ops.record import (
    OPS,
    CouplingRule,
    OpRecord,
    SizeRule,
    ValueRule,
    functional_name,
    record_for,
    register_op,
    written_args,
)

__all__ = [
    "OPS",
    "CouplingRule",
    "OpRecord",
    "SizeRule",
    "ValueRule",
    "functional_name",
    "new_size",
    "pin_unknown",
    "record_for",
    "register_op",
    "written_args",
]
