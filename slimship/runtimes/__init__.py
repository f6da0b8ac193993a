"""slimship.runtimes: runners, targets, transports, measurements (only torch_runner imports torch)."""

from slimship.runtimes import arm64_emu as _arm64_emu  # noqa: F401  (registers qemu-aarch64://)
from slimship.runtimes.alignment import (
    AlignmentResult,
    favoured_multiple,
    measure_alignment,
    measure_alignment_kinds,
    multiple_for_kinds,
    op_kinds,
    round_channels_up,
)
from slimship.runtimes.measure import (
    BenchResult,
    LatencyStats,
    Measurement,
    Parity,
    Speedup,
    bench,
    format_bench_table,
    measure,
    measure_speedup,
)
from slimship.runtimes.runners import LiteRTRunner, OnnxRuntimeRunner, Runner, runner_for
from slimship.runtimes.targets import BUILTIN_TARGETS, SshOptions, Target, get_target, load_targets
from slimship.runtimes.transports import RunResult, Transport, open_transport, register_transport

__all__ = [
    "BUILTIN_TARGETS",
    "AlignmentResult",
    "BenchResult",
    "LatencyStats",
    "LiteRTRunner",
    "Measurement",
    "OnnxRuntimeRunner",
    "Parity",
    "RunResult",
    "Runner",
    "Speedup",
    "SshOptions",
    "Target",
    "Transport",
    "bench",
    "favoured_multiple",
    "format_bench_table",
    "get_target",
    "load_targets",
    "measure",
    "measure_alignment",
    "measure_alignment_kinds",
    "measure_speedup",
    "multiple_for_kinds",
    "op_kinds",
    "open_transport",
    "register_transport",
    "round_channels_up",
    "runner_for",
]
