"""MODEL_CARD.md and the report's plots of a text-generation release, rendered from its manifest: what each
file is, how it was checked, what was measured on what, and how to run it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimship.pipeline.explain import target_sentence
from slimship.pipeline.model_card import md_table, md_text
from slimship.pipeline.report import GATE_HEADERS, gate_rows


def render_text_generation_card(manifest: dict[str, Any], notes: str = "") -> str:
    """Markdown model card of a text-generation bundle."""
    section = manifest["text_generation"]
    stem = f"{manifest['name']}-{manifest['version']}"
    model = manifest["model"]
    parts = [
        f"# {md_text(manifest['name'])} {manifest['version']}\n",
        f"A slim decoder ({md_text(str(model.get('architecture')))}, vocabulary {model.get('vocab_size')}, "
        f"KV heads per layer {model.get('kv_heads')}) exported with its KV cache by slimship, from the "
        f"checkpoint with sha256 `{model['source_sha256']}`.\n",
        "Verify this bundle before use (checksums, manifest schema, and a greedy decode of each file against "
        "the tokens stored at release):\n\n"
        f'```\nslimship verify {stem}\nslimship generate {stem} --prompt "Hello" --max-new-tokens 32\n```\n',
        _gates(manifest.get("gates") or []),
        _files(manifest, section),
        _checks(section),
        _decode(manifest, section),
        _tokenizer(section),
        _limits(section, notes),
    ]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _gates(gates: list[dict[str, Any]]) -> str:
    if not gates:
        return "## Quality gates\n\nNo quality gates were set.\n"
    return (
        "## Quality gates\n\nDecided before the release was published; a failing gate publishes nothing.\n\n"
        + md_table(GATE_HEADERS, gate_rows(gates))
    )


def _files(manifest: dict[str, Any], section: dict[str, Any]) -> str:
    rows = [
        [f"`{e['path']}`", name, e["precision"], e.get("max_seq_len"), e.get("bytes")]
        for name, e in sorted(section["files"].items())
    ]
    text = "## Decoder files\n\n" + md_table(["file", "format", "precision", "cache (tokens)", "bytes"], rows)
    text += (
        "\n`.pte` files: `forward(tokens[1, S], input_pos[1]) -> logits` with ExecuTorch's LLM runner "
        "metadata methods; `.onnx` files: `input_ids`, `position_ids`, `past_key_values.{i}.key/value` in, "
        "`logits`, `present.{i}.key/value` out.\n"
    )
    others = [[f"`{f['path']}`", f["role"], f["bytes"]] for f in manifest["files"]
              if f["role"] not in section["files"]]  # fmt: skip
    return text + "\n### Other files\n\n" + md_table(["file", "role", "bytes"], others)


def _checks(section: dict[str, Any]) -> str:
    ref = section["reference"]
    rows = []
    for name, e in sorted(section["files"].items()):
        if e["quantised"]:
            need = e["min_token_agreement"]
            how = f"top-1 agreement {e['token_agreement']:.3f} (verify needs at least {need})"
            if e.get("calibration_agreement") is not None:
                how += f"; {e['calibration_agreement']:.3f} on {md_text(str(e.get('calibration')))}"
        else:
            how = "greedy tokens equal" + (
                f", logits max abs diff {e['max_abs_diff']:.3g} (tolerance {e['tolerance']:.3g})"
                if e.get("max_abs_diff") is not None else ""
            )  # fmt: skip
        rows.append([name, how])
    return (
        "## How each file was checked\n\n"
        f"Reference: {md_text(ref['made_by'])}, for a prompt of "
        f"{md_text(str(ref.get('prompt_source', '')))}: `{ref['prompt']}` -> `{ref['tokens']}`. "
        "Float files must decode exactly these tokens; quantised files are fed the same sequence and "
        f"their next-token top-1 is compared at each of its {len(ref['next_tokens'])} positions. "
        "`slimship verify` repeats both.\n\n" + md_table(["format", "check at release"], rows)
    )


def _decode(manifest: dict[str, Any], section: dict[str, Any]) -> str:
    m = section["measurement"]
    target = target_sentence(m["target"], (manifest.get("targets") or {}).get(m["target"], {}))
    host = m.get("host") or {}
    text = (
        "## Decoding speed\n\n"
        f"Measured on {md_text(target)} Host: {md_text(' '.join(str(v) for v in host.values() if v))}. "
        f"{m['runs']} timed {md_text(m['what'])} (after {m['warmup']} warm-up runs): prompt "
        f"{m['prompt_len']} tokens, {m['new_tokens']} new tokens. Figures are medians with p10-p90; a "
        "speedup is the median of per-run dense/slim ratios against the dense file of the same kind. Peak "
        f"resident memory of the release process: {m['peak_rss_kb'] / 1024:.0f} MiB (it also holds the "
        "PyTorch model); the memory column is what loading a file and its first generation added to a fresh "
        "runner process of its own (its runtime imported first).\n\n"
    )
    rows = []
    for name, e in sorted(section["files"].items()):
        d = e.get("decode") or {}
        if not d:
            continue
        rows.append([
            name, _spread(d["ttft_ms"], ".2f"), _spread(d["prefill_tok_s"], ".0f"),
            _spread(d["decode_tok_s"], ".0f"), _spread(d["ms_per_token"], ".3f"),
            f"{d['rss_kb'] / 1024:.1f}" if d.get("rss_kb") is not None else "-",
            f"`{d['dense']}`" if d.get("dense") else "-",
            _spread(d["decode_speedup"], ".2f", "x") if d.get("decode_speedup") else "-",
        ])  # fmt: skip
    headers = ["format", "TTFT ms", "prefill tok/s", "decode tok/s", "ms/token", "memory MiB", "dense",
               "decode speedup"]  # fmt: skip
    return text + md_table(headers, rows)


def _spread(s: dict[str, Any], spec: str, unit: str = "") -> str:
    return f"{s['median']:{spec}}{unit} ({s['p10']:{spec}}-{s['p90']:{spec}})"


def _tokenizer(section: dict[str, Any]) -> str:
    files = section["tokenizer_files"]
    if not files:
        return (
            "## Tokenizer\n\nNone: the checkpoint folder held no tokenizer files, so `slimship generate` "
            "takes token ids (`--prompt-ids`) or `--tokenizer DIR`.\n"
        )
    names = ", ".join(f"`{n}`" for n in files)
    return (
        f"## Tokenizer and generation settings\n\nCopied byte for byte from the checkpoint folder "
        f"(checksummed in manifest.json): {names}. `slimship generate BUNDLE --prompt TEXT` reads them with "
        "`transformers.AutoTokenizer` from these local files only (no download, no remote code).\n"
    )


def _limits(section: dict[str, Any], notes: str) -> str:
    limits = [notes.strip()] if notes.strip() else []
    quantised = sorted(n for n, e in section["files"].items() if e["quantised"])
    if quantised:
        limits.append(
            "Quantised files (" + ", ".join(f"`{n}`" for n in quantised) + ") are judged by next-token "
            "agreement with the slim model, not token for token: their generations can differ from it."
        )
    limits.append(
        "Decoding speed was measured on the machine named above; another device, runtime build or thread "
        "count gives other figures."
    )
    return "## Known limits\n\n" + "".join(f"- {item}\n" for item in limits)


def decode_plots(manifest: dict[str, Any]) -> dict[str, Any]:
    """The report's extra plots: decode tokens/s per file (and the dense files'), with what was measured."""
    section = manifest["text_generation"]
    m = section["measurement"]
    labels, values = [], []
    for name, e in sorted(section["files"].items()):
        d = e.get("decode") or {}
        if d:
            labels.append(f"{name} ({Path(e['path']).name})")
            values.append(d["decode_tok_s"]["median"])
            if d.get("dense_decode_tok_s"):
                labels.append(f"dense {d['dense']}")
                values.append(d["dense_decode_tok_s"]["median"])
    if not labels:
        return {}
    caption = (
        f"median decode tokens/s on target {m['target']} ({m['threads'] or 'default'} thread(s)), prompt "
        f"{m['prompt_len']}, {m['new_tokens']} new tokens, {m['runs']} runs"
    )
    return {"Decode tokens per second": {"kind": "barh", "labels": labels, "values": values,
                                         "xlabel": "tokens/s", "caption": caption}}  # fmt: skip
