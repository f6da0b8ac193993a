"""Hugging Face checkpoint folders in and out (config.json + safetensors, sharded or not).

- `load_pretrained(folder)`: the transformers model of a dense or slim folder, ready for `generate()`.
- `slim_checkpoint(folder, out)`: slim the model of a folder into a new folder of the same layout, with
  the per-layer sizes under the `slimship` key of its config.json.
- `LogitsOnly(model)`: the model as slimming and the exporters trace it (token ids in, logits out,
  KV cache off).
- `read_folder(folder)`: the checks done before anything is loaded (never unpickles by default).
"""

from slimship.hf.folder import CheckpointFolder, folder_digest, is_checkpoint_folder, read_folder
from slimship.hf.load import load_checkpoint, load_pretrained
from slimship.hf.sizes import layer_sizes
from slimship.hf.slim import FolderSlimResult, slim_checkpoint, slim_loaded
from slimship.hf.trace import DEFAULT_TOKENS, LogitsOnly, example_ids

__all__ = [
    "DEFAULT_TOKENS",
    "CheckpointFolder",
    "FolderSlimResult",
    "LogitsOnly",
    "example_ids",
    "folder_digest",
    "is_checkpoint_folder",
    "layer_sizes",
    "load_checkpoint",
    "load_pretrained",
    "read_folder",
    "slim_checkpoint",
    "slim_loaded",
]
