"""slimship: slim structurally-sparse PyTorch models, export them, and prove the speedup on targets.

The names below are imported when first used (PEP 562), so `import slimship` alone stays light: the
command's entry (`slimship._entry`) can set up its Ctrl-C handling before torch and the exporters load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from slimship._version import __version__
from slimship.errors import (
    CompressionError,
    ConfigError,
    DeviceError,
    ExportError,
    ModelFileError,
    ReleaseError,
    SlimmingError,
    SlimshipError,
    TargetError,
    VerificationError,
)

if TYPE_CHECKING:
    from slimship.hf import load_pretrained
    from slimship.hf.slim import slim_checkpoint
    from slimship.slimming import (
        SlimResult,
        find_groups,
        make_random_identical,
        register_op,
        slim,
        zero_random_groups,
    )

#: public name -> the module it lives in (imported on first use)
_LAZY = {
    "load_pretrained": "slimship.hf",
    "slim_checkpoint": "slimship.hf.slim",
    "SlimResult": "slimship.slimming",
    "find_groups": "slimship.slimming",
    "make_random_identical": "slimship.slimming",
    "register_op": "slimship.slimming",
    "slim": "slimship.slimming",
    "zero_random_groups": "slimship.slimming",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'slimship' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CompressionError",
    "ConfigError",
    "DeviceError",
    "ExportError",
    "ModelFileError",
    "ReleaseError",
    "SlimResult",
    "SlimmingError",
    "SlimshipError",
    "TargetError",
    "VerificationError",
    "__version__",
    "find_groups",
    "load_pretrained",
    "make_random_identical",
    "register_op",
    "slim",
    "slim_checkpoint",
    "zero_random_groups",
]
