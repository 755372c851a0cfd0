"""CachePlaneMachine: each decision path, driven directly (pure, dict-backed store)."""

from __future__ import annotations

from cache_plane.machine import CachePlaneMachine
from tests.conftest import DictReader
from veristore_py.state import ApplyContext

LEASE = 10_000


class Harness:
    """A machine plus a dict store, applying commands at increasing indexes."""

    def __init__(self):
        self.m = CachePlaneMachine()
        self.store = DictReader()
        self.index = 0

    def __call__(self, **cmd):
        self.index += 1
        out = self.m.apply(cmd, self.store, ApplyContext(self.index, 0, 0))
        self.store.write(out.mutations)
        return out.result

    def node(self, node, capacity=100, max_active=4, models=("m",), now=0):
        return self(op="cp.register_node", node=node, address=f"{node}:8000", models=list(models),
                    capacity_blocks=capacity, max_active=max_active, now_ms=now, lease_ms=LEASE)

    def route(self, blocks, rid, session=None, now=0, model="m"):
        cmd = dict(op="cp.route", model=model, blocks=list(blocks), request_id=rid, now_ms=now)
        if session:
            cmd["session_id"] = session
        return self(**cmd)


def cluster(nodes=("a", "b"), capacity=100, max_active=4):
    h = Harness()
    h(op="cp.register_model", model="m", block_size=16)
    for n in nodes:
        h.node(n, capacity, max_active)
    return h


def test_miss_is_placed_on_least_loaded_node_then_exact_hit_returns_there():
    """A cold prompt is a miss; the same prompt again is an exact hit on the same node."""
    h = cluster()
    h(op="cp.heartbeat", node="a", active=3, queue=0, now_ms=0, lease_ms=LEASE)
    first = h.route(range(10), "r1")
    assert first["route_type"] == "miss" and first["node_id"] == "b"
    h(op="cp.complete", request_id="r1", node="b", status="ok")
    again = h.route(range(10), "r2")
    assert again["route_type"] == "exact" and again["node_id"] == "b"
    assert again["matched_blocks"] == 10 and again["matched_tokens"] == 160


def test_prefix_hit_reports_matched_blocks_and_breakdown():
    """A prompt sharing a prefix goes to the holder; candidates explain every node's score."""
    h = cluster()
    first = h.route(range(8), "r1")
    h(op="cp.complete", request_id="r1", node=first["node_id"], status="ok", now_ms=1_000)
    hit = h.route([*range(6), 100, 101], "r2", now=1_000)  # r1 is done, its prefill too
    assert hit["route_type"] == "prefix" and hit["matched_blocks"] == 6
    by_node = {c["node_id"]: c for c in hit["candidates"]}
    assert by_node[hit["node_id"]]["overlap_blocks"] == 6 and len(by_node) == 2


def test_session_affinity_wins_until_node_overloaded():
    """A session sticks to its node; when that node is at max active it moves."""
    h = cluster(max_active=2)
    s1 = h.route([1, 2], "r1", session="s")
    s2 = h.route([9, 9, 9], "r2", session="s")
    assert s2["route_type"] == "session" and s2["node_id"] == s1["node_id"]
    s3 = h.route([7, 7], "r3", session="s")  # node now has 2 active = max
    assert s3["node_id"] != s1["node_id"]


def test_a_session_start_is_balanced_tighter_than_a_single_request():
    """Holding the prefix outweighs a little extra load for one request, not for a session
    start, whose later turns will follow it (session_balance_slack 1.0 vs balance_slack 1.3)."""
    h = cluster(nodes=("a", "b", "c", "d"), capacity=1000, max_active=100)
    system = list(range(1, 201))
    h(op="cp.kv_events", node="a", seq=1, model="m",
      events=[{"type": "stored", "block_hashes": system}])
    for node, active in (("a", 14), ("b", 10), ("c", 10), ("d", 10)):
        h(op="cp.heartbeat", node=node, active=active, queue=0, now_ms=0, lease_ms=LEASE)
    one = h.m.decide({"op": "cp.route", "model": "m", "blocks": [*system, 900],
                      "request_id": "p", "now_ms": 0}, {})
    start = h.m.decide({"op": "cp.route", "model": "m", "blocks": [*system, 900],
                        "request_id": "q", "now_ms": 0, "session_id": "new"}, {})
    assert one.node_id == "a" and start.node_id != "a"


def test_a_replan_uses_the_policy_the_leader_stamped_not_the_replicas_own():
    """Members may be configured differently; re-deciding a route must not diverge."""
    from cache_plane.policy import PolicyConfig

    def replica(own: PolicyConfig):
        h = cluster(nodes=("a", "b"), capacity=100, max_active=10)
        h.m.policy = own
        h(op="cp.kv_events", node="a", seq=1, model="m",
          events=[{"type": "stored", "block_hashes": [1, 2]}])
        h(op="cp.heartbeat", node="a", active=5, queue=0, now_ms=0, lease_ms=LEASE)
        h(op="cp.heartbeat", node="b", active=4, queue=0, now_ms=0, lease_ms=LEASE)
        return h

    owns = (PolicyConfig(load_weight=0.0), PolicyConfig(load_weight=50.0))
    # unstamped, each replica's own weight decides: the weight matters here ...
    plain = [replica(own).route([1, 2, 3], "r")["node_id"] for own in owns]
    assert plain[0] != plain[1]
    # ... and with the leader's weight in the command, every replica decides alike
    stamped = [replica(own)(op="cp.route", model="m", blocks=[1, 2, 3], request_id="r",
                            now_ms=0, load_weight=0.5, session_max_load=1.0)["node_id"]
               for own in owns]
    assert stamped[0] == stamped[1]
    bad = cluster()(op="cp.route", model="m", blocks=[1], request_id="x", now_ms=0,
                    load_weight="heavy")
    assert bad["error"] == "invalid_command" and "load_weight" in bad["detail"]


def test_rejections_name_the_reason():
    """No node for the model, all busy, prompt too large: each has its own reason."""
    h = cluster(nodes=("a",), capacity=5, max_active=1)
    h(op="cp.register_model", model="other")
    assert h.route([1], "x", model="other")["rejected"] == "no_node_for_model"
    assert h.route(range(6), "y")["rejected"] == "prompt_too_large"
    h.route([1], "z")
    assert h.route([2], "w")["rejected"] == "all_nodes_busy"
    assert h(op="cp.route", model="nope", blocks=[1], request_id="q", now_ms=0)["error"] == "unknown_model"


def test_eviction_on_full_node_takes_lru_and_spares_active_blocks():
    """A full node evicts its least recently used unpinned blocks, never an active request's."""
    h = cluster(nodes=("a",), capacity=6, max_active=10)
    h.route([1, 2, 3], "old")
    h(op="cp.complete", request_id="old", node="a", status="ok")
    h.route([10, 11, 12], "active")          # pinned: request still running
    third = h.route([20, 21], "new")
    assert third["evicted_blocks"] == 2 and third["routed"]
    held = {b for _, b in h.m.index.lru_order(h.m.nodes["a"].slot)}
    # The finished chain [1, 2, 3] loses its tail first: its head still serves prompts.
    assert {10, 11, 12} <= held and {20, 21} <= held and held & {1, 2, 3} == {1}
    assert h.m.index.used(0) <= 6


def test_pinned_everything_means_no_room():
    """When every block on the only node is pinned, a new prompt is rejected for room."""
    h = cluster(nodes=("a",), capacity=4, max_active=10)
    h.route([1, 2, 3, 4], "busy")
    assert h.route([5], "more")["rejected"] == "no_room"


def test_lease_expiry_drops_node_blocks_and_sessions():
    """A node whose heartbeat lease lapsed is down, with no blocks and no sessions."""
    h = cluster()
    r = h.route([1, 2, 3], "r1", session="s")
    node = r["node_id"]
    h(op="cp.heartbeat", node=("b" if node == "a" else "a"), active=0, queue=0, now_ms=5_000,
      lease_ms=LEASE)
    out = h(op="cp.expire", now_ms=LEASE + 1)
    assert out["nodes_down"] == [node]
    assert h.m.nodes[node].state == "down" and h.m.index.used(h.m.nodes[node].slot) == 0
    assert "s" not in h.m.sessions and "r1" not in h.m.requests
    assert h.route([1, 2, 3], "r2")["node_id"] != node


def test_duplicate_reports_apply_once():
    """A retried completion or KV-event batch changes nothing the second time."""
    h = cluster(nodes=("a",))
    h.route([1, 2], "r1")
    first = h(op="cp.complete", request_id="r1", node="a", status="ok", output_blocks=[3])
    again = h(op="cp.complete", request_id="r1", node="a", status="ok", output_blocks=[3])
    assert first["output_blocks_added"] == 1 and again["duplicate"]
    ev = dict(op="cp.kv_events", node="a", seq=5, events=[{"type": "stored", "block_hashes": [9]}])
    assert h(**ev)["stored"] == 1 and h(**ev)["duplicate"]
    assert h.m.nodes["a"].active == 0


def test_kv_events_store_remove_clear():
    """Stored, removed and cleared events update the node's blocks and tiers."""
    h = cluster(nodes=("a",))
    h(op="cp.kv_events", node="a", seq=1, events=[
        {"type": "stored", "block_hashes": [1, 2], "tier": "cpu"},
        {"type": "removed", "block_hashes": [2]}])
    assert h.m.index.holders(0, 1) == [(0, 1)] and h.m.index.holders(0, 2) == []
    h(op="cp.kv_events", node="a", seq=2, events=[{"type": "cleared"}])
    assert h.m.index.used(0) == 0


def test_invalidate_model_drops_its_blocks_and_bumps_epoch():
    """A new model version forgets every cached block of the model."""
    h = cluster()
    h.route([1, 2], "r1")
    out = h(op="cp.invalidate_model", model="m")
    assert out["epoch"] == 1 and out["dropped_blocks"] == 2
    assert h.route([1, 2], "r2")["route_type"] == "miss"


def test_invalid_commands_change_nothing():
    """Malformed commands return errors and leave the state (and store) untouched."""
    h = cluster()
    before = dict(h.store.data)
    for cmd in [
        dict(op="cp.route", model="m", blocks=[-1], request_id="x", now_ms=0),
        dict(op="cp.route", model="m", blocks="abc", request_id="x", now_ms=0),
        dict(op="cp.route", model="m", blocks=[1], now_ms=0),
        dict(op="cp.register_node", node="c", address="c:1", models=[], capacity_blocks=1,
             max_active=1, now_ms=0, lease_ms=1),
        dict(op="cp.kv_events", node="a", seq=1, events=[{"type": "exploded"}]),
        dict(op="cp.complete", request_id="x", node="a", status="weird"),
        dict(op="cp.heartbeat", node="zzz", active=0, queue=0, now_ms=0, lease_ms=1),
    ]:
        result = h(**cmd)
        assert result["ok"] is False and result["error"] in ("invalid_command", "unknown_node")
        meta_free = {k: v for k, v in h.store.data.items() if k != b"cp/meta"}
        assert meta_free == {k: v for k, v in before.items() if k != b"cp/meta"}


def test_rebuild_from_store_reproduces_state():
    """A machine rebuilt from the stored keys makes the same next decision."""
    h = cluster(nodes=("a", "b", "c"), capacity=8)
    for i in range(12):
        routed = h.route([i % 3, 100 + i, 200 + i], f"r{i}", session=f"s{i % 2}")
        if i % 2 and routed["routed"]:
            h(op="cp.complete", request_id=f"r{i}", node=routed["node_id"], status="ok")
    twin = CachePlaneMachine()
    twin.rebuild(sorted(h.store.data.items()))
    for node in h.m.nodes:
        assert list(twin.index.lru_order(twin.nodes[node].slot)) == \
            list(h.m.index.lru_order(h.m.nodes[node].slot))
    probe = dict(op="cp.route", model="m", blocks=[1, 101, 7], request_id="p", now_ms=1)
    assert twin.decide(probe) == h.m.decide(probe)


def test_block_ttl_expires_idle_unpinned_blocks_only():
    """cp.expire with block_ttl_ms drops blocks idle past the TTL, never an active request's."""
    h = cluster(nodes=("a",), max_active=10)
    h.route([1, 2], "old", now=1_000)
    h(op="cp.complete", request_id="old", node="a", status="ok")
    h.route([3, 4], "active", now=1_000)
    h.route([5], "fresh", now=9_000)
    h(op="cp.heartbeat", node="a", active=2, queue=0, now_ms=9_000, lease_ms=LEASE)
    out = h(op="cp.expire", now_ms=9_500, block_ttl_ms=5_000)
    held = {b for _, b in h.m.index.lru_order(0)}
    assert out["blocks_expired"] == 2 and held == {3, 4, 5}


def test_compacting_touches_keeps_lru_order_across_rebuild():
    """Regression (found by hypothesis): blocks touched in one record keep their order after
    the node's log is replaced by a checkpoint and the machine is rebuilt from the store."""
    h = cluster(nodes=("a",))
    h.route([56664, 33604], "r1")
    h.route([56664, 33604], "r2")
    out = h(op="cp.compact_log", slot=0)
    assert (out["records"], out["blocks"], out["remaining"]) == (2, 2, 0)
    assert not [k for k in h.store.data if k.startswith(b"cp/log/")]
    twin = CachePlaneMachine()
    twin.rebuild(sorted(h.store.data.items()))
    assert list(twin.index.lru_order(0)) == list(h.m.index.lru_order(0))


def test_checkpoint_then_log_rebuilds_tiers_times_and_order():
    """A checkpoint plus later log records rebuild the same index (tiers, pending, times);
    a second checkpoint deletes the parts the first wrote beyond its own."""
    h = cluster(nodes=("a", "b"), capacity=1000)
    h(op="cp.kv_events", node="a", seq=1, events=[
        {"type": "stored", "block_hashes": [1, 2, 3]},
        {"type": "stored", "block_hashes": [4, 5], "tier": "cpu"},
        {"type": "stored", "block_hashes": [6], "tier": "disk"}])
    h.route([1, 2, 3, 7, 8], "r1", now=50)  # 7, 8 pending on a
    assert h(op="cp.compact_log")["slot"] == 0  # the largest log
    h.route([4, 5, 9], "r2", now=60)
    h(op="cp.kv_events", node="a", seq=2, events=[{"type": "removed", "block_hashes": [2]}])

    def view(m):
        return [(list(m.index.export(s)[0]), list(m.index.export(s)[1]), m.index.export(s)[2])
                for s in (0, 1)]

    twin = CachePlaneMachine()
    twin.rebuild(sorted(h.store.data.items()))
    assert view(twin) == view(h.m)
    assert twin.log.records == h.m.log.records and twin.log.blocks == h.m.log.blocks
    h(op="cp.compact_log", slot=0)
    h(op="cp.compact_log", slot=1)
    assert h.m.compaction_due() == [] and h.m.log.record_count == 0
    twin = CachePlaneMachine()
    twin.rebuild(sorted(h.store.data.items()))
    assert view(twin) == view(h.m)


def test_compact_log_refuses_a_bad_slot_and_is_a_no_op_without_a_log():
    """A malformed slot is an invalid command; nothing logged means nothing to do."""
    h = cluster(nodes=())
    assert h(op="cp.compact_log", slot=-1)["error"] == "invalid_command"
    assert h(op="cp.compact_log")["records"] == 0
    assert h(op="cp.compact_log", slot=7)["records"] == 0


def test_a_restarted_engine_instance_loses_its_blocks_and_restarts_its_event_seqs():
    """Re-registering with the same instance keeps state; a new instance starts from empty."""
    h = cluster(nodes=("a",))

    def register(instance):
        return h(op="cp.register_node", node="a", address="a:8000", models=["m"],
                 capacity_blocks=100, max_active=4, now_ms=0, lease_ms=LEASE,
                 instance_id=instance)

    assert not register("one")["restarted"]
    h(op="cp.kv_events", node="a", seq=50, events=[{"type": "stored", "block_hashes": [1, 2]}])
    h.route([1, 2, 3], "r1")
    assert not register("one")["restarted"] and h.m.index.used(0) == 3
    assert register("two")["restarted"]
    assert h.m.index.used(0) == 0 and not h.m.requests and h.m.nodes["a"].active == 0
    assert h.m.nodes["a"].streams == {}
    again = h(op="cp.kv_events", node="a", seq=1, events=[{"type": "stored",
                                                           "block_hashes": [7]}])
    assert again["stored"] == 1 and not again.get("duplicate")
    bad = h(op="cp.register_node", node="a", address="a:8000", models=["m"], capacity_blocks=100,
            now_ms=0, lease_ms=LEASE, instance_id=5)
    assert bad["error"] == "invalid_command" and h.m.nodes["a"].instance == "two"


def test_legacy_block_records_are_read_and_deleted_by_the_nodes_checkpoint():
    """Stores from before checkpoints hold one cp/blk/ record per block: still rebuilt, merged
    with later log records by sequence number, and dropped by that node's first checkpoint."""
    import struct

    h = cluster(nodes=("a",))
    for seq, block in ((1, 10), (2, 11)):
        h.store.data[b"cp/blk/" + struct.pack(">HHQ", 0, 0, block)] = struct.pack(">BQQ", 0, seq, 5)
    h.m.rebuild(sorted(h.store.data.items()))
    h.m.log.seq = 2  # as the meta record of such a store would say
    assert list(h.m.index.lru_keys(0)) == [10, 11] and h.m.log.legacy == {0}
    h.route([10, 12], "r", now=9)
    assert list(h.m.index.lru_keys(0)) == [11, 12, 10]
    h.m.rebuild(sorted(h.store.data.items()))
    assert list(h.m.index.lru_keys(0)) == [11, 12, 10]
    h(op="cp.compact_log", slot=0)
    assert not [k for k in h.store.data if k.startswith(b"cp/blk/")]
    twin = CachePlaneMachine()
    twin.rebuild(sorted(h.store.data.items()))
    assert list(twin.index.lru_keys(0)) == [11, 12, 10]


def test_two_adds_of_one_block_in_a_command_rebuild_in_the_same_lru_order():
    """Regression (review): same-shape operations of a command shared one log record even
    when they listed the same block; replay kept it at its first position, live it moved."""
    h = cluster(nodes=("a",))
    h(op="cp.kv_events", node="a", seq=1, events=[
        {"type": "stored", "block_hashes": [1, 2]}, {"type": "stored", "block_hashes": [1]}])
    h.route([7, 8], "r", now=3)
    h(op="cp.complete", request_id="r", node="a", status="ok", output_blocks=[8])
    twin = CachePlaneMachine()
    twin.rebuild(sorted(h.store.data.items()))
    assert list(twin.index.lru_keys(0)) == list(h.m.index.lru_keys(0)) == [2, 1, 7, 8]


def test_an_out_of_range_leader_time_is_ignored_not_raised():
    """Regression (review): now_ms beyond 2**62 made the block-log record unpackable."""
    h = cluster(nodes=("a",))
    h(op="cp.kv_events", node="a", seq=1, now_ms=2**64,
      events=[{"type": "stored", "block_hashes": [1]}])
    assert h(op="cp.compact_log", slot=0)["ok"]
    assert h.m.now < 2**62


def test_an_unreachable_node_leaves_routing_until_its_next_heartbeat():
    """A gateway's report takes a node out of routing; its blocks stay; a heartbeat restores."""
    h = cluster()
    first = h.route(range(10), "r1")
    h(op="cp.complete", request_id="r1", node=first["node_id"], status="ok")
    out = h(op="cp.node_unreachable", node=first["node_id"])
    assert out["state"] == "unreachable"
    other = h.route(range(10), "r2")
    assert other["node_id"] != first["node_id"] and other["route_type"] == "miss"
    h(op="cp.heartbeat", node=first["node_id"], active=0, queue=0, now_ms=1, lease_ms=LEASE)
    back = h.route(range(10), "r3", now=1)
    assert back["node_id"] == first["node_id"] and back["route_type"] == "exact"
    h(op="cp.node_unreachable", node="b")
    h(op="cp.node_unreachable", node="a")
    none = h.route(range(3), "r4", now=1)
    assert none["rejected"] == "no_node_up"
    assert h(op="cp.node_unreachable", node="zz")["error"] == "unknown_node"


def test_a_binding_decision_that_no_longer_fits_is_dropped_not_moved():
    """An answered (ack: decided) route never lands on another node: it is recorded nowhere."""
    h = cluster(max_active=1)
    h.route(range(4), "r1")  # fills one node
    busy = "a" if h.m.nodes["a"].active else "b"
    out = h(op="cp.route", model="m", blocks=[7, 8], request_id="r2", now_ms=0, node=busy,
            route_type="miss", matched=0, evict=[], binding=True)
    assert out["dropped"] is True and out["routed"] is False
    assert h(op="cp.complete", request_id="r2", node=busy, status="ok")["duplicate"] is True
    moved = h(op="cp.route", model="m", blocks=[7, 8], request_id="r3", now_ms=0, node=busy,
              route_type="miss", matched=0, evict=[])
    assert moved["node_id"] != busy  # without binding, the replica re-decides


def _batch(seq, *hashes, kind="stored", ts=0):
    return [seq, ts, [{"type": kind, "block_hashes": list(hashes)}]]


def test_kv_batches_apply_once_per_stream_seq_and_stop_at_a_hole():
    """Each (node, rank) stream has its own watermark; a hole stops a contiguous command."""
    h = cluster(nodes=("a",))
    out = h(op="cp.kv_batches", node="a", rank=0, batches=[_batch(0, 1), _batch(1, 2)])
    assert out["applied"] == 2 and out["watermark"] == 1 and out["gap_at"] is None
    out = h(op="cp.kv_batches", node="a", rank=0,
            batches=[_batch(1, 2), _batch(2, 3), _batch(4, 5), _batch(5, 6)])
    assert (out["duplicates"], out["applied"], out["gap_at"], out["watermark"]) == (1, 1, 4, 2)
    assert h.m.index.holders(0, 5) == []  # nothing after the hole
    other = h(op="cp.kv_batches", node="a", rank=1, batches=[_batch(0, 9)])
    assert other["watermark"] == 0 and h.m.nodes["a"].streams[0].last_seq == 2
    lenient = h(op="cp.kv_batches", node="a", rank=0, batches=[_batch(7, 7)], contiguous=False)
    assert lenient["applied"] == 1 and h.m.nodes["a"].streams[0].gaps == 4


def test_kv_batches_resync_clears_the_node_and_restarts_the_stream():
    h = cluster(nodes=("a",))
    h(op="cp.kv_batches", node="a", rank=0, batches=[_batch(0, 1, 2), _batch(1, 3)])
    out = h(op="cp.kv_batches", node="a", rank=0, resync="restart", batches=[_batch(0, 8)])
    assert out["applied"] == 1 and out["watermark"] == 0 and h.m.index.used(0) == 1
    stale = h(op="cp.kv_batches", node="a", rank=0, resync="gap", batches=[])
    assert stale["stale"] and h.m.index.used(0) == 0
    s = h.m.nodes["a"].streams[0]
    assert (s.restarts, s.resyncs, s.stale) == (1, 1, True)
    h(op="cp.kv_batches", node="a", rank=0, resync="gap", batches=[_batch(40, 4)])
    assert not h.m.nodes["a"].streams[0].stale and h.m.nodes["a"].streams[0].last_seq == 40


def test_kv_batches_are_refused_whole_when_malformed_and_survive_a_rebuild():
    h = cluster(nodes=("a",))
    before = dict(h.store.data)
    for bad in ([[0, 0]], [[-1, 0, []]], [[0, 0, [{"type": "boom"}]]], "x"):
        assert h(op="cp.kv_batches", node="a", rank=0, batches=bad)["error"] == \
            "invalid_command"
    assert h(op="cp.kv_batches", node="a", rank=0, batches=[], resync="nope")["error"] == \
        "invalid_command"
    assert h(op="cp.kv_batches", node="zz", rank=0, batches=[])["error"] == "unknown_node"
    assert dict(h.store.data) == before
    h(op="cp.kv_batches", node="a", rank=2, batches=[_batch(0, 1, ts=5)], gaps=3, replays=1,
      now_ms=9)
    twin = CachePlaneMachine()
    twin.rebuild(sorted(h.store.data.items()))
    assert twin.nodes["a"].streams == h.m.nodes["a"].streams
    assert twin.nodes["a"].streams[2].last_lag_ms == 4 and twin.nodes["a"].streams[2].gaps == 3


def test_a_stream_of_rank_0_continues_the_nodes_earlier_http_seq():
    h = cluster(nodes=("a",))
    h(op="cp.kv_events", node="a", seq=5, events=[{"type": "stored", "block_hashes": [1]}])
    out = h(op="cp.kv_batches", node="a", rank=0, batches=[_batch(5, 2), _batch(6, 3)])
    assert out["duplicates"] == 1 and out["watermark"] == 6


def _events(seq, *events):
    return [seq, 0, [{"type": kind, "block_hashes": list(hashes), "tier": tier}
                     for kind, hashes, tier in events]]


def _twin(h):
    twin = CachePlaneMachine()
    twin.rebuild(sorted(h.store.data.items()))
    return twin


def test_a_duplicate_store_is_counted_and_removed_only_at_zero_per_tier():
    """vLLM stores a block twice and removes it once while a copy remains: it stays."""
    h = cluster(nodes=("a",))
    h(op="cp.kv_batches", node="a", rank=0, batches=[
        _events(0, ("stored", [1, 2], "gpu")), _events(1, ("stored", [1], "gpu")),
        _events(2, ("stored", [2], "cpu"))])
    h(op="cp.kv_batches", node="a", rank=0, batches=[_events(3, ("removed", [1, 2], "gpu"))])
    assert h.m.index.tier(0, 1, 0) == 0  # one GPU copy of 1 left
    assert h.m.index.tier(0, 2, 0) == 1  # 2 lives on in the CPU tier
    assert _twin(h).index.refs(0, 1) == h.m.index.refs(0, 1) != 0
    h(op="cp.kv_batches", node="a", rank=0, batches=[
        _events(4, ("removed", [1], "gpu"), ("removed", [2], "cpu"), ("removed", [9], "gpu"))])
    assert h.m.index.used(0) == 0 and _twin(h).index.used(0) == 0


def test_a_block_the_router_placed_takes_its_first_reference_from_the_engine():
    """A completion confirms a block, the engine stores it once, removes it once: gone."""
    h = cluster(nodes=("a",))
    routed = h.route([5, 6], "r1")
    h(op="cp.complete", request_id="r1", node=routed["node_id"], status="ok")
    h(op="cp.kv_batches", node="a", rank=0, batches=[_events(0, ("stored", [5, 6], "gpu"))])
    h(op="cp.kv_batches", node="a", rank=0, batches=[_events(1, ("removed", [5], "gpu"))])
    assert not h.m.index.holds(0, 5) and h.m.index.holds(0, 6)


def test_reference_counts_survive_a_checkpoint_and_the_log_after_it():
    h = cluster(nodes=("a",))
    h(op="cp.kv_batches", node="a", rank=0, batches=[
        _events(0, ("stored", [1, 2, 3], "gpu")), _events(1, ("stored", [1, 2], "gpu"))])
    h(op="cp.compact_log", slot=0)
    h(op="cp.kv_batches", node="a", rank=0, batches=[_events(2, ("stored", [3], "gpu"))])
    twin = _twin(h)
    for block in (1, 2, 3):
        assert twin.index.refs(0, block) == h.m.index.refs(0, block) != 0
    h(op="cp.kv_batches", node="a", rank=0, batches=[_events(3, ("removed", [1, 2, 3], "gpu"))])
    assert h.m.index.used(0) == 3 and _twin(h).index.used(0) == 3
    h(op="cp.kv_batches", node="a", rank=0, batches=[_events(4, ("removed", [1, 2, 3], "gpu"))])
    assert h.m.index.used(0) == 0 and _twin(h).index.used(0) == 0
