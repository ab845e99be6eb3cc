"""Named choices: the one lookup that turns a name from a config or a call into its table entry.

Every registry of the project (schedules, discretizations, precond and loss kinds, solvers,
network presets, data sets, output formats, ...) is a read-only mapping from a name to what
it stands for; `choose` looks a name up and, for an unknown one, raises a ValueError that
names the setting, the bad value and every valid one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

__all__ = ["choose", "check_choice"]

T = TypeVar("T")


def _not_valid(what: str, name: Any, valid: Iterable[Any]) -> ValueError:
    return ValueError(f"{what} {name!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def choose(table: Mapping[str, T], name: Any, what: str) -> T:
    """table[name]; ValueError "WHAT 'NAME' is not valid; choose one of: A, B, ..." otherwise."""
    try:
        return table[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value such as a list
        raise _not_valid(what, name, table) from None


def check_choice(valid: Iterable[Any], value: Any, what: str) -> None:
    """The error of `choose` when `value` is not one of `valid` (names without a table behind them)."""
    valid = tuple(valid)
    if value not in valid:
        raise _not_valid(what, value, valid)
