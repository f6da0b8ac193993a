"""Export, calibration and release steps of the pipeline (the figures and files a bundle is made from)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slimship._util import sha256_bytes


def export_all(
    model, examples, formats, workdir: Path, stem: str, calib, evals, dynamic: bool
) -> dict[str, Any]:
    """Each format through its registry record (`FormatRecord.export`, parity checked by the exporter)."""
    from slimship.exporters.registry import ExportRequest, export_formats

    example, trace_example = examples
    request = ExportRequest(model, example, trace_example, calib, evals, dynamic)
    return export_formats(formats, request, workdir, stem)


CALIBRATION_SAMPLES = 64


def calibration_data(
    train: Any, test: Any, factory: str | None, limit: int = CALIBRATION_SAMPLES
) -> tuple[list[tuple[torch.Tensor, ...]] | None, dict[str, Any]]:
    """Calibration batches for int8 (one sample each) and their record {samples, source} for the manifest.

    The first `limit` samples of the data factory's train split (its test split when there is no train
    split); without data, the exporters calibrate on the one random example input, and the record says so.
    """
    for split, batches in (("train", train), ("test", test)):
        if batches is None:
            continue
        samples: list[tuple[torch.Tensor, ...]] = []
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple | list) else batch
            samples += [(x[i : i + 1],) for i in range(min(len(x), limit - len(samples)))]
            if len(samples) >= limit:
                break
        if samples:
            source = f"data.factory {factory}: first {len(samples)} samples of the {split} split"
            return samples, {"samples": len(samples), "source": source}
    return None, {"samples": 1, "source": "the random example input (no data factory given)"}


def write_run_release(
    config, slim_model, example, slim_result, slim_exports, accuracy, latency, source, plots, aligned, gates,
    calibration=None,
):  # fmt: skip
    from slimship.pipeline.explain import target_record
    from slimship.pipeline.release import ReleaseInputs, write_release

    rcfg = config.release
    source_bytes = b"".join(
        t.detach().contiguous().numpy().tobytes()
        for t in source.state_dict().values()
        if t.is_floating_point()
    )
    parity = {}
    files = {}
    for fmt, export in slim_exports.items():
        files[fmt] = export.path
        parity[fmt] = export.parity.record()  # on the reference inputs the bundle stores (verify re-runs)
    slimming = (
        slim_result.summary()
        | aligned
        | {
            "per_layer": {
                s.name: {"channels_before": s.channels_before, "channels_kept": s.channels_after}
                for s in slim_result.report.spaces
                if s.channels_before > 1
            },
            "layers": [
                {"name": layer.name, "before": layer.shape_before, "after": layer.shape_after}
                for layer in slim_result.report.layers
            ],
        }
    )
    inputs = ReleaseInputs(
        name=rcfg.name,
        version=rcfg.version,
        slim_module=slim_model,
        example_inputs=example,
        model_files=files,
        reference={"source_sha256": sha256_bytes(source_bytes)},
        slimming=slimming,
        parity=parity,
        accuracy=accuracy,
        latency=latency,
        config=config.to_dict(),
        extra_plots=plots,
        model_card_notes=rcfg.notes,
        gates=gates,
        calibration=calibration,
        targets={t.name: target_record(t) for t in config.target_profiles()},
    )
    return write_release(inputs, Path(rcfg.out)).bundle_dir
