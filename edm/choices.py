"""Named choices and option schemas: how a config names a library object and its options.

Every registry of the project (schedules, discretizations, precond and loss kinds, solvers,
network presets, data sets, output formats, ...) is a read-only mapping from a name to what
it stands for; `choose` looks a name up and, for an unknown one, raises a ValueError that
names the setting, the bad value, every valid one and the ones close to it. `options_schema` makes a config group's
dataclass from the keyword arguments of what it configures, so each default is written once.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, TypeVar

__all__ = ["choose", "check_choice", "keyword_defaults", "options_schema"]

T = TypeVar("T")


def _not_valid(what: str, name: Any, valid: Iterable[Any]) -> ValueError:
    names = [str(option) for option in valid]
    close = difflib.get_close_matches(name, names, n=2) if isinstance(name, str) else []
    meant = f" (did you mean {' or '.join(close)}?)" if close else ""
    return ValueError(f"{what} {name!r} is not valid; choose one of: {', '.join(names)}{meant}")


def choose(table: Mapping[str, T], name: Any, what: str) -> T:
    """table[name]; ValueError "WHAT 'NAME' is not valid; choose one of: A, B, ... (did you mean B?)" otherwise."""
    try:
        return table[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value such as a list
        raise _not_valid(what, name, table) from None


def check_choice(valid: Iterable[Any], value: Any, what: str) -> None:
    """The error of `choose` when `value` is not one of `valid` (names without a table behind them)."""
    valid = tuple(valid)
    if value not in valid:
        raise _not_valid(what, value, valid)


def keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """{name: default} of the parameters of `fn` (a function or class) that have one: the library's values."""
    return {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.default is not p.empty}


def options_schema(
    name: str, target: Callable[..., Any], doc: str, *, skip: Iterable[str] = (), unset: Iterable[str] = (),
    module: str | None = None,
) -> type:
    """A dataclass whose fields are `target`'s keyword parameters with their types and defaults.

    Parameters in `skip` are left out; those in `unset` default to None (resolved by the
    code that builds the object, e.g. edm.training.build). `module` is where the schema is
    defined (its pickling and repr name), by default the target's.
    """
    module = module or target.__module__
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) and not dataclasses.is_dataclass(target) else target)
    fields = []
    for p in inspect.signature(target).parameters.values():
        if p.name in skip or p.default is p.empty:
            continue
        fields.append((p.name, Optional[hints[p.name]], None) if p.name in unset else (p.name, hints[p.name], p.default))
    return dataclasses.make_dataclass(name, fields, namespace={"__doc__": doc, "__module__": module})
