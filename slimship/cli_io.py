"""What every `slimship` command shares for its output: the console, --json, notes, gate options."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from slimship._console import note, stdout_console, user_stdout
from slimship.outputs import writing
from slimship.pipeline.gates import GATE_RULES


def gate_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The gate options given on the command line (they override the config's `gates:`)."""
    return {name: getattr(args, name) for name in GATE_RULES if getattr(args, name) is not None}


def json_to_stdout(args: argparse.Namespace) -> bool:
    return getattr(args, "json", None) == "-"


def human(args: argparse.Namespace) -> Any:
    """The console for tables and summaries: stdout, or stderr when stdout carries --json -."""
    return stdout_console(to_stderr=json_to_stdout(args))


def emit(args: argparse.Namespace, payload: Any) -> None:
    """Write the command's JSON result where --json says (nothing without --json)."""
    from slimship._util import atomic_write_bytes, dump_json

    if not getattr(args, "json", None):
        return
    text = dump_json(payload)
    if json_to_stdout(args):
        user_stdout().write(text)
        user_stdout().flush()
    else:
        with writing(Path(args.json), "--json"):
            atomic_write_bytes(args.json, text.encode())


def print_notes(messages: list[str]) -> None:
    for message in messages:
        note(message)


def jsonable(value: Any) -> Any:
    """A result as plain JSON values (records, paths, numpy figures)."""
    from slimship._util import to_jsonable

    return to_jsonable(value)


def text_generation(command: str, args: argparse.Namespace) -> int:
    """`export`/`bench`/`release --task text-generation` and `generate`: slimship.decoder.cli's commands."""
    from slimship.decoder import cli as decoder_cli

    return getattr(decoder_cli, command)(args, human(args), lambda payload: emit(args, payload))
