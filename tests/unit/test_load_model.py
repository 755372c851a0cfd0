"""The load model (expected ms to first token) and its calibration from completion reports."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cache_plane.calibration import (
    DEFAULT_SPEEDS,
    NOTHING_LEARNED,
    SPREAD,
    Learned,
    Report,
    Speeds,
    learn,
    pool,
    speeds,
)
from cache_plane.index import PrefixIndex, block_keys
from cache_plane.machine import CachePlaneMachine
from cache_plane.model import ModelSpec, Node
from cache_plane.policy import decide, load_model, running_slots
from cache_plane.sim.engine import Engine, EngineConfig, LatencyModel, Request
from tests.conftest import DictReader
from veristore_py.state import ApplyContext

MODEL = ModelSpec("m", 0, block_size=16)


def _node(name: str, slot: int, active: int = 0, queue: int = 0, slots: int = 8,
          prefill_until: int = 0) -> Node:
    return Node(name, slot, name, ("m",), capacity_blocks=1 << 20, max_active=1 << 16,
                active=active, queue=queue, max_running=slots, prefill_until_ms=prefill_until)


def _decide(nodes: list[Node], blocks: int, index: PrefixIndex | None = None, now: int = 0):
    keys = block_keys(0, list(range(1, blocks + 1)))
    return decide(MODEL, keys, nodes, index or PrefixIndex(), lambda s, k: False, lambda s: 0,
                  now_ms=now)


def test_a_node_with_a_long_waiting_queue_never_looks_idle():
    """89 requests waiting behind 8 full slots cost minutes, whatever prefix the node holds."""
    busy, calm = _node("busy", 0, active=8, queue=89), _node("calm", 1, active=4)
    wait = load_model(busy, DEFAULT_SPEEDS, now_ms=0, block_size=16)
    turnover = DEFAULT_SPEEDS.output_tokens * DEFAULT_SPEEDS.decode_ms_per_token / 8
    assert wait.queue_ms >= 90 * turnover  # 90 requests must finish before it gets a slot
    assert load_model(calm, DEFAULT_SPEEDS, now_ms=0, block_size=16).queue_ms == 0
    index = PrefixIndex()
    index.add(0, block_keys(0, list(range(1, 27))), 0, 0)  # the whole prompt is cached on busy
    decision = _decide([busy, calm], 26, index)
    assert decision.node_id == "calm"
    by_node = {c.node_id: c for c in decision.candidates}
    assert by_node["busy"].saved_ms > 0 and by_node["busy"].ttft_ms > by_node["calm"].ttft_ms


def test_the_prefix_is_worth_the_prefill_it_saves():
    """Equal load: the holder wins, and its saving equals the skipped prefill in ms."""
    index = PrefixIndex()
    index.add(0, block_keys(0, list(range(1, 101))), 0, 0)
    decision = _decide([_node("a", 0), _node("b", 1)], 120, index)
    by_node = {c.node_id: c for c in decision.candidates}
    per_token = DEFAULT_SPEEDS.prefill_ms_per_token
    assert decision.node_id == "a" and decision.route_type == "prefix"
    assert abs(by_node["a"].saved_ms - 100 * 16 * per_token) < 1e-6
    assert abs(by_node["b"].prefill_ms - by_node["a"].prefill_ms - by_node["a"].saved_ms) < 1e-6


LOADS = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 40), st.integers(0, 5_000)),
                 min_size=2, max_size=6)


@settings(max_examples=200, deadline=None)
@given(LOADS)
def test_a_2_block_and_a_200_block_prompt_go_to_the_same_node_when_only_load_differs(loads):
    """No term is divided by the prompt's size: its length cannot change the load ranking."""
    nodes = [_node(f"n{i}", i, active=min(a, 8), queue=q if a >= 8 else 0, prefill_until=p)
             for i, (a, q, p) in enumerate(loads)]
    short, long = _decide(nodes, 2, now=100), _decide(nodes, 200, now=100)
    assert short.node_id == long.node_id


def test_a_burst_of_routes_between_heartbeats_spreads_and_queues():
    """Routes the engines have not reported yet count as running, then as waiting."""
    h = _Harness(slots=4)
    h("cp.heartbeat", node="a", active=0, queue=0, lease_ms=10**9)
    h("cp.heartbeat", node="b", active=0, queue=0, lease_ms=10**9)
    placed = [h.route(list(range(i * 100, i * 100 + 4)))["node_id"] for i in range(12)]
    counts = {n: placed.count(n) for n in ("a", "b")}
    assert counts == {"a": 6, "b": 6}
    a = h.m.nodes["a"]
    assert (a.active, a.queue) == (4, 2)


def test_a_completion_hands_the_slot_to_a_waiting_request():
    """FCFS: when a request leaves a full node, the queue shrinks and the running count stays."""
    h = _Harness(nodes=("a",), slots=2)
    ids = [h.route([i])["request_id"] for i in range(1, 5)]
    a = h.m.nodes["a"]
    assert (a.active, a.queue) == (2, 2)
    h("cp.complete", request_id=ids[0], node="a", status="ok")
    assert (a.active, a.queue) == (2, 1)


def test_learn_clamps_absurd_samples_and_ignores_missing_fields():
    """One wild report moves a value a bounded step; a report without timings teaches nothing."""
    prior = DEFAULT_SPEEDS
    kw = {"elapsed_ms": 0, "expected_wait_ms": 0.0, "expected_new_tokens": 1_000}
    assert learn(NOTHING_LEARNED, Report(), prior, **kw) == NOTHING_LEARNED
    wild = learn(NOTHING_LEARNED, Report(prompt_tokens=1_000, cached_tokens=0, output_tokens=2,
                                         ttft_ms=10**9, latency_ms=10**9 + 1), prior, **kw)
    assert wild.prefill_n == 1
    assert wild.prefill_ms_per_token <= prior.prefill_ms_per_token * (1 + SPREAD) / 2
    learned = speeds(Learned(output_n=3, output_tokens=100.0, new_tokens=50.0), prior)
    assert learned.output_tokens == 100.0 and learned.decode_ms_per_token == prior.decode_ms_per_token


def test_learned_rates_converge_on_a_node_slower_than_the_settings():
    """A simulated engine 2.5x slower than the priors: its learned speeds approach its own."""
    truth = LatencyModel(prefill_ms_per_token=0.035 * 2.5, prefill_base_ms=10.0,
                         decode_base_ms=25.0, decode_ms_per_seq=0.0)
    engine = Engine("a", EngineConfig(capacity_blocks=100_000, block_size=16, max_num_seqs=8,
                                      latency=truth))
    h = _Harness(nodes=("a",), slots=8)
    now = 0.0
    for i in range(120):  # one request at a time: the wait the model expects is none
        prompt = 1_024 + (i * 37) % 2_048
        blocks = [i * 10_000 + b for b in range(prompt // 16)]
        routed = h.route(blocks, now=int(now))
        request = Request(routed["request_id"], blocks, prompt, 64 + (i * 13) % 300, now)
        engine.submit(request)
        while not engine.idle():
            step = engine.step(now)
            assert step is not None
            now = step.ends_ms
        h("cp.complete", request_id=request.request_id, node="a", status="ok", now_ms=int(now),
          prompt_tokens=prompt, output_tokens=request.output_tokens,
          cached_tokens=request.reused_tokens, ttft_ms=round(request.ttft_ms),
          latency_ms=round(request.e2e_ms))
        now += 1_000
    learned = h.m.nodes["a"].learned
    pace = speeds(learned, DEFAULT_SPEEDS)
    assert learned.prefill_n > 100 and learned.decode_n > 100
    assert abs(pace.prefill_ms_per_token / truth.prefill_ms_per_token - 1) < 0.2
    assert abs(pace.decode_ms_per_token / truth.decode_base_ms - 1) < 0.1
    assert 150 < pace.output_tokens < 260  # the mean of 64..363


class _Harness:
    """A machine with one model and two nodes of `slots` running slots (dict-backed store)."""

    def __init__(self, nodes: tuple[str, ...] = ("a", "b"), slots: int = 4) -> None:
        self.m = CachePlaneMachine()
        self.store = DictReader()
        self.index = 0
        self.rid = 0
        self("cp.register_model", model="m", block_size=16)
        for n in nodes:
            self("cp.register_node", node=n, address=n, models=["m"], capacity_blocks=1 << 20,
                 max_active=1 << 10, max_running=slots, lease_ms=10**9)

    def __call__(self, op: str, now_ms: int = 0, **cmd):
        self.index += 1
        out = self.m.apply({"op": op, "now_ms": now_ms, **cmd}, self.store,
                           ApplyContext(self.index, 0, now_ms))
        self.store.write(out.mutations)
        return out.result

    def route(self, blocks: list[int], now: int = 0):
        self.rid += 1
        return self("cp.route", now_ms=now, model="m", blocks=blocks, request_id=f"r{self.rid}")


def test_speeds_fall_back_to_the_prior_until_sampled():
    """A node that has learned nothing is priced with the settings' speeds."""
    prior = Speeds(0.5, 20.0, 100.0)
    assert speeds(NOTHING_LEARNED, prior) == prior


def test_a_kv_limited_engine_runs_fewer_requests_than_its_slots():
    """128 slots, but a KV cache for ~10 requests of the node's mean size: 10 run at once."""
    node = _node("a", 0, slots=128)
    node.capacity_blocks = -(-10 * (2_000 + 500) // 16)
    pace = Speeds(0.03, 10.0, output_tokens=500.0, new_tokens=2_000.0)
    assert running_slots(node, pace, 16) == 10
    node.active, node.queue = 10, 0
    assert load_model(node, pace, now_ms=0, block_size=16).queue_ms > 0


def test_a_node_is_priced_with_its_speeds_shrunk_towards_the_fleets():
    """Noise on one node moves its price by half at most; a new node starts at the fleet's."""
    fleet = [Learned(prefill_n=128, prefill_ms_per_token=0.02, decode_n=32,
                     decode_ms_per_token=20.0, output_n=32, output_tokens=300.0,
                     first_token_ms=30.0) for _ in range(7)]
    odd = Learned(prefill_n=128, prefill_ms_per_token=0.06, decode_n=32, decode_ms_per_token=20.0,
                  output_n=32, output_tokens=300.0, first_token_ms=30.0)
    shared = pool([*fleet, odd])
    priced = speeds(odd, DEFAULT_SPEEDS, shared)
    assert 0.02 < priced.prefill_ms_per_token < 0.045
    fresh = speeds(NOTHING_LEARNED, DEFAULT_SPEEDS, shared)
    assert fresh.prefill_ms_per_token == shared.prefill[0]
    assert fresh.decode_ms_per_token == 20.0 and fresh.output_tokens == 300.0
