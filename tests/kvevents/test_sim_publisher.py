"""The sim-node's ZMQ KV-event publisher on real sockets: vLLM's frames, layouts, hash forms,
replay (both framings, evicted start), its faults, and a real sim-node process end to end.

Expected payloads are written out here from the documented field lists (the research note,
vLLM's `kv_events.py` declarations), not from the module's own constants.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from cache_plane.hashing import DEFAULT_SEED, to_external
from cache_plane.sim.engine import BlockEvicted, BlocksStored, Engine, EngineConfig, Request
from cache_plane.sim.kv_publisher import (
    EventBuilder,
    KVEventPublisher,
    KVEventsSettings,
    all_blocks_cleared,
    kv_events_problems,
)
from cache_plane.sim.server import SIM_NODE, SimNodeSettings, create_app
from cache_plane.tokenization import request_block_digests, request_block_hashes
from veristore_py.errors import ConfigError
from veristore_py.localcluster import free_ports

END = b"\xff" * 8
BS = 4  # block size of the in-process scenarios


def seq8(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def publishers() -> Iterator[Any]:
    """Make publishers on fresh loopback ports; every one is closed at teardown."""
    made: list[KVEventPublisher] = []

    def make(**kwargs: Any) -> KVEventPublisher:
        pub_port, replay_port = free_ports(2)
        kwargs.setdefault("replay_endpoint", f"tcp://127.0.0.1:{replay_port}")
        publisher = KVEventPublisher(KVEventsSettings(f"tcp://127.0.0.1:{pub_port}", **kwargs))
        made.append(publisher)
        return publisher.start()

    yield make
    for publisher in made:
        publisher.close()


def subscribe(ctx: zmq.Context[Any], endpoint: str, topic: bytes = b"") -> zmq.Socket[Any]:
    """A SUB connected to `endpoint`, returned once its subscription has had time to land."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sub.connect(endpoint)
    assert monitor.poll(10_000), "the SUB never connected"
    recv_monitor_message(monitor)
    sub.disable_monitor()
    monitor.close(linger=0)
    time.sleep(0.2)  # the subscription travels after the handshake
    return sub


def receive(sock: zmq.Socket[Any], timeout: float = 10.0) -> list[bytes]:
    assert sock.poll(int(timeout * 1000)), "nothing arrived"
    frames: list[bytes] = sock.recv_multipart()
    return frames


def nothing_more(sock: zmq.Socket[Any], wait: float = 0.3) -> bool:
    return not sock.poll(int(wait * 1000))


def replay(ctx: zmq.Context[Any], endpoint: str, start: int) -> list[list[bytes]]:
    """Ask the ROUTER for everything from `start` as a DEALER; every reply, end marker last."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart([b"", seq8(start)])
        replies = []
        while True:
            frames = receive(dealer)
            replies.append(frames)
            if frames[-1] == b"" and frames[-2] == END:
                return replies
    finally:
        dealer.close()


def scenario(config_block_size: int = BS) -> tuple[list[BlocksStored | BlockEvicted],
                                                   list[BlocksStored | BlockEvicted],
                                                   Request, Request]:
    """Two engine steps: A caches 3 blocks; B then evicts A's tail (2 blocks) for its own 2."""
    engine = Engine("n", EngineConfig(capacity_blocks=4, block_size=config_block_size,
                                      kv_changes=True))
    a = request("a", list(range(100, 112)))
    b = request("b", list(range(200, 208)))
    engine.submit(a)
    first = engine.step(0.0)
    assert first is not None and engine.idle()
    engine.submit(b)
    second = engine.step(first.ends_ms)
    assert second is not None
    return first.changes, second.changes, a, b


def request(rid: str, tokens: list[int], lora: str | None = None) -> Request:
    digests = request_block_digests(tokens, BS, DEFAULT_SEED, lora)
    return Request(rid, [to_external(d) for d in digests], len(tokens), 1, 0.0,
                   token_ids=tokens, lora_name=lora, digests=digests)


def stored_array(hashes: list[Any], parent: Any, tokens: list[int]) -> list[Any]:
    return ["BlockStored", hashes, parent, tokens, BS, None, "GPU", None, [None] * len(hashes),
            0, "full_attention", None]


def stored_map(hashes: list[Any], parent: Any, tokens: list[int]) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": BS, "lora_id": None, "medium": "GPU",
            "lora_name": None, "extra_keys": [None] * len(hashes), "group_idx": 0,
            "kv_cache_spec_kind": "full_attention"}


def removed(layout: str, block_hash: Any) -> Any:
    if layout == "array":
        return ["BlockRemoved", [block_hash], "GPU", 0]
    return {"type": "BlockRemoved", "block_hashes": [block_hash], "medium": "GPU", "group_idx": 0}


# -- the wire -----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["array", "map"])
@pytest.mark.parametrize("hash_form", ["int", "bytes"])
def test_live_frames_follow_the_documented_layouts(ctx, publishers, layout, hash_form):
    """SUB gets [topic, seq 0.., payload]; payloads decode to vLLM's layout in either hash form."""
    first, second, a, b = scenario()
    publisher = publishers(layout=layout, hash_form=hash_form, topic="kv@gpu0@m")
    builder = EventBuilder(publisher.settings, BS)
    sub = subscribe(ctx, publisher.endpoints[0])
    publisher.publish(builder.build(first), ts=1.5)
    publisher.publish(builder.build(second), ts=2.5)
    frames = [receive(sub), receive(sub)]
    assert [f[0] for f in frames] == [b"kv@gpu0@m"] * 2
    assert [f[1] for f in frames] == [seq8(0), seq8(1)]
    batches = [msgpack.unpackb(f[2]) for f in frames]
    assert [(x[0], x[2]) for x in batches] == [(1.5, 0), (2.5, 0)]
    assert isinstance(batches[0][0], float)

    def h(req: Request, i: int) -> Any:
        return req.digests[i] if hash_form == "bytes" else req.blocks[i]

    stored = stored_array if layout == "array" else stored_map
    assert batches[0][1] == [stored([h(a, 0), h(a, 1), h(a, 2)], None, list(range(100, 112)))]
    # B evicts A's chain tail first, then stores its own two blocks (one BlockStored).
    assert batches[1][1] == [removed(layout, h(a, 2)), removed(layout, h(a, 1)),
                             stored([h(b, 0), h(b, 1)], None, list(range(200, 208)))]
    if layout == "map":
        assert list(batches[0][1][0]) == [
            "type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
            "medium", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind"]
    if hash_form == "bytes":
        digests = batches[0][1][0]["block_hashes" if layout == "map" else 1]
        assert all(len(d) == 32 for d in digests)
        assert [int.from_bytes(d[-8:], "big") for d in digests] == a.blocks


def test_runs_of_new_blocks_name_their_parent_and_lora():
    """A request that reuses a cached prefix stores its new blocks with the parent before them."""
    engine = Engine("n", EngineConfig(capacity_blocks=100, block_size=BS, kv_changes=True))
    a = request("a", list(range(8)), lora="ad1")
    engine.submit(a)
    assert engine.step(0.0) is not None
    c = request("c", [*range(8), *range(50, 58)], lora="ad1")
    engine.submit(c)
    result = engine.step(10.0)
    assert result is not None and c.reused_blocks == 2
    run = result.changes[0]
    assert isinstance(run, BlocksStored)
    assert (run.block_hashes, run.parent, run.start) == (c.blocks[2:], c.blocks[1], 2)
    settings = KVEventsSettings("tcp://127.0.0.1:1", layout="map")
    c.extra_keys = [("ad1",)] * 4
    event = EventBuilder(settings, BS, lora_modules=("ad0", "ad1")).build(result.changes)[0]
    assert event["token_ids"] == list(range(50, 58)) and event["parent_block_hash"] == c.blocks[1]
    assert (event["lora_name"], event["lora_id"], event["extra_keys"]) == \
        ("ad1", 2, [("ad1",), ("ad1",)])


def test_all_blocks_cleared_in_both_layouts():
    """AllBlocksCleared has no fields: a bare tag, or a map with only its type."""
    assert all_blocks_cleared("array") == ["AllBlocksCleared"]
    assert all_blocks_cleared("map") == {"type": "AllBlocksCleared"}


# -- replay -------------------------------------------------------------------------------------

@pytest.mark.parametrize("framing", ["v025", "v026"])
def test_replay_returns_buffered_batches_then_the_end_marker(ctx, publishers, framing):
    """A DEALER asking from seq 2 gets seqs 2..4 with their live payloads, then the end marker."""
    publisher = publishers(replay_framing=framing, topic="kv-events")
    sub = subscribe(ctx, publisher.endpoints[0])
    for i in range(5):
        publisher.publish([["AllBlocksCleared"]], ts=float(i))
    live = {f[1]: f[2] for f in (receive(sub) for _ in range(5))}
    replies = replay(ctx, publisher.endpoints[1], 2)
    head = [b""] if framing == "v025" else [b"", b"kv-events"]
    assert replies[:-1] == [[*head, seq8(s), live[seq8(s)]] for s in (2, 3, 4)]
    assert replies[-1] == ([b"", END, b""] if framing == "v025" else [b"", b"", END, b""])


def test_replay_from_an_evicted_seq_silently_starts_later(ctx, publishers):
    """With 3 batches kept of 5, a replay from 0 starts at 2 (the consumer must notice)."""
    publisher = publishers(buffer_steps=3)
    for i in range(5):
        publisher.publish([["AllBlocksCleared"]], ts=float(i))
    assert publisher.sync()
    replies = replay(ctx, publisher.endpoints[1], 0)
    assert [r[1] for r in replies[:-1]] == [seq8(2), seq8(3), seq8(4)]
    assert publisher.view()["oldest_buffered_seq"] == 2


def test_invalid_replay_requests_are_ignored(ctx, publishers):
    """A malformed request gets no answer; the next valid one is served."""
    publisher = publishers()
    publisher.publish([["AllBlocksCleared"]])
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(publisher.endpoints[1])
    dealer.send_multipart([b"", b"\x00\x01"])            # seq not 8 bytes
    dealer.send_multipart([b"x", seq8(0)])               # no empty delimiter
    assert nothing_more(dealer)
    dealer.close()
    assert [r[1] for r in replay(ctx, publisher.endpoints[1], 0)] == [seq8(0), END]
    assert publisher.view()["invalid_replays"] == 2


# -- faults -------------------------------------------------------------------------------------

def test_dropped_live_frames_leave_a_gap_that_replay_fills(ctx, publishers):
    """drop_live(2): the SUB sees seq 0 then 3; replay from 1 gives 1, 2, 3."""
    publisher = publishers()
    sub = subscribe(ctx, publisher.endpoints[0])
    publisher.publish([["AllBlocksCleared"]], ts=0.0)
    publisher.drop_live(2)
    for i in range(1, 4):
        publisher.publish([["AllBlocksCleared"]], ts=float(i))
    assert [receive(sub)[1], receive(sub)[1]] == [seq8(0), seq8(3)]
    assert nothing_more(sub)
    replies = replay(ctx, publisher.endpoints[1], 1)
    assert [(r[1], msgpack.unpackb(r[2])[0]) for r in replies[:-1]] == \
        [(seq8(1), 1.0), (seq8(2), 2.0), (seq8(3), 3.0)]
    assert publisher.view()["dropped_live"] == 2


def test_restart_resets_seq_and_empties_the_replay_buffer(ctx, publishers):
    """After restart() the stream starts again at seq 0 and replay knows only the new batches."""
    publisher = publishers()
    sub = subscribe(ctx, publisher.endpoints[0])
    publisher.publish([["AllBlocksCleared"]], ts=0.0)
    publisher.publish([["AllBlocksCleared"]], ts=1.0)
    publisher.restart()
    publisher.publish([["AllBlocksCleared"]], ts=2.0)
    assert [receive(sub)[1] for _ in range(3)] == [seq8(0), seq8(1), seq8(0)]
    replies = replay(ctx, publisher.endpoints[1], 0)
    assert [(r[1], msgpack.unpackb(r[2])[0]) for r in replies[:-1]] == [(seq8(0), 2.0)]


# -- settings -----------------------------------------------------------------------------------

def test_bad_settings_are_reported_all_at_once():
    """Every problem is named; the publisher refuses to start with any."""
    bad = KVEventsSettings("http://x:1", "tcp://a", layout="flat", hash_form="hex",
                           replay_framing="v9", buffer_steps=0)
    problems = kv_events_problems(bad)
    assert len(problems) == 6
    with pytest.raises(ConfigError) as info:
        KVEventPublisher(bad)
    assert info.value.problems == problems
    same = KVEventsSettings("tcp://127.0.0.1:5", "tcp://127.0.0.1:5")
    assert kv_events_problems(same) == ["kv-events replay endpoint must differ from the endpoint"]


def test_an_endpoint_in_use_is_a_config_error():
    """Binding a port someone holds fails at start with a ConfigError naming the endpoint."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        endpoint = f"tcp://127.0.0.1:{held.getsockname()[1]}"
        with pytest.raises(ConfigError, match="cannot bind the kv-events endpoint"):
            KVEventPublisher(KVEventsSettings(endpoint)).start()


def _sim_node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cache_plane", "sim-node", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_refuses_bad_kv_event_flags_without_a_traceback():
    """Bad values stop `sim-node` at start with exit 2 and every problem named."""
    done = _sim_node("--kv-events-endpoint", "nope", "--kv-events-replay-endpoint", "nope",
                     "--kv-events-buffer-steps", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "invalid sim-node flags" in done.stderr and done.stderr.count("kv-events") >= 3
    done = _sim_node("--kv-events-replay-endpoint", "tcp://127.0.0.1:5558")
    assert done.returncode == 2 and "needs --kv-events-endpoint" in done.stderr
    done = _sim_node("--kv-events-endpoint", "tcp://127.0.0.1:5557", "--kv-events-layout", "x")
    assert done.returncode == 2 and "invalid choice" in done.stderr
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = free_ports(1)[0]
        done = _sim_node("--port", str(port), "--kv-events-endpoint",
                         f"tcp://127.0.0.1:{held.getsockname()[1]}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot bind the kv-events endpoint" in done.stderr


# -- the sim-node -------------------------------------------------------------------------------

async def test_in_process_node_publishes_and_can_stop_http_reports(aiohttp_client, ctx):
    """A node with ZMQ on and HTTP reporting off publishes BlockStored, queues no HTTP report,
    and takes KV-event faults at /sim/kv-events."""
    pub_port, replay_port = free_ports(2)
    settings = SimNodeSettings(time_scale=1000.0, block_size=BS, kv_events_http=False,
                               kv_events=KVEventsSettings(
                                   f"tcp://127.0.0.1:{pub_port}",
                                   f"tcp://127.0.0.1:{replay_port}", layout="map"))
    client = await aiohttp_client(create_app(settings))
    node = client.server.app[SIM_NODE]
    sub = subscribe(ctx, f"tcp://127.0.0.1:{pub_port}")
    prompt = " ".join(f"w{i}" for i in range(10))
    resp = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert resp.status == 200
    frames = receive(sub)
    event = msgpack.unpackb(frames[2])[1][0]
    tokens = node.tokenizer.prompt_token_ids(prompt)
    assert event["token_ids"] == tokens[:8]
    assert event["block_hashes"] == request_block_hashes(tokens, BS)
    assert node.reports.empty()
    assert (await client.post("/sim/kv-events", json={"drop_live": -1})).status == 400
    view = await (await client.post("/sim/kv-events", json={"restart": True})).json()
    assert view["next_seq"] == 0 and view["buffered"] == 0
    assert (await (await client.get("/sim/kv-events")).json())["published"] == 1


def _free_endpoints() -> tuple[int, str, str]:
    http, pub, rep = free_ports(3)
    return http, f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{rep}"


def _post(url: str, body: Any) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


@pytest.mark.integration
def test_sim_node_process_publishes_what_it_computed(ctx, tmp_path):
    """A real `sim-node` with a tokenizer and the ZMQ flags: one chat request yields a
    BlockStored whose token ids and hashes are the node's own, live and by replay."""
    http, endpoint, replay_endpoint = _free_endpoints()
    log = open(tmp_path / "sim.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "cache_plane", "sim-node", "--port", str(http),
         "--model", "tiny-chat", "--tokenizer", "tiny-chat", "--prefill-ms-per-token", "0",
         "--decode-base-ms", "0", "--kv-events-endpoint", endpoint,
         "--kv-events-replay-endpoint", replay_endpoint, "--kv-events-topic", "kv@gpu0@tiny",
         "--kv-events-layout", "map", "--kv-events-hash", "bytes",
         "--kv-events-replay-framing", "v026", "--no-kv-events-http"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    break
            except OSError:
                assert process.poll() is None, (tmp_path / "sim.log").read_text()
                assert time.monotonic() < deadline, "the sim-node did not start"
                time.sleep(0.1)
        sub = subscribe(ctx, endpoint, b"kv@")
        messages = [{"role": "user", "content": "tell me about block hashes " * 12}]
        tokens = _post(base + "/tokenize", {"messages": messages})["tokens"]
        _post(base + "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
        topic, seq, payload = receive(sub)
        assert (topic, seq) == (b"kv@gpu0@tiny", seq8(0))
        ts, events, dp_rank = msgpack.unpackb(payload)
        assert isinstance(ts, float) and dp_rank == 0
        (event,) = events
        n = len(tokens) // 16
        assert n >= 2 and event["type"] == "BlockStored"
        assert event["token_ids"] == tokens[:n * 16] and event["block_size"] == 16
        assert event["parent_block_hash"] is None
        assert event["block_hashes"] == request_block_digests(tokens, 16)
        assert [int.from_bytes(d[-8:], "big") for d in event["block_hashes"]] == \
            request_block_hashes(tokens, 16)
        replies = replay(ctx, replay_endpoint, 0)
        assert replies == [[b"", b"kv@gpu0@tiny", seq8(0), payload], [b"", b"", END, b""]]
        view = _post(base + "/sim/kv-events", {"restart": True})
        assert view["next_seq"] == 0 and view["buffered"] == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# -- the reorder fault ----------------------------------------------------------------------------

def test_reorder_live_sends_the_next_batches_in_reverse_and_replays_them_in_order(
        ctx, publishers):
    """reorder_live(3): the SUB sees seq 0, then 3, 2, 1, then 4; replay from 0 gives 0..4."""
    publisher = publishers()
    sub = subscribe(ctx, publisher.endpoints[0])
    publisher.publish([["AllBlocksCleared"]], ts=0.0)
    publisher.reorder_live(3)
    publisher.publish([["AllBlocksCleared"]], ts=1.0)
    publisher.publish([["AllBlocksCleared"]], ts=2.0)
    assert receive(sub)[1] == seq8(0)
    assert nothing_more(sub)  # held until the third of the group is published
    assert publisher.view()["reorder_held"] == 2
    publisher.publish([["AllBlocksCleared"]], ts=3.0)
    publisher.publish([["AllBlocksCleared"]], ts=4.0)
    live = [receive(sub) for _ in range(4)]
    assert [(f[1], msgpack.unpackb(f[2])[0]) for f in live] == \
        [(seq8(3), 3.0), (seq8(2), 2.0), (seq8(1), 1.0), (seq8(4), 4.0)]
    replies = replay(ctx, publisher.endpoints[1], 0)
    assert [r[1] for r in replies[:-1]] == [seq8(s) for s in range(5)]
    view = publisher.view()
    assert (view["reordered_live"], view["sent_live"], view["reorder_held"],
            view["reorder_live_pending"]) == (3, 5, 0, 0)


def test_a_restart_discards_batches_held_for_a_reorder(ctx, publishers):
    """Batches held for a reorder are never sent once the publisher restarts (a new process)."""
    publisher = publishers()
    sub = subscribe(ctx, publisher.endpoints[0])
    publisher.reorder_live(2)
    publisher.publish([["AllBlocksCleared"]], ts=0.0)
    publisher.restart()
    publisher.publish([["AllBlocksCleared"]], ts=1.0)   # completes the group alone
    publisher.publish([["AllBlocksCleared"]], ts=2.0)
    live = [receive(sub) for _ in range(2)]
    assert [(f[1], msgpack.unpackb(f[2])[0]) for f in live] == [(seq8(0), 1.0), (seq8(1), 2.0)]
    assert nothing_more(sub)


async def test_sim_node_takes_the_reorder_fault_and_validates_it(aiohttp_client):
    """POST /sim/kv-events accepts reorder_live (an integer >= 0) and shows it pending."""
    pub_port, replay_port = free_ports(2)
    settings = SimNodeSettings(kv_events_http=False, kv_events=KVEventsSettings(
        f"tcp://127.0.0.1:{pub_port}", f"tcp://127.0.0.1:{replay_port}"))
    client = await aiohttp_client(create_app(settings))
    for bad in (-1, True, "2", 1.5):
        resp = await client.post("/sim/kv-events", json={"reorder_live": bad})
        assert resp.status == 400
        assert "reorder_live must be an integer >= 0" in (await resp.json())["message"]
    view = await (await client.post("/sim/kv-events", json={"reorder_live": 4})).json()
    assert (view["reorder_live_pending"], view["reorder_held"]) == (4, 0)
