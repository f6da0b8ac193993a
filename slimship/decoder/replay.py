"""Replaying the reference decode a text-generation bundle stores (`slimship verify`, and the release that
writes the figures verify later compares with).

The reference is transformers' greedy `generate()` on the slim model for a fixed prompt: its new tokens
(`tokens`) and the model's top-1 next token at every position of `prompt + tokens[:-1]` (`next_tokens`).
A float file must decode exactly `tokens` (greedy, through the runner `slimship generate` uses); a
quantised file is fed `prompt + tokens[:-1]` (teacher forcing) and its top-1 at each position must agree
with `next_tokens` at least `min_token_agreement` of the time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimship.errors import ReleaseError, SlimshipError


@dataclasses.dataclass
class ReplayCheck:
    """One file's replay of the stored reference decode."""

    role: str
    path: str
    quantised: bool
    tokens: list[int]  # what the file decoded now (greedy)
    agreement: float  # next-token top-1 agreement with the reference along prompt + tokens[:-1]
    positions: int
    min_agreement: float | None  # quantised files: the smallest agreement accepted
    first_difference: int | None  # float files: first new token that differs; quantised: first position
    ok: bool
    reason: str = ""


def first_difference(actual: Sequence[int], expected: Sequence[int]) -> int | None:
    """The first index where the sequences differ (a length difference counts), or None."""
    for i, (a, b) in enumerate(zip(actual, expected)):
        if int(a) != int(b):
            return i
    return None if len(actual) == len(expected) else min(len(actual), len(expected))


def teacher_forced_top1(decoder: Any, prompt: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
    """The decoder's top-1 next token at every position of `prompt + tokens[:-1]`, in one call."""
    from slimship.decoder.runner import check_room, check_tokens

    sequence = [*map(int, prompt), *map(int, tokens[:-1])]
    check_room(decoder.info, len(prompt), max(len(tokens), 1), "reference decode")
    check_tokens(sequence, decoder.info.vocab_size, "reference decode")
    decoder.reset()
    return np.asarray(decoder.forward(sequence, 0)).argmax(axis=1)


def token_agreement(
    decoder: Any, prompt: Sequence[int], tokens: Sequence[int], next_tokens: Sequence[int]
) -> tuple[float, int, int | None]:
    """(agreement, positions, first differing position) of the decoder's top-1 with `next_tokens`."""
    top1 = teacher_forced_top1(decoder, prompt, tokens)
    expected = np.asarray(next_tokens, dtype=np.int64)
    if top1.shape != expected.shape:
        raise ReleaseError(
            f"reference decode: next_tokens holds {expected.size} ids, prompt + tokens[:-1] has {top1.size} "
            "positions; the manifest was edited"
        )
    same = top1 == expected
    first = None if same.all() else int(np.argmin(same))
    return float(same.mean()), int(same.size), first


def replay_file(
    path: Path, role: str, entry: dict[str, Any], reference: dict[str, Any], where: str
) -> ReplayCheck:
    """Decode the stored prompt with the file at `path` and judge it (see the module doc)."""
    from slimship.decoder.runner import greedy, open_decoder

    prompt, expected = list(reference["prompt"]), list(reference["tokens"])
    quantised = bool(entry["quantised"])
    try:
        decoder = open_decoder(path, 1)
        run = greedy(decoder, prompt, len(expected))
        rate, positions, first_pos = token_agreement(decoder, prompt, expected, reference["next_tokens"])
    except ReleaseError:
        raise
    except SlimshipError as exc:
        raise ReleaseError(f"{where}: the reference decode does not run ({exc})") from None
    except Exception as exc:
        raise ReleaseError(f"{where}: could not load or run it ({type(exc).__name__}: {exc})") from exc
    check = ReplayCheck(role, entry["path"], quantised, run.tokens, rate, positions,
                        entry.get("min_token_agreement"), None, True)  # fmt: skip
    if not quantised:
        check.first_difference = first_difference(run.tokens, expected)
        if check.first_difference is not None:
            i = check.first_difference
            got = run.tokens[i] if i < len(run.tokens) else "end"
            want = expected[i] if i < len(expected) else "end"
            check.ok = False
            check.reason = (
                f"greedy tokens differ from the stored reference at new token {i} ({got} vs {want}): "
                f"{run.tokens} vs {expected}"
            )
        return check
    check.first_difference = first_pos
    limit = check.min_agreement
    if not isinstance(limit, int | float):
        check.ok, check.reason = False, "the manifest records no min_token_agreement for this quantised file"
    elif rate < limit:
        check.ok = False
        check.reason = (
            f"next-token top-1 agreement {rate:.3f} with the stored reference < {limit} on {positions} "
            f"positions (first differing position {first_pos})"
        )
    return check
