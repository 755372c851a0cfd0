"""The replicated response cache in the machine: store, LRU eviction, touch, expiry,
invalidation, purge, the change feed, and rebuild from the store (pure, dict-backed)."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from cache_plane import commands
from cache_plane.machine import CachePlaneMachine
from tests.unit.test_machine import Harness


def key(i: int) -> str:
    return f"{i:064x}"


def harness() -> Harness:
    h = Harness()
    h(op="cp.register_model", model="m", block_size=16)
    return h


def put(h: Harness, i: int, now: int = 0, size: int = 100, ttl: int = 3_600_000,
        max_bytes: int = 10_000, tenant: str = "t", namespace: str = "", epoch: int = 0):
    return h(**commands.cache_put(
        key(i), tenant=tenant, model="m", epoch=epoch, namespace=namespace, bucket=None,
        question=f"q{i}", body=b"x" * size, embedding=b"", now_ms=now, expires_ms=now + ttl,
        max_bytes=max_bytes, prompt_tokens=10, completion_tokens=5, latency_ms=900))


def entries(h: Harness) -> list[str]:
    return list(h.m.responses.entries)


def test_put_stores_metadata_in_memory_and_the_body_on_disk_only():
    h = harness()
    out = put(h, 1, now=5)
    assert out["stored"] and out["expires_ms"] == 5 + 3_600_000
    assert h.store.get(b"cp/rc/b/" + key(1).encode()) == b"x" * 100
    assert h.m.responses.entries[key(1)].question == "q1"


def test_least_recently_used_entries_are_evicted_past_the_budget_and_touch_saves_one():
    h = harness()
    size = put(h, 0)["evicted"] or h.m.responses.entries[key(0)].size
    for i in range(1, 3):
        put(h, i, now=i, max_bytes=3 * size)
    h(**commands.cache_touch([key(0)], now_ms=10))
    out = put(h, 3, now=11, max_bytes=3 * size)
    assert out["evicted"] == 1 and entries(h) == [key(2), key(0), key(3)]
    assert h.m.responses.counters["evicted"] == 1 and h.m.responses.bytes == 3 * size


def test_an_answer_from_an_older_model_epoch_is_not_stored():
    h = harness()
    h(op="cp.invalidate_model", model="m")
    out = put(h, 1, epoch=0)
    assert out == {"ok": True, "stored": False, "reason": "stale_epoch", "epoch": 1}
    assert put(h, 1, epoch=1)["stored"]


def test_invalidating_the_model_drops_its_entries_in_the_same_command():
    h = harness()
    put(h, 1)
    put(h, 2)
    out = h(op="cp.invalidate_model", model="m")
    assert out["dropped_responses"] == 2 and entries(h) == []
    assert h.store.get(b"cp/rc/b/" + key(1).encode()) is None


def test_expiry_runs_in_the_leaders_expire_command():
    h = harness()
    put(h, 1, now=0, ttl=100)
    put(h, 2, now=0, ttl=500)
    out = h(**commands.expire(200, 0, {}))
    assert out["responses_expired"] == 1 and entries(h) == [key(2)]


def test_purge_by_tenant_and_namespace_and_delete_by_key():
    h = harness()
    put(h, 1, tenant="a")
    put(h, 2, tenant="b", namespace="x")
    put(h, 3, tenant="b")
    assert h(**commands.cache_purge(tenant="b", namespace="x"))["purged"] == 1
    assert h(**commands.cache_delete(key(3)))["deleted"] == 1
    assert h(**commands.cache_delete(key(3)))["deleted"] == 0
    assert entries(h) == [key(1)]
    assert h(op="cp.cache_purge")["error"] == "invalid_command"


def test_the_change_feed_lists_changed_keys_and_resets_after_a_rebuild():
    h = harness()
    put(h, 1)
    put(h, 2)
    h(**commands.cache_delete(key(1)))
    table = h.m.responses
    assert table.changes_since(0, 100) == (False, [key(1), key(2), key(1)], 3)
    assert table.changes_since(2, 100) == (False, [key(1)], 3)
    assert table.changes_since(0, 2) == (False, [key(1), key(2)], 2)
    fresh = CachePlaneMachine()
    fresh.rebuild(sorted(h.store.data.items()))
    assert fresh.responses.rev == 3 and fresh.responses.changes_since(2, 10)[0] is True


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["put", "touch", "delete", "expire"]),
                          st.integers(0, 6), st.integers(50, 400)), max_size=40))
def test_a_rebuilt_machine_has_the_same_entries_in_the_same_lru_order(ops):
    """Whatever happened, the store alone reproduces the entries, their order and bytes."""
    h = harness()
    for now, (op, i, size) in enumerate(ops, start=1):
        if op == "put":
            put(h, i, now=now, size=size, ttl=size * 10, max_bytes=1500)
        elif op == "touch":
            h(**commands.cache_touch([key(i)], now_ms=now))
        elif op == "delete":
            h(**commands.cache_delete(key(i)))
        else:
            h(**commands.expire(now * 10, 0, {}))
        assert h.m.responses.bytes <= 1500
    fresh = CachePlaneMachine()
    fresh.rebuild(sorted(h.store.data.items()))
    assert list(fresh.responses.entries.items()) == list(h.m.responses.entries.items())
    assert fresh.responses.bytes == h.m.responses.bytes
    assert fresh.responses.counters == h.m.responses.counters
