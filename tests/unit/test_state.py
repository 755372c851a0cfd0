"""Unit tests of the pure KV machine (state.py) over a dict reader."""

from __future__ import annotations

import ast
import pathlib

import pytest

from veristore_py.state import ApplyContext, KVMachine

M = KVMachine()


def run(reader, command, index=10, position=0, stamp=1000):
    outcome = M.apply(command, reader, ApplyContext(index, position, stamp))
    reader.write(outcome.mutations)
    return outcome.result


def test_put_then_get_returns_value_and_revision(dict_reader):
    """A put is visible to a later get with the put's revision."""
    put = run(dict_reader, {"op": "put", "key": b"a", "value": b"1"}, index=3)
    got = run(dict_reader, {"op": "get", "key": b"a"})
    assert put["ok"] and got == {"ok": True, "found": True, "value": b"1",
                                 "revision": put["revision"]}


def test_get_missing_key_reports_not_found(dict_reader):
    """A get of an absent key is ok with found False."""
    assert run(dict_reader, {"op": "get", "key": b"x"})["found"] is False


def test_delete_reports_whether_something_was_deleted(dict_reader):
    """Deleting an absent key is a no-op; deleting a present one removes it."""
    assert run(dict_reader, {"op": "delete", "key": b"a"})["deleted"] is False
    run(dict_reader, {"op": "put", "key": b"a", "value": b"1"})
    assert run(dict_reader, {"op": "delete", "key": b"a"})["deleted"] is True
    assert run(dict_reader, {"op": "get", "key": b"a"})["found"] is False


def test_cas_succeeds_only_on_expected_value(dict_reader):
    """CAS compares against the current value (None = absent) and swaps atomically."""
    assert run(dict_reader, {"op": "cas", "key": b"k", "expected": None, "value": b"1"})["succeeded"]
    failed = run(dict_reader, {"op": "cas", "key": b"k", "expected": None, "value": b"2"})
    assert failed["succeeded"] is False and failed["current"] == b"1"
    assert run(dict_reader, {"op": "cas", "key": b"k", "expected": b"1", "value": None})["succeeded"]
    assert run(dict_reader, {"op": "get", "key": b"k"})["found"] is False


def test_scan_returns_prefix_in_order_with_paging(dict_reader):
    """Scan yields keys under the prefix, sorted, and pages with `after`."""
    for key in [b"a/2", b"a/1", b"b/1", b"a/3"]:
        run(dict_reader, {"op": "put", "key": key, "value": key})
    page = run(dict_reader, {"op": "scan", "prefix": b"a/", "limit": 2})
    assert [i[0] for i in page["items"]] == [b"a/1", b"a/2"] and page["more"]
    rest = run(dict_reader, {"op": "scan", "prefix": b"a/", "after": b"a/2", "limit": 2})
    assert [i[0] for i in rest["items"]] == [b"a/3"] and not rest["more"]


def test_idempotency_key_replays_first_result(dict_reader):
    """A retried write with the same idempotency key returns the first result, applies once."""
    first = run(dict_reader, {"op": "cas", "key": b"k", "expected": None, "value": b"1", "idem": b"i1"})
    again = run(dict_reader, {"op": "cas", "key": b"k", "expected": None, "value": b"1", "idem": b"i1"},
                index=11)
    assert first["succeeded"] and again["succeeded"] and again["replayed"]


def test_idempotency_key_reuse_on_other_key_is_rejected(dict_reader):
    """Reusing an idempotency key for a different key is an error, not a silent replay."""
    run(dict_reader, {"op": "put", "key": b"a", "value": b"1", "idem": b"i"})
    result = run(dict_reader, {"op": "put", "key": b"b", "value": b"1", "idem": b"i"})
    assert result["error"] == "idempotency_key_reused"


def test_prune_idem_drops_only_older_records(dict_reader):
    """prune_idem removes records stamped before the leader's cut-off."""
    run(dict_reader, {"op": "put", "key": b"a", "value": b"1", "idem": b"old"}, stamp=100)
    run(dict_reader, {"op": "put", "key": b"a", "value": b"2", "idem": b"new"}, stamp=900)
    assert run(dict_reader, {"op": "prune_idem", "before_ms": 500})["pruned"] == 1
    assert run(dict_reader, {"op": "put", "key": b"a", "value": b"3", "idem": b"new"})["replayed"]


@pytest.mark.parametrize("command, code", [
    (None, "invalid_command"),
    ([1, 2], "invalid_command"),
    ({"op": "nope"}, "unknown_op"),
    ({"op": 5}, "unknown_op"),
    ({"op": "put", "key": b"a"}, "invalid_command"),
    ({"op": "put", "key": b"", "value": b"1"}, "invalid_command"),
    ({"op": "put", "key": 7, "value": b"1"}, "invalid_command"),
    ({"op": "put", "key": b"k" * 401, "value": b"1"}, "invalid_command"),
    ({"op": "cas", "key": b"a", "value": b"1"}, "invalid_command"),
    ({"op": "scan", "limit": 0}, "invalid_command"),
    ({"op": "scan", "limit": True}, "invalid_command"),
    ({"op": "scan", "prefix": b"a", "after": b"b"}, "invalid_command"),
])
def test_bad_commands_yield_error_results_without_mutations(dict_reader, command, code):
    """Malformed commands never raise and never change state."""
    outcome = M.apply(command, dict_reader, ApplyContext(1, 0, 0))
    assert outcome.result["ok"] is False and outcome.result["error"] == code
    assert outcome.mutations == ()


PURE_MODULES = [
    "veristore_py/state.py", "veristore_py/codec.py",
    "cache_plane/model.py", "cache_plane/hashing.py", "cache_plane/index.py",
    "cache_plane/policy.py", "cache_plane/blocklog.py",
    *(f"cache_plane/machine/{m}.py"
      for m in ("__init__", "state", "records", "fields", "fleet", "routing", "blocks")),
]


@pytest.mark.parametrize("name", PURE_MODULES)
def test_pure_core_imports_no_io_or_clock(name):
    """The pure core imports nothing that does I/O, reads clocks or draws randomness."""
    banned = {"os", "time", "random", "lmdb", "pysyncobj", "aiohttp", "socket", "datetime",
              "uuid", "threading", "asyncio", "structlog", "logging"}
    allowed_internal = ("veristore_py.state", "veristore_py.codec", "veristore_py.errors")
    tree = ast.parse(pathlib.Path(name).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "veristore_py"):
            assert node.module in allowed_internal, f"{name} imports {node.module}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = {node.module.split(".")[0]}
        else:
            continue
        assert not names & banned, f"{name} imports {names & banned}"
