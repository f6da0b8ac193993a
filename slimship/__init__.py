"""slimship: slim structurally-sparse PyTorch models, export them, and prove the speedup on targets."""

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
from slimship.hf import load_pretrained
from slimship.hf.slim import slim_checkpoint
from slimship.slimming import (
    SlimResult,
    find_groups,
    make_random_identical,
    slim,
    zero_random_groups,
)

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
    "slim",
    "slim_checkpoint",
    "zero_random_groups",
]
