"""The body validators take exactly what the OpenAPI schemas state."""

from __future__ import annotations

import jsonschema
import pytest

from cache_plane.api.openapi import SCHEMAS
from cache_plane.api.validation import VALIDATORS
from veristore_py.api import text_fits, text_schema
from veristore_py.errors import InvalidCommandError


def test_integral_floats_are_integers_and_become_ints():
    """522.0 is valid wherever the schema says integer, and reaches the machine as an int."""
    body = VALIDATORS["KVEvents"]({"node_id": "n", "seq": 5.0, "events": [
        {"type": "stored", "block_hashes": [1.0, 2], "parent_hash": 3.0}]})
    assert body == {"node_id": "n", "seq": 5, "events": [
        {"type": "stored", "block_hashes": [1, 2], "parent_hash": 3}]}
    assert all(type(v) is int for v in (body["seq"], *body["events"][0]["block_hashes"],
                                        body["events"][0]["parent_hash"]))
    assert VALIDATORS["Route"]({"model": "m", "token_ids": [1, 2.0]})["token_ids"] == [1, 2]
    assert type(VALIDATORS["Heartbeat"]({"used_blocks": 522.0})["used_blocks"]) is int


@pytest.mark.parametrize("name, body", [
    ("Route", {"model": "m", "token_ids": [1, 2.5]}),
    ("Route", {"model": "m", "token_ids": [True]}),
    ("Route", {"model": "m", "block_hashes": [2.0**64]}),
    ("Heartbeat", {"used_blocks": 1.5}),
    ("Route", {"model": "m"}),
    ("Route", {"model": "m", "prompt": "x", "token_ids": [1]}),
])
def test_what_the_schema_refuses_is_a_400(name, body):
    """Fractions, booleans, out-of-range values and a prompt given twice or not at all."""
    assert not jsonschema.Draft202012Validator(SCHEMAS[name]).is_valid(body)
    with pytest.raises(InvalidCommandError):
        VALIDATORS[name](body)


@pytest.mark.parametrize("text", [
    "a" * 256, "a" * 257, "é" * 64, "é" * 65, "😀" * 64, "😀" * 65, "a" * 200 + "é", ""])
def test_a_byte_limited_string_is_stated_exactly(text):
    """The schema of a 256-byte string accepts exactly what the handlers' check accepts,
    and all of it fits in 256 bytes."""
    valid = jsonschema.Draft202012Validator(text_schema(256)).is_valid(text)
    assert valid == text_fits(text, 256)
    assert not valid or len(text.encode()) <= 256


def test_an_id_over_the_limit_is_named_in_the_error():
    """The 400 names the field and the limit instead of repeating the value."""
    with pytest.raises(InvalidCommandError) as info:
        VALIDATORS["Route"]({"model": "é" * 200, "token_ids": [1]})
    assert info.value.detail.startswith("model: must be at most 64 characters")
    assert "é" not in info.value.detail
