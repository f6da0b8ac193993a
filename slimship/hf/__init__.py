"""Hugging Face checkpoint folders in and out (config.json + safetensors, sharded or not).

- `load_pretrained(folder)`: the transformers model of a dense or slim folder, ready for `generate()`.
- `slimship.hf.slim.slim_checkpoint(folder, out)`: slim the model of a folder into a new folder of the
  same layout, with the per-layer sizes under the `slimship` key of its config.json (this package itself
  does not import the slimming engine, so the engine may import `for_tracing` from here).
- `LogitsOnly(model)`: the model as slimming and the exporters trace it (token ids in, logits out,
  KV cache off); `for_tracing(model)`: the same as a view with the model's own tensor names.
- `read_folder(folder)`: the checks done before anything is loaded (never unpickles by default).
"""

from slimship.hf.folder import CheckpointFolder, folder_digest, is_checkpoint_folder, read_folder
from slimship.hf.load import load_checkpoint, load_pretrained
from slimship.hf.sizes import layer_sizes
from slimship.hf.trace import DEFAULT_TOKENS, LogitsOnly, example_ids, for_tracing, is_cached_decoder

__all__ = [
    "DEFAULT_TOKENS",
    "CheckpointFolder",
    "LogitsOnly",
    "example_ids",
    "folder_digest",
    "for_tracing",
    "is_cached_decoder",
    "is_checkpoint_folder",
    "layer_sizes",
    "load_checkpoint",
    "load_pretrained",
    "read_folder",
]
