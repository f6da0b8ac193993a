"""slimship.exporters: ONNX (with surgery passes) and TFLite/LiteRT variants, each checked against PyTorch."""

from slimship.exporters.common import ParityReport, TensorSpec
from slimship.exporters.onnx_export import OnnxExport, export_onnx, load_onnx, onnx_parity
from slimship.exporters.onnx_passes import Pass, SurgeryReport, default_passes, run_surgery
from slimship.exporters.tflite_compat import CompatReport, InterpreterResult, read_ops, tflite_compatibility
from slimship.exporters.tflite_export import (
    PARITY_BOUNDS,
    VARIANTS,
    TFLiteExport,
    export_tflite,
    tflite_parity,
)

__all__ = [
    "PARITY_BOUNDS",
    "VARIANTS",
    "CompatReport",
    "InterpreterResult",
    "OnnxExport",
    "ParityReport",
    "Pass",
    "SurgeryReport",
    "TFLiteExport",
    "TensorSpec",
    "default_passes",
    "export_onnx",
    "export_tflite",
    "load_onnx",
    "onnx_parity",
    "read_ops",
    "run_surgery",
    "tflite_compatibility",
    "tflite_parity",
]
