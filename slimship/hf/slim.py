"""Slim a checkpoint folder into a new one: load, trace without the cache, slim, write, reload, check."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimship.compare import compare
from slimship.errors import VerificationError
from slimship.hf.folder import CheckpointFolder, read_folder
from slimship.hf.load import load_checkpoint
from slimship.hf.sizes import sync_sizes
from slimship.hf.trace import DEFAULT_TOKENS, LogitsOnly, example_ids
from slimship.hf.write import check_new_folder, write_folder
from slimship.slimming import SlimResult, slim, verify_outputs

RELOAD_RTOL = 1e-5  # the folder loaded back runs the same weights through the same code
RELOAD_FLOOR = 1e-8


@dataclass
class FolderSlimResult:
    """What `slim_checkpoint` wrote: the folder, the slimming summary and the bytes on disk."""

    out: Path
    source: Path
    summary: dict[str, Any]  # SlimResult.summary(): params, FLOPs, bytes, channels, verification
    weight_bytes_before: int
    weight_bytes_after: int
    layers: dict[str, dict[str, int]] = field(default_factory=dict)  # per-layer sizes written
    reload_max_abs_diff: float = 0.0  # the written folder loaded back vs the slim model

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "source": str(self.source),
            "weight_bytes_before": self.weight_bytes_before,
            "weight_bytes_after": self.weight_bytes_after,
            "reload_max_abs_diff": self.reload_max_abs_diff,
            "layers": self.layers,
            "summary": self.summary,
        }


def slim_checkpoint(
    folder: str | Path,
    out: str | Path,
    *,
    tokens: int = DEFAULT_TOKENS,
    allow_pickle: bool = False,
    channel_multiple: int | None = None,
) -> FolderSlimResult:
    """Slim the transformers model in checkpoint `folder` and write it to the new folder `out`.

    The model is traced as `LogitsOnly` (no KV cache) on `tokens` random token ids; `load_pretrained(out)`
    gives it back with its per-layer sizes. `out` must not exist; nothing is left there on failure.
    """
    check_new_folder(Path(out))
    ckpt = read_folder(folder, allow_pickle=allow_pickle)
    model = load_checkpoint(ckpt)
    wrapper = LogitsOnly(model)
    return slim_loaded(ckpt, wrapper, (example_ids(model.config, tokens),), Path(out), channel_multiple)


def _apply(result: SlimResult, wrapper: LogitsOnly, example: tuple[Any, ...]) -> None:
    """Write the slim tensors into the model's own modules, set their per-layer sizes, and check the
    model's forward against the slim graph."""
    try:
        result.apply_to(wrapper, example)
        failed = None
    except VerificationError as exc:  # a module reads a size from the shared config (Phi-3's fused qkv)
        failed = exc
    sync_sizes(wrapper.model)
    check = verify_outputs(result.model, wrapper, example)
    if not check.passed:
        raise failed or VerificationError(
            f"the slim model's own modules do not match the slim graph ({check.reason}); it may hard-code "
            "a size slimming changed"
        )


def slim_loaded(
    ckpt: CheckpointFolder,
    wrapper: LogitsOnly,
    example: tuple[Any, ...],
    out: Path,
    channel_multiple: int | None = None,
) -> FolderSlimResult:
    """`slim_checkpoint` for a model already loaded from `ckpt` and wrapped for tracing (slimmed in place).

    The model is ours (loaded from the folder), so each dense tensor is released as its slim one is made
    (`release_source=True`): the peak stays near one copy of the weights."""
    check_new_folder(out)
    result = slim(wrapper, example, channel_multiple=channel_multiple, release_source=True)
    _apply(result, wrapper, example)
    summary = result.summary()
    del result
    batches = [example, (example_ids(wrapper.model.config, example[0].shape[-1], seed=1),)]
    with torch.no_grad():
        expected = [wrapper(*batch) for batch in batches]
    diffs: list[float] = []

    def check(staging: Path) -> None:
        reloaded = LogitsOnly(load_checkpoint(read_folder(staging)))
        with torch.no_grad():
            got = [reloaded(*batch) for batch in batches]
        result = compare(expected, got, RELOAD_RTOL, floor=RELOAD_FLOOR)
        if not result.passed:
            raise VerificationError(
                f"{out}: the slim folder loaded back does not give the slim model's outputs ({result.reason})"
            )
        diffs.append(result.max_abs_diff)

    extra = {"params_before": summary["params_before"], "params_after": summary["params_after"]}
    write_folder(wrapper.model, ckpt, out, extra=extra, check=check)
    written = read_folder(out)
    return FolderSlimResult(
        out=out,
        source=ckpt.path,
        summary=summary,
        weight_bytes_before=ckpt.weight_bytes(),
        weight_bytes_after=written.weight_bytes(),
        layers=(written.slim or {}).get("layers", {}),
        reload_max_abs_diff=diffs[0] if diffs else 0.0,
    )
