"""Validate request bodies against the OpenAPI schemas, with a fast path for integer arrays.

jsonschema checks the structure. Arrays of bounded integers (token ids, block hashes) can hold
hundreds of thousands of items, which jsonschema checks at ~6 µs each; those are checked here
in one tight loop instead, against the same bounds the schema states.
"""

from __future__ import annotations

import copy
from typing import Any

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
        self._nested = {n: p["items"].get("x-fast", {})
                        for n, p in light.get("properties", {}).items()
                        if isinstance(p.get("items"), dict) and p["items"].get("x-fast")}

    def __call__(self, body: Any) -> dict[str, Any]:
        """Return `body` if valid, else raise InvalidCommandError naming the field."""
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(body))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "body"
            raise InvalidCommandError(f"{where}: {error.message}")
        _check_ints(body, self._fast, "")
        for name, fast in self._nested.items():
            for i, item in enumerate(body.get(name, [])):
                _check_ints(item, fast, f"{name}/{i}/")
        return body


def _check_ints(obj: dict[str, Any], fast: dict[str, tuple[int, int]], where: str) -> None:
    for name, (lo, hi) in fast.items():
        values = obj.get(name)
        if values is None:
            continue
        for i, v in enumerate(values):
            if type(v) is not int or not lo <= v <= hi:
                raise InvalidCommandError(f"{where}{name}/{i}: must be an integer in [{lo}, {hi}]")


VALIDATORS = {name: BodyValidator(name) for name in SCHEMAS if name != "Error"}
