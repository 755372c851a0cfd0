"""Two replicas fed the same commands, one of them through a snapshot restore, agree exactly."""

from __future__ import annotations

import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from cache_plane.machine import CachePlaneMachine
from veristore_py.storage import StateStore

NODE = st.sampled_from(["a", "b", "c"])
BLOCKS = st.lists(st.integers(0, 40), min_size=1, max_size=8)
COMMAND = st.one_of(
    st.builds(lambda n, cap: {"op": "cp.register_node", "node": n, "address": n, "models": ["m"],
                              "capacity_blocks": cap, "max_active": 3, "now_ms": 0,
                              "lease_ms": 10_000}, NODE, st.integers(4, 20)),
    st.builds(lambda b, s, r: {"op": "cp.route", "model": "m", "blocks": b, "session_id": s,
                               "request_id": f"r{r}", "now_ms": 1}, BLOCKS,
              st.sampled_from(["s1", "s2"]), st.integers(0, 30)),
    st.builds(lambda r, n: {"op": "cp.complete", "request_id": f"r{r}", "node": n,
                            "status": "ok", "output_blocks": [r + 1000]},
              st.integers(0, 30), NODE),
    st.builds(lambda n, b, q: {"op": "cp.kv_events", "node": n, "seq": q,
                               "events": [{"type": "stored", "block_hashes": b}]},
              NODE, BLOCKS, st.integers(0, 50)),
    st.builds(lambda n: {"op": "cp.remove_node", "node": n}, NODE),
    st.builds(lambda t: {"op": "cp.expire", "now_ms": t}, st.integers(0, 20_000)),
    st.builds(lambda n: {"op": "cp.compact_log"} if n < 0 else {"op": "cp.compact_log", "slot": n},
              st.integers(-1, 3)),
)


def run(store, commands, start):
    results = []
    for i, cmd in enumerate(commands, start):
        results.extend(store.apply_entry(i, 0, [cmd]))
    return results


@settings(max_examples=40, deadline=None)
@given(st.lists(COMMAND, min_size=2, max_size=60), st.data())
def test_replay_through_snapshot_restore_gives_identical_digest_and_results(commands, data):
    """Same command sequence -> same results and digest, with or without a snapshot install."""
    cut = data.draw(st.integers(1, len(commands) - 1))
    setup = {"op": "cp.register_model", "model": "m", "block_size": 16}
    with tempfile.TemporaryDirectory() as d:
        a = StateStore(d + "/a", CachePlaneMachine(), map_size=1 << 20)
        b = StateStore(d + "/b", CachePlaneMachine(), map_size=1 << 20)
        c = StateStore(d + "/c", CachePlaneMachine(), map_size=1 << 20)
        try:
            results_a = run(a, [setup, *commands], 1)
            results_b = run(b, [setup, *commands[:cut]], 1)
            view = b.open_snapshot()
            with tempfile.TemporaryFile() as f:
                b.write_snapshot(view, f)
                b.close_snapshot(view)
                f.seek(0)
                c.install_snapshot(f)
            results_c = run(c, commands[cut:], cut + 2)
            assert results_a == results_b + results_c
            assert a.digest() == c.digest()
            assert c.machine.decide({"model": "m", "blocks": [1, 2, 3], "now_ms": 2}) == \
                a.machine.decide({"model": "m", "blocks": [1, 2, 3], "now_ms": 2})
        finally:
            a.close()
            b.close()
            c.close()
