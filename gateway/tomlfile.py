"""Strict reading of TOML files: every key checked, every error naming file and line.

`tomllib` gives values but not positions, so `Locator` scans the text once for table headers
and `key =` lines to find where a key was written. `Table` wraps one parsed table and hands out
typed values; `Table.finish()` refuses any key that nobody asked for.
"""

from __future__ import annotations

import datetime as dt
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import ConfigError

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")

T = TypeVar("T")
_MISSING: Any = object()


def _unquote(name: str) -> str:
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "\"'":
        return name[1:-1]
    return name


@dataclass
class Locator:
    """Line numbers of tables and keys in one TOML text."""

    file: Path
    tables: dict[tuple[str, int], int] = field(default_factory=dict)
    keys: dict[tuple[str, int, str], int] = field(default_factory=dict)

    @classmethod
    def scan(cls, file: Path, text: str) -> Locator:
        """Index the headers and `key =` lines of `text`."""
        locator = cls(file)
        counts: dict[str, int] = {}
        current = ("", 0)
        for number, line in enumerate(text.splitlines(), start=1):
            header = _HEADER.match(line)
            if header:
                name = ".".join(_unquote(p) for p in header.group(2).split("."))
                if header.group(1) == "[[":
                    counts[name] = counts.get(name, -1) + 1
                    current = (name, counts[name])
                else:
                    current = (name, 0)
                locator.tables.setdefault(current, number)
                continue
            key = _KEY.match(line)
            if key:
                locator.keys.setdefault((*current, _unquote(key.group(1))), number)
        return locator

    def line_of(self, table: str, index: int, key: str | None) -> int | None:
        """Best known line for `key` in `table` (the table's header line if no key)."""
        if key is not None:
            found = self.keys.get((table, index, key))
            if found is not None:
                return found
            # The key may be a table written as a header: [key] or [[key]].
            child = f"{table}.{key}" if table else key
            found = self.tables.get((child, 0))
            if found is not None:
                return found
        return self.tables.get((table, index))


@dataclass
class Table:
    """One parsed TOML table, handing out checked values and remembering what was read."""

    data: dict[str, Any]
    name: str
    locator: Locator
    index: int = 0
    _used: set[str] = field(default_factory=set)

    def error(self, key: str | None, problem: str) -> ConfigError:
        """A ConfigError located at `key` of this table."""
        label = f"{self.name}.{key}" if self.name and key else (key or self.name or None)
        return ConfigError(
            problem,
            file=self.locator.file,
            line=self.locator.line_of(self.name, self.index, key),
            key=label,
        )

    def has(self, key: str) -> bool:
        """True when `key` is present."""
        return key in self.data

    def _get(self, key: str, default: Any, kind: type | tuple[type, ...], label: str) -> Any:
        self._used.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise self.error(key, "required key is missing")
            return default
        value = self.data[key]
        # bool is an int in Python; never let `true` pass as a number.
        if (isinstance(value, bool) and bool not in _as_tuple(kind)) or not isinstance(value, kind):
            raise self.error(key, f"must be {label}, not {_describe(value)}")
        return value

    def string(self, key: str, default: Any = _MISSING, *, choices: tuple[str, ...] = ()) -> str:
        """A string value, optionally one of `choices`."""
        value: str = self._get(key, default, str, "a string")
        if choices and value not in choices:
            allowed = ", ".join(f'"{c}"' for c in choices)
            raise self.error(key, f'"{value}" is not one of {allowed}')
        return value

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = None) -> int:
        """An integer value, at least `minimum` if given."""
        value: int = self._get(key, default, int, "an integer")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, not {value}")
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        """A boolean value."""
        value: bool = self._get(key, default, bool, "true or false")
        return value

    def date(self, key: str, default: Any = _MISSING) -> dt.date | None:
        """A TOML local date (2027-03-01)."""
        value = self._get(key, default, (dt.date, type(None)), "a date such as 2027-03-01")
        if isinstance(value, dt.datetime):
            raise self.error(key, "must be a plain date such as 2027-03-01, not a date-time")
        return value  # type: ignore[no-any-return]

    def strings(self, key: str, default: Any = _MISSING) -> tuple[str, ...]:
        """A list of strings."""
        value: list[Any] = self._get(key, default, list, "a list of strings")
        for item in value:
            if not isinstance(item, str):
                raise self.error(key, f"must hold only strings, not {_describe(item)}")
        return tuple(value)

    def integers(self, key: str, default: Any = _MISSING, *, minimum: int = 0) -> tuple[int, ...]:
        """A list of integers, each at least `minimum`."""
        value: list[Any] = self._get(key, default, list, "a list of integers")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int):
                raise self.error(key, f"must hold only integers, not {_describe(item)}")
            if item < minimum:
                raise self.error(key, f"values must be at least {minimum}, not {item}")
        return tuple(value)

    def table(self, key: str, *, required: bool = False) -> Table:
        """A sub-table (empty when absent and not required)."""
        child_name = f"{self.name}.{key}" if self.name else key
        value = self._get(key, _MISSING if required else {}, dict, "a table")
        return Table(value, child_name, self.locator)

    def tables(self, key: str, *, required: bool = False) -> Iterator[Table]:
        """Each table of an array of tables (`[[key]]`)."""
        child_name = f"{self.name}.{key}" if self.name else key
        value: list[Any] = self._get(key, _MISSING if required else [], list, "[[tables]]")
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(key, "must be written as [[" + child_name + "]] tables")
            yield Table(item, child_name, self.locator, index)

    def finish(self) -> None:
        """Refuse any key that was not read: a typo must never be silently ignored."""
        for key in self.data:
            if key not in self._used:
                raise self.error(key, "unknown key")

    def convert(self, key: str, raw: T, convert: Callable[[T], Any]) -> Any:
        """Apply `convert` to a value, turning ValueError into a located ConfigError."""
        try:
            return convert(raw)
        except ValueError as exc:
            raise self.error(key, str(exc)) from exc


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _describe(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


def parse_text(text: str, file: Path) -> Table:
    """Parse TOML text into a root Table; a syntax error names file and line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise ConfigError(
            f"not valid TOML: {exc}",
            file=file,
            line=int(match.group(1)) if match else None,
        ) from exc
    return Table(data, "", Locator.scan(file, text))


def read(path: Path) -> Table:
    """Read and parse a TOML file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=path) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("not UTF-8 text", file=path) from exc
    return parse_text(text, path)
