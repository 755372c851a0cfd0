"""Typed errors: a refused command carries its code as a field; one table gives each status."""

from __future__ import annotations

import pytest

from cache_plane.errors import STATUS, CachePlaneError
from veristore_py.api import http_status
from veristore_py.errors import (
    CommandRejectedError,
    CommitTimeoutError,
    InvalidCommandError,
    NoLeaderError,
)
from veristore_py.proposals import check as _check


def test_a_refused_command_raises_its_code_and_detail_as_fields():
    """The machine's {ok: false} becomes an error whose fields need no parsing."""
    with pytest.raises(CommandRejectedError) as info:
        _check({"ok": False, "error": "node_mismatch", "detail": "routed to 'a': not 'b'"})
    exc = info.value
    assert (exc.reason, exc.reason_detail) == ("node_mismatch", "routed to 'a': not 'b'")
    # on the generic KV API's wire it is the invalid_request it always was
    assert isinstance(exc, InvalidCommandError) and exc.code == "invalid_request"
    assert exc.detail == "node_mismatch: routed to 'a': not 'b'" and exc.definite
    assert _check({"ok": True, "x": 1}) == {"ok": True, "x": 1}


def test_one_table_gives_every_domain_code_its_status():
    """Codes map through cache_plane.errors.STATUS; types through veristore_py.api's table."""
    assert http_status(CachePlaneError("no_room", "full", candidates=[])) == 503
    assert http_status(CachePlaneError("prompt_too_large", "too big")) == 413
    assert http_status(CachePlaneError("unknown_node", "who")) == 404
    assert http_status(CachePlaneError("node_mismatch", "elsewhere")) == 409
    assert http_status(CachePlaneError("some_new_refusal", "?")) == 400
    assert http_status(CommandRejectedError("invalid_command", "bad")) == 400
    assert http_status(NoLeaderError()) == 503 and http_status(CommitTimeoutError()) == 504
    assert CachePlaneError("no_room", "x", candidates=[1]).extra == {"candidates": [1]}
    assert all(400 <= status < 600 for status in STATUS.values())
