"""Validate request bodies against the OpenAPI schemas, with a fast path for integer arrays.

Structure: fastjsonschema (the schema compiled to Python code, ~1 µs for a route body) decides;
only when it refuses a body does jsonschema run, to name the most relevant failing field in the
error message. Arrays of bounded integers (token ids, block hashes) can hold hundreds of
thousands of items, which either validator checks one Python object at a time; they are left
out of the compiled schema and checked here with C-level passes (`array`, `map`) against the
same bounds the schema states, falling back to an item-by-item pass only to name the bad item.
A top-level `oneOf` of `required` lists ("exactly one of these fields") is counted here too:
compiled, each failing branch costs an exception (3 µs of a route body's 4).
Ids are limited as the schema states them (`cache_plane/limits.py`), so the compiled schema
alone keeps them within the machine's byte limit.

JSON Schema's `integer` admits a number with a zero fractional part (`522.0` is the integer
522), and so do both validators; the state machine takes only ints. So a valid body's
integral floats are converted to ints (in place) wherever the schema says integer.
"""

from __future__ import annotations

import copy
from array import array
from typing import Any

import fastjsonschema
import jsonschema

from veristore_py.api import text_limit
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
        # a oneOf whose branches only require fields: which fields, and what it asks for
        one_of = light.get("oneOf", ())
        self._exactly_one: tuple[tuple[str, ...], ...] = ()
        if one_of and all(set(branch) == {"required"} for branch in one_of):
            self._exactly_one = tuple(tuple(branch["required"]) for branch in light.pop("oneOf"))
            self._one_of_says = str(light.get("description", "give exactly one of the fields"))
        self._validator = jsonschema.Draft202012Validator(light)
        self._compiled = fastjsonschema.compile(light)
        self._nested = {n: p["items"].get("x-fast", {})
                        for n, p in light.get("properties", {}).items()
                        if isinstance(p.get("items"), dict) and p["items"].get("x-fast")}
        # integer fields of the body and of the items of its arrays of objects
        self._ints = _integer_fields(SCHEMAS[name])
        self._nested_ints = {n: _integer_fields(p["items"])
                             for n, p in SCHEMAS[name].get("properties", {}).items()
                             if isinstance(p.get("items"), dict)
                             and p["items"].get("type") == "object"}

    def __call__(self, body: Any) -> dict[str, Any]:
        """Return `body` if valid, else raise InvalidCommandError naming the field."""
        try:
            self._compiled(body)
        except fastjsonschema.JsonSchemaValueException as exc:
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(body))
            if error is None:  # the two validators disagree: trust the stricter one
                raise InvalidCommandError(f"body: {exc.message}") from None
            where = "/".join(str(p) for p in error.absolute_path) or "body"
            raise InvalidCommandError(f"{where}: {_message(error)}") from None
        if self._exactly_one and sum(all(f in body for f in fields)
                                     for fields in self._exactly_one) != 1:
            raise InvalidCommandError(f"body: {self._one_of_says}")
        _check_ints(body, self._fast, "")
        _integral(body, self._ints)
        for name, fast in self._nested.items():
            for i, item in enumerate(body.get(name, [])):
                _check_ints(item, fast, f"{name}/{i}/")
        for name, fields in self._nested_ints.items():
            for item in body.get(name, []):
                _integral(item, fields)
        return body


def _message(error: jsonschema.ValidationError) -> str:
    """What `error` asks for, without the whole value where jsonschema would repeat it."""
    if error.validator == "oneOf" and "description" in error.schema:
        return str(error.schema["description"])
    if error.validator in ("anyOf", "maxLength") and "x-max-bytes" in error.schema:
        limit = error.schema["x-max-bytes"]
        return f"must be {text_limit(limit)} (a limit of {limit} bytes in UTF-8)"
    return str(error.message)


def _integer_fields(schema: dict[str, Any]) -> tuple[str, ...]:
    """The properties of an object schema that are (or may be) integers."""
    def integer(prop: dict[str, Any]) -> bool:
        return prop.get("type") == "integer" or any(integer(alt) for alt in prop.get("anyOf", ()))
    return tuple(n for n, p in schema.get("properties", {}).items() if integer(p))


def _integral(obj: dict[str, Any], fields: tuple[str, ...]) -> None:
    """Replace the integral floats the schema admitted as integers with ints (in place)."""
    for name in fields:
        value = obj.get(name)
        if type(value) is float:  # validated: its fractional part is zero
            obj[name] = int(value)


# Array type codes that hold exactly the integers in [lo, hi] (on the platforms we run on).
_TYPECODES = {(0, 2**64 - 1): "Q", (0, 2**32 - 1): "I"}


def _check_ints(obj: dict[str, Any], fast: dict[str, tuple[int, int]], where: str) -> None:
    """Check the integer arrays `fast` names; integral floats in them become ints (in place)."""
    for name, (lo, hi) in fast.items():
        values = obj.get(name)
        if values and not _all_ints_in(values, lo, hi):
            if all(type(v) in (int, float) for v in values):
                ints = [int(v) if type(v) is float and v.is_integer() else v for v in values]
                if _all_ints_in(ints, lo, hi):
                    obj[name] = ints
                    continue
                values = ints
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


VALIDATORS = {name: BodyValidator(name) for name in SCHEMAS}
