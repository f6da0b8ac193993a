"""The table printed at the end of a pipeline run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from slimship.pipeline.gates import GateResult
from slimship.pipeline.manifest import entry_speedup_text
from slimship.runtimes.measure import SPEEDUP_DEFINITION

_GATE_STYLE = {"passed": "green", "failed": "bold red", "not evaluated": "yellow", "off": "dim"}


def gate_row(table: Table, gate: GateResult) -> None:
    label = f"gate {gate.gate}" + (f" {gate.subject}" if gate.subject else "")
    figure = "" if gate.figure is None else f"{gate.figure:.4g} (limit {gate.limit:.4g})"
    style = _GATE_STYLE.get(gate.status, "")
    table.add_row(label, "", figure, f"[{style}]{gate.status}[/{style}]")


def summary_table(summary: dict[str, Any], gates: Sequence[GateResult] = ()) -> Table:
    """The short table printed at the end of a run (from its JSON summary): accuracy, then each gate, then
    sizes and timings."""
    table = Table(title="slimship summary", show_lines=False)
    table.add_column("metric")
    table.add_column("dense", justify="right")
    table.add_column("slim", justify="right")
    table.add_column("ratio", justify="right")
    acc = summary["accuracy"]
    if acc["dense"] is not None:
        table.add_row("test top-1 (torch)", f"{acc['dense']:.2f}%", f"{acc['slim']:.2f}%", "")
    else:
        table.add_row("test top-1 (torch)", "no data", "no data", "")
    for gate in gates:
        gate_row(table, gate)
    p0, p1 = summary["params"]
    f0, f1 = summary["flops"]
    table.add_row("params", f"{p0:,}", f"{p1:,}", f"{p0 / max(p1, 1):.2f}x")
    table.add_row("FLOPs", f"{f0:,}", f"{f1:,}", f"{f0 / f1:.2f}x" if f0 > 0 and f1 > 0 else "n/a")
    for fmt, (b0, b1) in summary["files"].items():
        table.add_row(f"{fmt} bytes", f"{b0:,}", f"{b1:,}", f"{b0 / max(b1, 1):.2f}x")
    for row in summary["latency"]:
        if row["emulated"]:
            table.add_row(
                f"{row['target']}/{row['format']} (emulated ARM64: parity only)", "",
                f"top-1 {row['accuracy']:.2f}%", f"max|diff| {row['max_abs_diff']:.1e}",
            )  # fmt: skip
            continue
        label = f"p50 {row['target']}/{row['format']}"
        if row.get("speedup") is None:  # timed without a dense partner
            table.add_row(label, "", f"{row['p50_ms']:.3f} ms", "")
        else:
            text = entry_speedup_text(row)
            dense_p50, slim_p50 = f"{row['dense_p50_ms']:.3f} ms", f"{row['p50_ms']:.3f} ms"
            table.add_row(label, dense_p50, slim_p50, f"speedup {text}")
            if row.get("efficiency") is not None:
                table.add_row(f"efficiency {row['target']}/{row['format']}", "", "",
                              f"{row['efficiency']:.2f} (FLOPs ratio {row['flops_ratio']:.2f})")  # fmt: skip
        if row.get("accuracy") is not None:
            table.add_row(f"top-1 {row['target']}/{row['format']}", "", f"{row['accuracy']:.2f}%", "")
    if any(row.get("speedup") is not None for row in summary["latency"]):
        table.caption = SPEEDUP_DEFINITION
    return table
