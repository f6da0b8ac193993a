"""The release manifest: its JSON Schema, how it is built, validated and documented.

`manifest.json` sits at the root of a bundle directory `NAME-VERSION/` and describes every other file.
The schema (JSON Schema draft 2020-12) ships as `slimship/pipeline/manifest.schema.json`;
`schema_markdown()` renders its field descriptions as a Markdown table for the README.

Top-level fields (schema version 1.0):

- `schema_version` "1.0"; a reader accepts any 1.x.
- `name`, `version`: the release (`[A-Za-z0-9._-]+`, `1.2.3` or `1.2.3-rc1`).
- `created_by`: "slimship X.Y.Z" (no dates, so two writes of the same inputs give the same bytes).
- `files`: every file but manifest.json, sorted by path: `path`, `sha256`, `bytes`, `role`, `format`.
- `model`: `inputs` / `outputs` (name, shape, dtype), `source_sha256`, optional `layout`, `preprocessing`.
- `reference_io`: the .npz of stored inputs (in0..) and slim PyTorch outputs (out0..) used by verify.
- `slimming`: params/FLOPs before and after, `per_layer` {layer: {channels_before, channels_kept}}.
- `parity`: per model file role (plus `pt2`): `max_abs_diff`, `max_rel_diff`, `tolerance` (absolute), as
  measured when the file was made. verify re-measures them with its own bounds (the recorded tolerance
  can only tighten them) and fails a recorded max_abs_diff it cannot reproduce.
- Every path (`files[].path`, `reference_io.path`) is relative to the bundle directory (schema
  `$defs/relpath`); verify also refuses one that goes through a symlink or resolves outside the bundle.
- `accuracy`: per format/target key (`dense-torch`, `slim-onnx`, ...): metric -> value.
- `latency`: `device` and `emulated` maps, target -> p50_ms/p90_ms/p99_ms, speedup, samples, ...
  Emulated timings never appear under `device`.
- `versions`: python and the packages that made the bundle (null when not installed).
- `config`: the configuration that produced the release.
- `calibration` (optional): `samples` (int) and `source` (str) of the data int8 variants were calibrated on.
- `gates` (optional): the quality gate results decided before publishing.
- `targets` (optional): target name -> runtime, threads, affinity, xnnpack, precision, transport, emulated.
- `task` (optional, schema 1.1): "text-generation" for a decoder bundle (slimship.decoder.release); then
  it has `text_generation` (the reference decode verify replays, how the decode figures were measured,
  per file its check and figures, the tokenizer files) instead of `reference_io`.

Model files are stored at the top of the bundle, named by role and format: `model.onnx`,
`model.fp32.tflite`, `model.int8.tflite`, `model.fp32.pte` (`FormatRecord.file_name("model")`).
"""

from __future__ import annotations

import functools
import json
import math
import platform
from importlib import metadata, resources
from typing import Any

import jsonschema

from slimship._version import __version__
from slimship.errors import ReleaseError
from slimship.runtimes.speedup import disturbance, speedup_text

SCHEMA_VERSION = "1.0"
MANIFEST_NAME = "manifest.json"

# Distribution names recorded in `versions` (importlib.metadata names).
VERSION_PACKAGES = (
    "slimship",
    "torch",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "litert-torch",
    "ai-edge-litert",
    "tflite-runtime",
    "executorch",
    "safetensors",
)


@functools.cache
def load_schema() -> dict[str, Any]:
    """The manifest JSON Schema shipped with the package."""
    text = resources.files("slimship.pipeline").joinpath("manifest.schema.json").read_text("utf-8")
    return json.loads(text)


def validate_manifest(manifest: dict[str, Any], where: str = MANIFEST_NAME) -> None:
    """Raise ReleaseError listing every schema violation of `manifest` (`where` names the file)."""
    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"  {_json_path(e.absolute_path)}: {e.message}" for e in errors[:20]]
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ReleaseError(
            f"{where}: does not match the manifest schema {SCHEMA_VERSION}:\n" + "\n".join(lines) + more
        )


def _json_path(parts: Any) -> str:
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def package_versions() -> dict[str, str | None]:
    """Versions of python and the packages in VERSION_PACKAGES (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = __version__ if name == "slimship" else metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def io_record(
    input_shapes: list[list[int]],
    output_shapes: list[list[int]],
    output_names: list[str] | None,
    dynamic_batch: bool,
) -> dict[str, list[dict[str, Any]]]:
    """The manifest's `model.inputs` / `model.outputs` names and shapes as the exported files carry them:
    inputs `input`, `input_1` ..., outputs named by the model's output structure (`cls`, `box`; else
    `output`, `output_1` ...), the batch dim named `batch` when every file keeps it dynamic."""
    from slimship.exporters.onnx_export import default_names

    def specs(names: list[str], shapes: list[list[int]]) -> list[dict[str, Any]]:
        return [
            {"name": n, "shape": (["batch", *s[1:]] if dynamic_batch and s else list(s))}
            for n, s in zip(names, shapes, strict=True)
        ]

    outputs = output_names or default_names("output", len(output_shapes))
    return {
        "inputs": specs(default_names("input", len(input_shapes)), input_shapes),
        "outputs": specs(outputs, output_shapes),
    }


def finite_or_none(value: Any) -> Any:
    """Recursively replace non-finite floats (nan, inf) by None so the JSON stays valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


#: columns of a per-target latency table (model card and report); the speedup's definition is stated
#: under the table (slimship.runtimes.measure.SPEEDUP_DEFINITION)
LATENCY_HEADERS = [
    "target", "where", "variant", "p50 ms", "p90 ms", "p99 ms", "dense p50 ms", "speedup (p10-p90)",
    "efficiency",
]  # fmt: skip


def latency_rows(entries: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """One row of LATENCY_HEADERS per target, sorted by target name."""
    return [
        [
            t,
            e.get("where"),
            e.get("variant"),
            e["p50_ms"],
            e["p90_ms"],
            e["p99_ms"],
            e.get("dense_p50_ms"),
            entry_speedup_text(e),
            e.get("efficiency"),
        ]
        for t, e in sorted(entries.items())
    ]


def entry_speedup_text(entry: dict[str, Any]) -> str | None:
    """A latency entry's speedup as every table shows it (median of the pair ratios, p10-p90, and why the
    measurement was disturbed, if it was: `slimship.runtimes.speedup.disturbance`), or None without one."""
    median = entry.get("speedup")
    if median is None:
        return None
    dense, slim = entry.get("dense_p50_ms"), entry.get("p50_ms")
    p50_ratio = dense / slim if dense and slim else None
    why = disturbance(median, p50_ratio, entry.get("pairs"), entry.get("lost_pairs"), entry.get("cpu_ratio"))
    return speedup_text(median, entry.get("speedup_p10", median), entry.get("speedup_p90", median), why)


def split_latency(latency: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Sort target timings into `device` and `emulated` by each entry's `emulated` flag."""
    split: dict[str, dict[str, dict[str, Any]]] = {"device": {}, "emulated": {}}
    for target, entry in latency.items():
        if "emulated" not in entry:
            raise ReleaseError(
                f"latency[{target!r}] has no 'emulated' flag: say whether the timing was measured on the "
                "device (False) or emulated on the host (True)"
            )
        split["emulated" if entry["emulated"] else "device"][target] = dict(entry)
    return split


def schema_markdown() -> str:
    """A Markdown table of the manifest fields and their meanings, from the schema's descriptions."""
    schema = load_schema()
    rows = ["| field | type | meaning |", "| --- | --- | --- |"]
    for path, node in _walk(schema, schema, "", depth=0):
        kind = node.get("type", "")
        kind = "/".join(kind) if isinstance(kind, list) else kind
        rows.append(f"| `{path}` | {kind} | {node.get('description', '')} |")
    return "\n".join(rows) + "\n"


def _walk(schema: dict[str, Any], node: dict[str, Any], prefix: str, depth: int):
    for key, child in node.get("properties", {}).items():
        resolved = _resolve(schema, child)
        path = f"{prefix}.{key}" if prefix else key
        yield path, {**resolved, **{k: v for k, v in child.items() if k != "$ref"}}
        if depth < 2:
            yield from _walk(schema, resolved, path, depth + 1)
            extra = resolved.get("additionalProperties")
            if isinstance(extra, dict) and "properties" in _resolve(schema, extra):
                yield from _walk(schema, _resolve(schema, extra), f"{path}.<key>", depth + 1)
        items = resolved.get("items")
        if isinstance(items, dict) and depth < 2:
            yield from _walk(schema, _resolve(schema, items), f"{path}[]", depth + 1)


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if not ref:
        return node
    target: Any = schema
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return target
