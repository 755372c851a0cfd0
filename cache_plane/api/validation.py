"""Validate request bodies against the OpenAPI schemas, with a fast path for integer arrays.

Structure: fastjsonschema (the schema compiled to Python code, ~1 µs for a route body) decides;
only when it refuses a body does jsonschema run, to name the most relevant failing field in the
error message. Arrays of bounded integers (token ids, block hashes) can hold hundreds of
thousands of items, which either validator checks one Python object at a time; they are left
out of the compiled schema and checked here with C-level passes (`array`, `map`) against the
same bounds the schema states, falling back to an item-by-item pass only to name the bad item.
Strings marked `x-max-bytes` (ids: see `cache_plane/limits.py`) are also checked in UTF-8
bytes, which JSON Schema cannot express.
"""

from __future__ import annotations

import copy
from array import array
from typing import Any

import fastjsonschema
import jsonschema

from veristore_py.errors import InvalidCommandError

from .openapi import SCHEMAS


def _split(schema: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[int, int]]]:
    """Copy `schema` without the items of top-level integer arrays; return their bounds."""
    light = copy.deepcopy(schema)
    fast: dict[str, tuple[int, int]] = {}
    for name, prop in light.get("properties", {}).items():
        items = prop.get("items", {}) if prop.get("type") == "array" else {}
        if items.get("type") == "integer":
            fast[name] = (items["minimum"], items["maximum"])
            del prop["items"]
        elif items.get("type") == "object":
            prop["items"] = _split(items)[0] | {"x-fast": _split(items)[1]}
    return light, fast


class BodyValidator:
    """Validator for one named schema."""

    def __init__(self, name: str) -> None:
        self.name = name
        light, self._fast = _split(SCHEMAS[name])
        self._validator = jsonschema.Draft202012Validator(light)
        self._compiled = fastjsonschema.compile(light)
        self._nested = {n: p["items"].get("x-fast", {})
                        for n, p in light.get("properties", {}).items()
                        if isinstance(p.get("items"), dict) and p["items"].get("x-fast")}
        # field -> byte limit, for strings (and arrays of strings) marked x-max-bytes
        self._bytes = {n: (p.get("x-max-bytes") or p.get("items", {}).get("x-max-bytes"))
                       for n, p in SCHEMAS[name].get("properties", {}).items()
                       if p.get("x-max-bytes") or (isinstance(p.get("items"), dict)
                                                   and p["items"].get("x-max-bytes"))}

    def __call__(self, body: Any) -> dict[str, Any]:
        """Return `body` if valid, else raise InvalidCommandError naming the field."""
        try:
            self._compiled(body)
        except fastjsonschema.JsonSchemaValueException as exc:
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(body))
            if error is None:  # the two validators disagree: trust the stricter one
                raise InvalidCommandError(f"body: {exc.message}") from None
            where = "/".join(str(p) for p in error.absolute_path) or "body"
            raise InvalidCommandError(f"{where}: {error.message}") from None
        _check_ints(body, self._fast, "")
        for field, limit in self._bytes.items():
            value = body.get(field)
            for i, text in enumerate(value if isinstance(value, list) else [value]):
                if isinstance(text, str) and len(text.encode()) > limit:
                    where = f"{field}/{i}" if isinstance(value, list) else field
                    raise InvalidCommandError(f"{where}: is {len(text.encode())} bytes in "
                                              f"UTF-8; the limit is {limit}")
        for name, fast in self._nested.items():
            for i, item in enumerate(body.get(name, [])):
                _check_ints(item, fast, f"{name}/{i}/")
        return body


# Array type codes that hold exactly the integers in [lo, hi] (on the platforms we run on).
_TYPECODES = {(0, 2**64 - 1): "Q", (0, 2**32 - 1): "I"}


def _check_ints(obj: dict[str, Any], fast: dict[str, tuple[int, int]], where: str) -> None:
    for name, (lo, hi) in fast.items():
        values = obj.get(name)
        if values and not _all_ints_in(values, lo, hi):
            for i, v in enumerate(values):
                if type(v) is not int or not lo <= v <= hi:
                    raise InvalidCommandError(
                        f"{where}{name}/{i}: must be an integer in [{lo}, {hi}]")


def _all_ints_in(values: list[Any], lo: int, hi: int) -> bool:
    """True if every value is an int (not a bool) in [lo, hi]; C-level passes only."""
    if set(map(type, values)) != {int}:
        return False
    code = _TYPECODES.get((lo, hi))
    if code is None or array(code).itemsize * 8 != (hi + 1).bit_length() - 1:
        return lo <= min(values) and max(values) <= hi
    try:
        array(code, values)
    except OverflowError:
        return False
    return True


VALIDATORS = {name: BodyValidator(name) for name in SCHEMAS if name != "Error"}
