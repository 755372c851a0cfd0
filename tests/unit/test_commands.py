"""Command constructors build the exact maps (and so the exact bytes) the service used to."""

from __future__ import annotations

from cache_plane import commands as c
from cache_plane.index import victim_keys, victim_pairs
from veristore_py.codec import pack

PRIOR = c.priors(28_000, 10.0, 256)


def test_every_constructor_encodes_like_the_literal_it_replaced():
    """Same keys in the same order: the Raft log's bytes do not change with the refactor."""
    pairs = [
        (c.register_model("m", 16, "vllm-none-hash"),
         {"op": "cp.register_model", "model": "m", "block_size": 16,
          "hash_seed": "vllm-none-hash"}),
        (c.invalidate_model("m"), {"op": "cp.invalidate_model", "model": "m"}),
        (c.register_node("a", "h:1", ["m"], 100, 64, {"z": "1"}, 10_000, instance_id="i",
                         max_running=8),
         {"op": "cp.register_node", "node": "a", "address": "h:1", "models": ["m"],
          "capacity_blocks": 100, "max_active": 64, "labels": {"z": "1"}, "lease_ms": 10_000,
          "instance_id": "i", "max_running": 8}),
        (c.register_node("a", "h:1", ["m"], 100, 64, {}, 10_000),
         {"op": "cp.register_node", "node": "a", "address": "h:1", "models": ["m"],
          "capacity_blocks": 100, "max_active": 64, "labels": {}, "lease_ms": 10_000}),
        (c.heartbeat("a", 3, 1, 10_000, 42),
         {"op": "cp.heartbeat", "node": "a", "active": 3, "queue": 1, "lease_ms": 10_000,
          "used": 42}),
        (c.heartbeat("a", 3, 1, 10_000),
         {"op": "cp.heartbeat", "node": "a", "active": 3, "queue": 1, "lease_ms": 10_000}),
        (c.drain("a"), {"op": "cp.drain", "node": "a"}),
        (c.remove_node("a"), {"op": "cp.remove_node", "node": "a"}),
        (c.route("m", [1, 2], "r", 5, 30_000, 600_000, PRIOR, 16.0, 1.0, "s"),
         {"op": "cp.route", "model": "m", "blocks": [1, 2], "request_id": "r", "now_ms": 5,
          "request_ttl_ms": 30_000, "session_ttl_ms": 600_000, "prefill_tokens_per_s": 28_000,
          "decode_ms_per_token": 10.0, "mean_output_tokens": 256, "load_weight": 16.0,
          "session_max_load": 1.0, "session_id": "s"}),
        (c.with_decision(c.route("m", [1], "r", 5, 1, 1, PRIOR, 16.0, 1.0), "a", "miss", 0,
                         [[1, 9]]),
         {"op": "cp.route", "model": "m", "blocks": [1], "request_id": "r", "now_ms": 5,
          "request_ttl_ms": 1, "session_ttl_ms": 1, **PRIOR, "load_weight": 16.0,
          "session_max_load": 1.0, "node": "a", "route_type": "miss", "matched": 0,
          "evict": [[1, 9]]}),
        (c.complete("r", "a", "ok", [7], {"ttft_ms": 3, "prompt_tokens": 9, "node_id": "a"},
                    PRIOR),
         {"op": "cp.complete", "request_id": "r", "node": "a", "status": "ok",
          "output_blocks": [7], "prompt_tokens": 9, "ttft_ms": 3, **PRIOR}),
        (c.kv_events("a", 3, [{"type": "cleared"}], "m"),
         {"op": "cp.kv_events", "node": "a", "seq": 3, "events": [{"type": "cleared"}],
          "model": "m"}),
        (c.expire(9, 0, PRIOR), {"op": "cp.expire", "now_ms": 9, "block_ttl_ms": 0, **PRIOR}),
        (c.compact_log(2), {"op": "cp.compact_log", "slot": 2}),
        (c.compact_log(), {"op": "cp.compact_log"}),
    ]
    for built, literal in pairs:
        assert pack(built) == pack(literal), built["op"]


def test_victims_round_trip_through_their_wire_form():
    """[model, block] pairs and index keys convert both ways, model 0 included."""
    keys = [5, (3 << 64) | 7, (65_535 << 64) | (2**64 - 1)]
    assert victim_pairs(keys) == [[0, 5], [3, 7], [65_535, 2**64 - 1]]
    assert victim_keys(victim_pairs(keys)) == keys
