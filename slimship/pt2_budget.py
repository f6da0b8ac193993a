"""The memory budget applied to a .pt2 (used by loading.py): the sizes its graph JSON declares, then every
node's output as it will really be, computed with fake tensors (nothing allocated) from the inputs slimship
will feed, within a time budget. Catches a node whose arguments ask for more than its metadata says (an
`aten.full` of [40000, 40000] declared as [4, 4])."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils import _pytree as pytree

from slimship.budget import check_tensor
from slimship.errors import ModelFileError, SlimshipError

GRAPH_SECONDS = 60.0  # time budget of the node-by-node check


def _itemsize(code: Any) -> int:
    from torch._export.serde.schema import ScalarType
    from torch._export.serde.serialize import deserialize_scalar_type

    try:
        return deserialize_scalar_type(ScalarType(code)).itemsize
    except (KeyError, ValueError, TypeError, AttributeError):
        return 8


def _declared_size(entry: Any) -> int:
    """One size of the graph JSON: an int, or a symbolic size's hint (1 without one)."""
    if isinstance(entry, dict):
        if "as_int" in entry:
            return int(entry["as_int"])
        hint = (entry.get("as_expr") or {}).get("hint") or {}
        if isinstance(hint, dict) and "as_int" in hint:
            return int(hint["as_int"])
    return 1


def check_declared_values(doc: dict[str, Any], where: str) -> None:
    """Every tensor the serialized graphs declare (inputs, weights, node outputs) against the budget."""
    stack: list[Any] = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            values = value.get("tensor_values")
            if isinstance(values, dict):
                for name, meta in values.items():
                    if isinstance(meta, dict) and isinstance(meta.get("sizes"), list):
                        try:
                            sizes = [_declared_size(s) for s in meta["sizes"]]
                        except (TypeError, ValueError):
                            raise ModelFileError(
                                f"{where}: tensor {str(name)[:80]!r} has invalid sizes"
                            ) from None
                        what = f"tensor {str(name)[:80]!r}"
                        check_tensor(where, what, sizes, _itemsize(meta.get("dtype")))
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


class _Refused(Exception):
    """Stops the fake run at the first node over the budget or past the deadline (raised as `error`)."""

    def __init__(self, error: SlimshipError) -> None:
        super().__init__(str(error))
        self.error = error


class _Budgeted(torch.fx.Interpreter):
    """Runs a graph on fake tensors and checks each node's output against the budget and the deadline."""

    def __init__(self, module: torch.fx.GraphModule, where: str, seconds: float) -> None:
        super().__init__(module)
        self.where, self.seconds = where, seconds
        self.deadline = time.monotonic() + seconds

    def run_node(self, n: torch.fx.Node) -> Any:
        if time.monotonic() > self.deadline:
            raise _Refused(
                ModelFileError(
                    f"{self.where}: checking the graph's node sizes took over {self.seconds:.0f} s (stopped "
                    f"at node {n.name!r}); the program is too large to check"
                )
            )
        result = super().run_node(n)
        for leaf in pytree.tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                try:
                    check_tensor(self.where, f"node {n.name!r} ({n.target})", leaf.shape, leaf.element_size())
                except SlimshipError as exc:
                    raise _Refused(exc) from None
        return result


def check_node_outputs(
    module: torch.nn.Module, shapes: list[tuple[tuple[int, ...], torch.dtype]], where: str,
    seconds: float = GRAPH_SECONDS,
) -> None:  # fmt: skip
    """Run `module` (a GraphModule) on fake inputs of `shapes`: every node's real output size is checked
    against the budget without allocating it. A node the fake run cannot evaluate is left to the real run."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not isinstance(module, torch.fx.GraphModule):
        return
    refused = None
    with FakeTensorMode(allow_non_fake_inputs=True):
        fakes = [torch.empty(shape, dtype=dtype) for shape, dtype in shapes]  # fake: nothing allocated
        try:
            _Budgeted(module, where, seconds).run(*fakes)
        except _Refused as exc:
            refused = exc.error
        except Exception:  # an op fake tensors cannot run: the real run names it
            return
    if refused is not None:
        raise refused
