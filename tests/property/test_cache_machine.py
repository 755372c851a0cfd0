"""CachePlaneMachine on a real LMDB store, driven at random against a simple reference model.

Invariants: no node holds more blocks than its capacity; the index and every node's LRU agree;
no block lives on a down node; every active request sits on an up node that was eligible.
`reopen` restarts the store from disk (the machine rebuilds from LMDB) and must change nothing.
"""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cache_plane.index import GPU
from cache_plane.machine import MASK64, CachePlaneMachine
from cache_plane.model import RouteDecision
from veristore_py.storage import StateStore

NODES = st.sampled_from(["n1", "n2", "n3"])
PROMPTS = st.lists(st.integers(0, 6), min_size=1, max_size=6).map(
    lambda xs: [hash(tuple(xs[: i + 1])) & 0xFFFF for i in range(len(xs))])  # chained-ish
LEASE = 1_000


class CacheMachineModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.store = StateStore(self.dir + "/s", CachePlaneMachine(), map_size=1 << 20)
        self.index = 0
        self.now = 0
        self.ref_nodes: dict[str, str] = {}       # node -> up/draining/down
        self.ref_requests: dict[str, str] = {}    # request -> node
        self.capacity = {"n1": 6, "n2": 9, "n3": 12}
        self.plans: list[tuple[dict, int]] = []   # leader-decided routes, index when decided
        self.planned = 0  # plans made (their request ids)
        self.apply({"op": "cp.register_model", "model": "m", "block_size": 16})

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def m(self) -> CachePlaneMachine:
        return self.store.machine

    def apply(self, cmd):
        self.index += 1
        return self.store.apply_entry(self.index, self.now, [cmd])[0]

    @rule(node=NODES)
    def join(self, node):
        out = self.apply({"op": "cp.register_node", "node": node, "address": node,
                          "models": ["m"], "capacity_blocks": self.capacity[node],
                          "max_active": 3, "now_ms": self.now, "lease_ms": LEASE})
        assert out["ok"]
        self.ref_nodes[node] = "up"

    @rule(node=NODES)
    def heartbeat(self, node):
        out = self.apply({"op": "cp.heartbeat", "node": node, "active": 0, "queue": 0,
                          "now_ms": self.now, "lease_ms": LEASE})
        assert out["ok"] == (node in self.ref_nodes)
        if node in self.ref_nodes and self.ref_nodes[node] == "down":
            self.ref_nodes[node] = "up"

    @rule(node=NODES)
    def leave(self, node):
        out = self.apply({"op": "cp.remove_node", "node": node})
        assert out["ok"] == (node in self.ref_nodes)
        self.ref_nodes.pop(node, None)
        self.ref_requests = {r: n for r, n in self.ref_requests.items() if n != node}

    @rule(node=NODES)
    def drain(self, node):
        self.apply({"op": "cp.drain", "node": node})
        if self.ref_nodes.get(node) == "up":
            self.ref_nodes[node] = "draining"

    @rule(blocks=PROMPTS, session=st.sampled_from([None, "s1", "s2"]))
    def route(self, blocks, session):
        rid = f"r{self.index}"
        cmd = {"op": "cp.route", "model": "m", "blocks": blocks, "request_id": rid,
               "now_ms": self.now, "request_ttl_ms": 5 * LEASE}
        if session:
            cmd["session_id"] = session
        self._apply_route(cmd)

    def _apply_route(self, cmd):
        out = self.apply(cmd)
        assert out["ok"]
        if out["routed"]:
            assert self.ref_nodes.get(out["node_id"]) == "up"
            self.ref_requests[cmd["request_id"]] = out["node_id"]
        else:
            assert out["rejected"]
        return out

    @rule(blocks=PROMPTS, session=st.sampled_from([None, "s1", "s2"]))
    def plan(self, blocks, session):
        """The leader decides now; the decision is applied later (maybe stale by then)."""
        # (a unique id: a repeated one is a retry, answered with the first decision)
        self.planned += 1
        cmd = {"op": "cp.route", "model": "m", "blocks": blocks, "request_id": f"p{self.planned}",
               "now_ms": self.now, "request_ttl_ms": 5 * LEASE}
        if session:
            cmd["session_id"] = session
        decision = self.m.decide(cmd)
        assert isinstance(decision, RouteDecision)
        if decision.node_id is not None:
            cmd.update(node=decision.node_id, route_type=decision.route_type,
                       evict=[[k >> 64, k & MASK64] for k in decision.evict])
            self.plans.append((cmd, self.index))

    @rule()
    def apply_plan(self):
        """A fresh plan is applied as decided; a stale one is carried out or re-decided."""
        if not self.plans:
            return
        cmd, decided_at = self.plans.pop(0)
        out = self._apply_route(cmd)
        if decided_at == self.index - 1:  # nothing applied in between: carried out as decided
            assert out["node_id"] == cmd["node"] and not out["replanned"]

    @rule(data=st.data(), ok=st.booleans())
    def complete(self, data, ok):
        if not self.ref_requests:
            return
        rid = data.draw(st.sampled_from(sorted(self.ref_requests)))
        out = self.apply({"op": "cp.complete", "request_id": rid, "node": self.ref_requests[rid],
                          "status": "ok" if ok else "failed", "output_blocks": [70_000 + self.index]})
        assert out["ok"] and not out.get("duplicate")
        del self.ref_requests[rid]

    @rule(node=NODES, events=st.lists(st.fixed_dictionaries({
        "type": st.sampled_from(["stored", "stored", "removed"]),
        "block_hashes": st.lists(st.integers(0, 6) | st.integers(0, 70_000), max_size=5),
        "tier": st.sampled_from(["gpu", "gpu", "gpu", "cpu", "disk"])}), min_size=1, max_size=4))
    def kv_event(self, node, events):
        """Engine events, several per command (same-shape ones share a log record)."""
        out = self.apply({"op": "cp.kv_events", "node": node, "seq": self.index,
                          "events": events})
        assert out["ok"] == (self.ref_nodes.get(node, "down") != "down")

    @rule(data=st.data())
    def engine_drops_a_block_in_use(self, data):
        """An engine evicts (reports removed) a block an active request reuses."""
        if not self.ref_requests:
            return
        rid = data.draw(st.sampled_from(sorted(self.ref_requests)))
        request = self.m.requests[rid]
        self.apply({"op": "cp.kv_events", "node": request.node, "seq": self.index,
                    "events": [{"type": "removed", "block_hashes": [request.blocks[0]]}]})

    @rule(slot=st.none() | st.integers(0, 3))
    def compact_log(self, slot):
        """Checkpointing a node's log changes nothing in memory (the store: checked on reopen)."""
        before = {n: list(self.m.index.lru_order(r.slot)) for n, r in self.m.nodes.items()}
        cmd = {"op": "cp.compact_log"} if slot is None else {"op": "cp.compact_log", "slot": slot}
        assert self.apply(cmd)["ok"]
        assert before == {n: list(self.m.index.lru_order(r.slot)) for n, r in self.m.nodes.items()}

    @rule(step=st.integers(1, 2 * LEASE))
    def tick(self, step):
        self.now += step
        out = self.apply({"op": "cp.expire", "now_ms": self.now})
        for node in out["nodes_down"]:
            self.ref_nodes[node] = "down"
        self.ref_requests = {r: n for r, n in self.ref_requests.items()
                             if r in self.m.requests}

    @rule()
    def reopen(self):
        """Crash-restart from disk: the rebuilt machine equals the live one."""
        before = (self.store.digest(), {n: list(self.m.index.lru_order(r.slot))
                                        for n, r in self.m.nodes.items()})
        self.store.close()
        self.store = StateStore(self.dir + "/s", CachePlaneMachine(), map_size=1 << 20)
        after = (self.store.digest(), {n: list(self.m.index.lru_order(r.slot))
                                       for n, r in self.m.nodes.items()})
        assert before == after

    @invariant()
    def capacity_respected(self):
        for rec in self.m.nodes.values():
            assert self.m.index.used(rec.slot) <= rec.capacity_blocks

    @invariant()
    def tiers_only_for_held_blocks(self):
        for slot, tiers in self.m.index._tiers.items():
            lru = self.m.index._lru.get(slot, {})
            assert all(key in lru and tier != GPU for key, tier in tiers.items())
        for slot, pending in self.m.index._pending.items():
            lru = self.m.index._lru.get(slot, {})
            assert all(key in lru and key not in self.m.index._tiers.get(slot, {})
                       for key in pending)

    @invariant()
    def pins_match_active_requests(self):
        expected: dict[int, dict[int, int]] = {}
        for req in self.m.requests.values():
            slot = self.m.nodes[req.node].slot
            for block in req.blocks:
                key = req.model << 64 | block
                expected.setdefault(slot, {})[key] = expected.get(slot, {}).get(key, 0) + 1
        assert {s: dict(c) for s, c in self.m.pins.items() if c} == \
            {s: c for s, c in expected.items() if c}

    @invariant()
    def nothing_on_down_nodes_and_reference_agrees(self):
        assert {n: r.state for n, r in self.m.nodes.items()} == self.ref_nodes
        for rec in self.m.nodes.values():
            if rec.state == "down":
                assert self.m.index.used(rec.slot) == 0
        assert {r: q.node for r, q in self.m.requests.items()} == self.ref_requests


CacheMachineModel.TestCase.settings = settings(max_examples=150, stateful_step_count=50,
                                               deadline=None)
TestCacheMachine = CacheMachineModel.TestCase


def test_touch_of_a_block_removed_meanwhile_is_not_resurrected_by_compaction(tmp_path):
    """Regression: completing a request re-touches its reused prefix; a block the engine
    removed in between used to be logged as touched, and compaction then rewrote its record,
    so a restart brought it back (kept for the checkpointing compaction)."""
    store = StateStore(str(tmp_path / "s"), CachePlaneMachine(), map_size=1 << 20)
    index = 0

    def apply(cmd):
        nonlocal index
        index += 1
        return store.apply_entry(index, 0, [cmd])[0]

    apply({"op": "cp.register_model", "model": "m", "block_size": 16})
    apply({"op": "cp.register_node", "node": "a", "address": "a", "models": ["m"],
           "capacity_blocks": 50, "max_active": 5, "now_ms": 0, "lease_ms": 10**9})
    apply({"op": "cp.kv_events", "node": "a", "seq": 1,
           "events": [{"type": "stored", "block_hashes": [1, 2]}]})
    assert apply({"op": "cp.route", "model": "m", "blocks": [1, 2, 3], "request_id": "r",
                  "now_ms": 1})["matched_blocks"] == 2
    apply({"op": "cp.kv_events", "node": "a", "seq": 2,
           "events": [{"type": "removed", "block_hashes": [1]}]})
    apply({"op": "cp.complete", "request_id": "r", "node": "a", "status": "ok"})
    apply({"op": "cp.compact_log", "slot": 0})
    live = list(store.machine.index.lru_keys(0))
    store.close()
    reopened = StateStore(str(tmp_path / "s"), CachePlaneMachine(), map_size=1 << 20)
    try:
        assert list(reopened.machine.index.lru_keys(0)) == live == [3, 2]
    finally:
        reopened.close()
