"""`load_pretrained`: a transformers model from a checkpoint folder, dense or slim.

transformers builds a model from `config.json`, whose sizes are the same in every layer. A slim folder
stores the shape of every tensor that slimming changed (`config.json` key `slimship.shapes`). The model
is built by transformers' own `from_pretrained` (on the meta device, no random init, safetensors read
lazily): right after the modules are made, the parameters named in `slimship.shapes` are given their
slim shapes, so the stored tensors load into them; then the size attributes the modules keep (a Linear's
`out_features`, an attention's `num_key_value_groups`, an MLP's `intermediate_size`) are set from the
weights. The model returned is an instance of the stock class, ready for `generate()`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimship.errors import ModelFileError, SlimshipError, first_line
from slimship.hf.folder import CONFIG, SLIM_KEY, CheckpointFolder, read_folder, verify_checksums
from slimship.hf.sizes import sync_sizes

log = logging.getLogger(__name__)


def load_pretrained(
    folder: str | Path,
    *,
    dtype: torch.dtype | str = "auto",
    allow_pickle: bool = False,
    check_sums: bool = True,
    attn_implementation: str | None = None,
) -> Any:
    """The transformers model stored in `folder` (a slim folder written by slimship, or any dense one).

    - `dtype`: "auto" keeps the checkpoint's dtype; a torch dtype converts.
    - `allow_pickle`: read `pytorch_model.bin` weights (with `torch.load(weights_only=True)`) when the
      folder has no safetensors; refused otherwise.
    - `check_sums`: check the files `SHA256SUMS` lists (a slim folder has one).
    - `attn_implementation`: passed to transformers ("eager", "sdpa", ...).

    Returns the model (a `transformers.PreTrainedModel` of the folder's architecture) in eval mode, with
    the per-layer sizes of a slim folder; its `config.slimship` holds those sizes. Raises ModelFileError
    naming the file, key or tensor that is missing or does not fit.
    """
    return load_checkpoint(
        read_folder(folder, allow_pickle=allow_pickle),
        dtype=dtype,
        check_sums=check_sums,
        attn_implementation=attn_implementation,
    )


def load_checkpoint(
    ckpt: CheckpointFolder,
    *,
    dtype: torch.dtype | str = "auto",
    check_sums: bool = True,
    attn_implementation: str | None = None,
) -> Any:
    """`load_pretrained` for a folder already checked by `read_folder`."""
    if check_sums:
        verify_checksums(ckpt.path)
    cls = model_class(ckpt)
    shapes = (ckpt.slim or {}).get("shapes") or {}
    builder = _with_shapes(cls, shapes, ckpt.path) if shapes else cls
    options: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        with quiet_progress():
            model, info = builder.from_pretrained(
                str(ckpt.path),
                local_files_only=True,
                use_safetensors=not ckpt.pickled,
                weights_only=True,
                dtype=dtype,
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # returned in `info` and refused below, by name
                **options,
            )
    except SlimshipError:
        raise
    except Exception as exc:  # transformers raises many kinds (OSError, ValueError, RuntimeError ...)
        raise ModelFileError(f"{ckpt.path}: transformers could not load it ({first_line(exc)})") from exc
    model.__class__ = cls  # the construction subclass only set shapes: the model is a stock instance
    _check_loading_info(ckpt, info)
    sync_sizes(model)
    return model.eval()


@contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' progress bars and its load report off (loading and writing shards), unless slimship
    runs with -v: what went wrong is said by slimship's own message (`_check_loading_info`)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if logging.getLogger().isEnabledFor(logging.INFO):
        yield
        return
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_on:
            hf_logging.enable_progress_bar()


def model_class(ckpt: CheckpointFolder) -> type:
    """The transformers class `config.json` names under `architectures` (else its causal-LM class)."""
    import transformers

    names = ckpt.config.get("architectures") or []
    for name in names if isinstance(names, list) else []:
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    try:
        config = transformers.AutoConfig.for_model(**ckpt.config)
        return transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except Exception as exc:
        raise ModelFileError(
            f"{ckpt.path / CONFIG}: architectures {names} and model_type {ckpt.config.get('model_type')!r}: "
            f"no transformers model class for them ({first_line(exc)})"
        ) from None


def _with_shapes(cls: type, shapes: dict[str, list[int]], where: Path) -> type:
    """A subclass of `cls` whose constructor gives the named parameters their slim shapes."""

    def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, config, *args, **kwargs)
        resize_tensors(self, shapes, where)

    attrs = {"__init__": __init__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    return type(cls.__name__, (cls,), attrs)


def resize_tensors(model: nn.Module, shapes: dict[str, list[int]], where: Path | str = "") -> None:
    """Replace each named parameter or buffer with an uninitialised one of its new shape (same device and
    dtype: meta while transformers builds the model), then set the modules' size attributes."""
    for name, shape in shapes.items():
        prefix, _, leaf = name.rpartition(".")
        try:
            owner = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            owner = None
        table = _tensor_table(owner, leaf)
        if table is None:
            raise ModelFileError(
                f"{Path(where) / CONFIG}: {SLIM_KEY}.shapes names {name!r}, which {type(model).__name__} "
                "does not have"
            )
        old = table[leaf]
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        table[leaf] = (
            nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
        )
    sync_sizes(model)


def _tensor_table(owner: nn.Module | None, leaf: str) -> dict[str, Any] | None:
    if owner is None:
        return None
    for table in (owner._parameters, owner._buffers):
        if table.get(leaf) is not None:
            return table
    return None


def _check_loading_info(ckpt: CheckpointFolder, info: dict[str, Any]) -> None:
    """A weight transformers had to make up (missing), or could not fit (mismatched), is an error."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [_mismatch_text(m) for m in info.get("mismatched_keys") or []]
    if missing:
        raise ModelFileError(
            f"{ckpt.path}: the weights lack {len(missing)} tensor(s) the model has, e.g. {missing[:3]} "
            "(they would be random)"
        )
    if mismatched:
        raise ModelFileError(
            f"{ckpt.path}: {len(mismatched)} tensor(s) of the wrong shape for the model of its config.json: "
            + "; ".join(mismatched[:3])
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        log.warning("%s: tensors the model does not use were ignored: %s", ckpt.path, unexpected[:5])


def _mismatch_text(entry: Any) -> str:
    """One mismatched key of transformers' loading info: (name, weights' shape, model's shape) or a name."""
    if isinstance(entry, tuple) and len(entry) == 3:
        name, held, needed = entry
        return f"{name!r} is {list(held)} in the weights, the model needs {list(needed)}"
    return repr(entry[0] if isinstance(entry, tuple) else entry)


def dense_shapes(model: Any) -> dict[str, list[int]]:
    """The shape of every state-dict tensor of a model of the same class built from its config without
    slim shapes (on the meta device: no memory, no init)."""
    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != SLIM_KEY}
    )
    with torch.device("meta"):
        dense = type(model)(config)
    return {name: list(t.shape) for name, t in dense.state_dict().items()}
