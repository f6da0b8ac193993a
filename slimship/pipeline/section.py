"""The base of every config section (and of the gates' spec): unknown keys refused, strict types, and
fields whose description is what an error message says is expected."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def spec_field(default: Any, expected: str, **constraints: Any) -> Any:
    """A field whose description is what an error message says is expected."""
    if callable(default):
        return Field(default_factory=default, description=expected, **constraints)
    return Field(default, description=expected, **constraints)


class Section(BaseModel):
    """Base of every config section: unknown keys refused, strict types, no NaN or infinite number."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
