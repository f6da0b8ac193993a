"""Value analysis: run each op's value rule (`slimship.slimming.ops`) over the graph.

Facts (`slimship.slimming.facts`) come from parameter values and flow through the value rules of the
op records; an op without a value rule proves nothing. Only dims in removable components are analysed.
"""

from __future__ import annotations

from slimship.slimming.facts import DimFacts, Facts, FactStore, relabel, row_inverse
from slimship.slimming.graph import ChannelGraph, op_args, op_name, pin_touched
from slimship.slimming.ops import record_for

__all__ = ["DimFacts", "Facts", "ValueAnalysis", "relabel", "row_inverse"]


class ValueAnalysis(FactStore):
    """Runs the value rules over the graph, given the solved channel graph."""

    def __init__(self, g: ChannelGraph) -> None:
        super().__init__(g)
        failed = False
        for node in self.gm.graph.nodes:
            if node.op == "call_function":
                self.facts[node] = None
                record = record_for(op_name(node))
                if record is None or record.values is None:
                    continue
                try:
                    self.facts[node] = record.values(self, node, op_args(node))
                except Exception as exc:  # a rule that cannot read its node proves nothing and pins it
                    pin_touched(g, node, g.record_unreadable(node, "values", exc))
                    failed = True
        if failed:
            g.solve()  # pinning only shrinks what is live: facts found so far stay true
