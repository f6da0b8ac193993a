"""Using a text-generation bundle: open it (checksums checked first), pick a decoder file, read its tokenizer
with `transformers.AutoTokenizer` from local files only (never downloaded, never remote code)."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

from slimship.decoder.export import DECODER_FORMATS
from slimship.errors import ConfigError, ModelFileError, first_line
from slimship.pipeline import manifest as mf
from slimship.pipeline.gates import TEXT_GENERATION
from slimship.pipeline.verify import safe_extract, verify_bundle
from slimship.pt2_checks import parse_json

TARBALL_SUFFIXES = (".tar.gz", ".tgz")
#: files copied from the checkpoint folder byte for byte, with their role in the bundle
TOKENIZER_FILES: dict[str, str] = {
    **dict.fromkeys(
        ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
         "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "chat_template.jinja",
         "chat_template.json"),
        "tokenizer",
    ),
    "generation_config.json": "generation-config",
}  # fmt: skip
MAX_TOKENIZER_CONFIG_BYTES = 16 << 20


def is_bundle(path: Path) -> bool:
    """A bundle folder (manifest.json at its top) or a bundle tarball."""
    return (path.is_dir() and (path / mf.MANIFEST_NAME).is_file()) or (
        path.is_file() and path.name.endswith(TARBALL_SUFFIXES)
    )


def open_bundle(path: Path, stack: contextlib.ExitStack) -> tuple[Path, dict[str, Any]]:
    """(bundle folder, manifest) of a text-generation bundle, after its schema and checksums are checked
    (a tarball is extracted safely into a temporary folder that `stack` removes)."""
    root = path
    if path.is_file():
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="slimship-generate-")))
        root = safe_extract(path, tmp)
    verify_bundle(root, run_parity=False)
    manifest = json.loads((root / mf.MANIFEST_NAME).read_text(encoding="utf-8"))
    if manifest.get("task") != TEXT_GENERATION:
        raise ConfigError(
            f"{path}: not a text-generation bundle (its manifest has no task {TEXT_GENERATION!r})"
        )
    return root, manifest


def pick_file(root: Path, manifest: dict[str, Any], fmt: str | None, where: Path) -> Path:
    """The file of format `fmt`, or without it the bundle's first fp32 file (in DECODER_FORMATS order)."""
    files = manifest["text_generation"]["files"]
    if fmt is not None:
        if fmt not in files:
            raise ConfigError(f"--format {fmt}: {where} holds {', '.join(sorted(files))}")
        return root / files[fmt]["path"]
    for name in DECODER_FORMATS:
        if name in files and not files[name]["quantised"]:
            return root / files[name]["path"]
    raise ConfigError(
        f"{where}: holds no fp32 decoder file; pick one with --format ({', '.join(sorted(files))})"
    )


def tokenizer_files(folder: Path | None) -> dict[str, Path]:
    """The tokenizer and generation files of a checkpoint folder (TOKENIZER_FILES); a tokenizer that names
    custom code (`auto_map`) is refused: slimship never runs code from a folder."""
    if folder is None:
        return {}
    found = {name: Path(folder) / name for name in TOKENIZER_FILES if (Path(folder) / name).is_file()}
    config = found.get("tokenizer_config.json")
    if config is not None and config.stat().st_size > MAX_TOKENIZER_CONFIG_BYTES:
        raise ModelFileError(f"{config}: larger than {MAX_TOKENIZER_CONFIG_BYTES >> 20} MiB")
    # transformers parses these with json.load: nesting is bounded here first (a RecursionError otherwise)
    parsed = {
        name: parse_json(path.read_bytes(), str(path), unique_keys=False)
        for name, path in found.items()
        if name.endswith(".json")
    }
    if config is not None:
        data = parsed["tokenizer_config.json"]
        if isinstance(data, dict) and data.get("auto_map"):
            raise ModelFileError(
                f"{config}: 'auto_map' names custom tokenizer code; slimship bundles only tokenizers "
                "transformers ships (it never runs code from a folder)"
            )
    return found


def load_tokenizer(folder: Path) -> Any:
    """`AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)`; a tokenizer
    that names custom code is refused before transformers reads it."""
    from transformers import AutoTokenizer

    found = tokenizer_files(folder)  # refuses auto_map
    if not any(TOKENIZER_ROLE_FILES & set(found)):
        raise ConfigError(f"{folder}: holds no tokenizer files ({', '.join(sorted(TOKENIZER_ROLE_FILES))})")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise ModelFileError(
            f"{folder}: transformers cannot read its tokenizer ({first_line(exc)})"
        ) from None


TOKENIZER_ROLE_FILES = frozenset(
    {"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model"}
)
