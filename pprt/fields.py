"""Untrusted JSON input: strict parsing, and typed, range-checked reads of its fields.

Every JSON file pprt reads (config.json, generation_config.json, the shard
index, tokenizer_config.json, safetensors headers) goes through `parse_json`,
which accepts what RFC 8259 and serde_json (the parser of the `safetensors`
library) accept, and nothing that Python's `json` would let through beyond
it: no NaN/Infinity, no number that overflows a double (1e999, a 5,000-digit
integer), no nesting deeper than serde_json's limit, no key twice in one
object, no lone UTF-16 surrogate. Its failures are `ValueError`s; `read_json`
turns them into a CheckpointError naming the file.

`Fields` reads one JSON object the way a config is read: each read states
the type and range it expects, and a wrong value is a ConfigError naming the
file and the field (`config.json: tie_word_embeddings must be true or false,
got 'false'`). JSON booleans are never numbers and numbers never booleans.

Knows nothing about models: config.py says which fields exist.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError

# serde_json refuses a document nested 128 deep (measured with safetensors 0.8: 127 passes).
MAX_DEPTH = 127
_MISSING: Any = object()
_SHORT = reprlib.Repr()  # values in messages: bounded in length and depth
_SHORT.maxstring = _SHORT.maxother = 60


# ---- parsing ---------------------------------------------------------------------------------


def _object(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup[:80]!r} appears twice in one object")
    return obj


def _number(text: str) -> float:
    value = float(text)  # a decimal string too long for a double becomes inf, never an error
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]}{'...' if len(text) > 40 else ''} is out of range")
    return value


def _integer(text: str) -> int | float:
    _number(text)  # refuses integers beyond a double, as serde_json does (and before int() would)
    return -0.0 if text == "-0" else int(text)  # serde_json reads -0 as a float


def _constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes | str) -> Any:
    """Parse JSON text strictly (see the module docstring). Raises ValueError saying what is wrong."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data  # UnicodeDecodeError: a ValueError
    try:
        value = json.loads(text, object_pairs_hook=_object, parse_float=_number, parse_int=_integer,
                           parse_constant=_constant)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    _check_tree(value)
    return value


def _check_tree(value: Any) -> None:
    """Depth and strings of a parsed document, iteratively (a deep document must not recurse here)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            _valid_unicode(v)
        elif isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(v, dict):
                for k in v:
                    _valid_unicode(k)
                v = v.values()
            stack.extend((item, depth + 1) for item in v)


def _valid_unicode(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"string {s[:40]!r} holds a lone UTF-16 surrogate escape") from None


def read_json(path: Path) -> dict:
    """The JSON object in `path`. Raises CheckpointError naming the file when it cannot be read,
    is not strict JSON (see parse_json), or holds something other than an object."""
    try:
        data = parse_json(Path(path).read_bytes())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# ---- typed fields ----------------------------------------------------------------------------


class FieldError(ConfigError):
    """A ConfigError that already names its file and field."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Fields:
    """Typed reads of one JSON object (a config file, or a block inside one).

    where: the file, named in every error. prefix: the path of this block inside
    it ("rope_scaling."). A field that is absent or null takes the default; with
    no default it is required. Every read raises FieldError (a ConfigError)
    naming `where` and the field.
    """

    __slots__ = ("data", "where", "prefix")

    def __init__(self, data: dict | None, where: str = "config.json", prefix: str = ""):
        self.data = data if data is not None else {}
        self.where = where
        self.prefix = prefix

    def has(self, key: str) -> bool:
        """True when `key` is present and not null."""
        return self.data.get(key) is not None

    def error(self, key: str, problem: str) -> FieldError:
        """The error for field `key` (for checks a caller makes itself)."""
        return FieldError(f"{self.where}: {self.prefix}{key} {problem}")

    def _get(self, key: str, default: Any) -> Any:
        value = self.data.get(key)
        if value is None and default is _MISSING:
            raise self.error(key, "is missing")
        return value

    def _bad(self, key: str, expected: str, value: Any) -> FieldError:
        return self.error(key, f"must be {expected}, got {_SHORT.repr(value)}")

    def integer(self, key: str, default: Any = _MISSING, *, at_least: int | None = None,
                at_most: int | None = None) -> int:
        value = self._get(key, default)
        if value is None:
            return default
        if not _is_int(value) or (at_least is not None and value < at_least) or \
                (at_most is not None and value > at_most):
            raise self._bad(key, "an integer" + _range(at_least, at_most), value)
        return value

    def number(self, key: str, default: Any = _MISSING, *, above: float | None = None,
               at_least: float | None = None, at_most: float | None = None) -> float:
        """A finite JSON number (integers too), as a float."""
        value = self._get(key, default)
        if value is None:
            return default
        ok = _is_number(value) and (above is None or value > above) and \
            (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
        if not ok:
            bounds = [f"{op} {b}" for op, b in ((">", above), (">=", at_least), ("<=", at_most)) if b is not None]
            raise self._bad(key, "a finite number" + (" " + " and ".join(bounds) if bounds else ""), value)
        return float(value)

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        """A JSON boolean: the strings "false"/"true" and the numbers 0/1 are refused."""
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false (a JSON boolean)", value)
        return value

    def string(self, key: str, default: Any = _MISSING, *, choices: tuple[str, ...] | None = None) -> str:
        value = self._get(key, default)
        if value is None:
            return default
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self._bad(key, "a string" if choices is None else f"one of {', '.join(choices)}", value)
        return value

    def integers(self, key: str, default: Any = (), *, at_least: int | None = None,
                 at_most: int | None = None, single: bool = False) -> tuple[int, ...]:
        """A list of integers (or, with single=True, one integer standing for a list of one)."""
        value = self._get(key, default)
        if value is None:
            return default if default is None else tuple(default)
        items = [value] if single and _is_int(value) else value
        ok = isinstance(items, list) and all(
            _is_int(i) and (at_least is None or i >= at_least) and (at_most is None or i <= at_most) for i in items)
        if not ok:
            raise self._bad(key, ("an integer or " if single else "") + "a list of integers" +
                            _range(at_least, at_most), value)
        return tuple(items)

    def strings(self, key: str, default: Any = ()) -> tuple[str, ...]:
        """A list of strings."""
        value = self._get(key, default)
        if value is None:
            return default if default is None else tuple(default)
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise self._bad(key, "a list of strings", value)
        return tuple(value)

    def section(self, key: str) -> Fields | None:
        """The JSON object under `key` as Fields, or None when it is absent or null."""
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._bad(key, "a JSON object", value)
        return Fields(value, self.where, f"{self.prefix}{key}.")

    @contextmanager
    def naming_file(self) -> Iterator[None]:
        """Inside it, a ConfigError from a dataclass's own validation is re-raised naming this file."""
        try:
            yield
        except FieldError:
            raise
        except ConfigError as e:
            raise FieldError(f"{self.where}: {e}") from None


def _range(at_least: int | None, at_most: int | None) -> str:
    if at_least is not None and at_most is not None:
        return f" in [{at_least}, {at_most}]"
    if at_least is not None:
        return f" >= {at_least}"
    return f" <= {at_most}" if at_most is not None else ""
