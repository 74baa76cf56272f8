"""The list of command groups. Add one line per group module."""

from __future__ import annotations

import typer


def all_groups() -> list[tuple[str, typer.Typer, str]]:
    groups: list[tuple[str, typer.Typer, str]] = []
    return groups
