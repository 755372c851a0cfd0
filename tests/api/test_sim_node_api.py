"""The simulated node's vLLM-compatible API, through aiohttp's test client."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from cache_plane.hashing import DEFAULT_SEED
from cache_plane.sim.server import SIM_NODE, SimNodeSettings, create_app
from cache_plane.tokenization import load_tokenizer, packaged_model_dir, request_block_hashes


@pytest.fixture
async def client(aiohttp_client):
    return await aiohttp_client(create_app(SimNodeSettings(time_scale=1000.0, block_size=4)))


async def test_models_health_and_plain_completion(client):
    assert (await client.get("/health")).status == 200
    models = await (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == "sim-llm"
    resp = await client.post("/v1/completions", json={"prompt": "a b c d e f g h",
                                                      "max_tokens": 5})
    body = await resp.json()
    assert resp.status == 200 and body["object"] == "text_completion"
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13,
                             "prompt_tokens_details": {"cached_tokens": 0}}


async def test_streamed_chat_completion_ends_with_done(client):
    resp = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3,
        "stream": True})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) == 5  # role chunk, 3 tokens, [DONE]
    first, last = json.loads(events[0]), json.loads(events[-2])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last["choices"][0]["finish_reason"] == "length"


async def test_repeated_prompt_hits_the_prefix_cache(client):
    prompt = " ".join(f"w{i}" for i in range(40))
    for _ in range(2):
        assert (await client.post("/v1/completions", json={"prompt": prompt,
                                                           "max_tokens": 2})).status == 200
    metrics = await (await client.get("/metrics")).text()
    hits = next(line for line in metrics.splitlines() if line.startswith("vllm:prefix_cache_hits"))
    assert float(hits.rsplit(" ", 1)[1]) == 40  # the second request reused all 10 full blocks


@pytest.mark.parametrize("path,body,status", [
    ("/v1/completions", b"{nope", 400),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', 400),
    ("/v1/completions", b'{"prompt": 3}', 400),
    ("/v1/chat/completions", b'{"messages": []}', 400),
    ("/v1/completions", b'{"prompt": "x", "model": "other"}', 404),
])
async def test_bad_requests_get_openai_style_errors(client, path, body, status):
    resp = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == status and (await resp.json())["object"] == "error"


def test_latency_flags_reach_the_engine_and_bad_values_are_refused(capsys):
    from cache_plane.cli import build_parser
    from cache_plane.sim.engine import DEFAULT_LATENCY, LatencyModel

    args = build_parser().parse_args(["sim-node", "--decode-ms-per-seq", "0.5",
                                      "--prefill-ms-per-token", "0.1"])
    assert (args.prefill_ms_per_token, args.prefill_base_ms, args.decode_base_ms,
            args.decode_ms_per_seq) == (0.1, DEFAULT_LATENCY.prefill_base_ms,
                                        DEFAULT_LATENCY.decode_base_ms, 0.5)
    from cache_plane.sim.server import SimNode
    node = SimNode(SimNodeSettings(latency=LatencyModel(0.1, 0.0, 1.0, 0.5)))
    assert node.engine.config.latency.decode_ms_per_seq == 0.5
    for bad in (["--decode-base-ms", "-1"], ["--prefill-ms-per-token", "nan"],
                ["--time-scale", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["sim-node", *bad])
        assert exit_info.value.code == 2
        assert bad[0] in capsys.readouterr().err


# -- vLLM fidelity: usage, streams, /tokenize, auth, LoRA and cache_salt, faults -------------

CHAT = [{"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is a prefix cache, and why does routing matter?"}]


@pytest.fixture
async def hf_client(aiohttp_client):
    return await aiohttp_client(create_app(SimNodeSettings(
        time_scale=1000.0, block_size=4, tokenizer=packaged_model_dir(),
        lora_modules=("sql-adapter",))))


def _events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


async def _cached(client, path: str, body: dict) -> int:
    resp = await client.post(path, json={"max_tokens": 2, **body})
    assert resp.status == 200, await resp.text()
    return (await resp.json())["usage"]["prompt_tokens_details"]["cached_tokens"]


async def test_a_repeated_prompt_reports_its_cached_tokens(client):
    """usage.prompt_tokens_details.cached_tokens: 0 the first time, the full blocks the next."""
    prompt = " ".join(f"w{i}" for i in range(42))  # 10 full blocks of 4, then 2 tokens
    assert await _cached(client, "/v1/completions", {"prompt": prompt}) == 0
    assert await _cached(client, "/v1/completions", {"prompt": prompt}) == 40


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": CHAT}),
    ("/v1/completions", {"prompt": "one two three four five"}),
])
async def test_include_usage_adds_a_usage_chunk_before_done(hf_client, path, body):
    """stream_options.include_usage: a last chunk with choices [] and the usage, then [DONE]."""
    resp = await hf_client.post(path, json={**body, "max_tokens": 3, "stream": True,
                                            "stream_options": {"include_usage": True}})
    events = _events(await resp.text())
    assert events[-1] == "[DONE]"
    usage_chunk, last = json.loads(events[-2]), json.loads(events[-3])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 3
    assert usage_chunk["usage"]["total_tokens"] == usage_chunk["usage"]["prompt_tokens"] + 3
    assert "cached_tokens" in usage_chunk["usage"]["prompt_tokens_details"]
    assert last["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in json.loads(e) for e in events[:-2])
    plain = await hf_client.post(path, json={**body, "max_tokens": 3, "stream": True})
    assert all(json.loads(e)["choices"] for e in _events(await plain.text())[:-1])


async def test_tokenize_returns_the_token_ids_the_engine_runs(hf_client):
    """/tokenize equals HFTokenizer.chat_token_ids / prompt_token_ids, and usage counts them."""
    tok = load_tokenizer(packaged_model_dir())
    resp = await hf_client.post("/tokenize", json={"model": "sim-llm", "messages": CHAT,
                                                   "return_token_strs": True})
    body = await resp.json()
    assert body["tokens"] == tok.chat_token_ids(CHAT) and body["count"] == len(body["tokens"])
    assert body["token_strs"][0] == "<|begin_of_text|>" and body["max_model_len"] > 0
    resp = await hf_client.post("/tokenize", json={"messages": CHAT,
                                                   "add_generation_prompt": False})
    assert (await resp.json())["tokens"] == tok.chat_token_ids(CHAT, add_generation_prompt=False)
    resp = await hf_client.post("/tokenize", json={"prompt": "Hello there"})
    expected = tok.prompt_token_ids("Hello there")
    assert (await resp.json()) == {"count": len(expected), "max_model_len": body["max_model_len"],
                                   "tokens": expected, "token_strs": None}
    chat = await (await hf_client.post("/v1/chat/completions", json={"messages": CHAT})).json()
    assert chat["usage"]["prompt_tokens"] == body["count"]
    for bad in ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, {},
                {"prompt": ["a", "b"]}):
        resp = await hf_client.post("/tokenize", json=bad)
        assert resp.status == 400 and (await resp.json())["object"] == "error"
    assert (await hf_client.post("/tokenize", json={"model": "x", "prompt": "a"})).status == 404


async def test_api_key_guards_v1_tokenize_and_sim_but_not_health(aiohttp_client):
    """With api_key: 401 (vLLM-shaped) without the bearer token, 200 with it; /health is open."""
    client = await aiohttp_client(create_app(SimNodeSettings(time_scale=1000.0,
                                                             api_key="sekret")))
    for method, path in (("GET", "/v1/models"), ("POST", "/tokenize"), ("GET", "/sim/faults"),
                         ("POST", "/v1/completions")):
        resp = await client.request(method, path, json={"prompt": "a"},
                                    headers={"Authorization": "Bearer wrong"})
        body = await resp.json()
        assert resp.status == 401 and body["object"] == "error" and body["code"] == 401, path
    assert (await client.get("/health")).status == 200
    ok = await client.get("/v1/models", headers={"Authorization": "Bearer sekret"})
    assert ok.status == 200


async def test_lora_and_cache_salt_change_the_block_hashes(hf_client):
    """A LoRA model name or a cache_salt hashes the same tokens into other blocks (vLLM)."""
    messages = {"messages": CHAT}
    assert await _cached(hf_client, "/v1/chat/completions", messages) == 0
    assert await _cached(hf_client, "/v1/chat/completions", messages) > 0
    lora = {**messages, "model": "sql-adapter"}
    assert await _cached(hf_client, "/v1/chat/completions", lora) == 0
    assert await _cached(hf_client, "/v1/chat/completions", lora) > 0
    salted = {**messages, "cache_salt": "tenant-a"}
    assert await _cached(hf_client, "/v1/chat/completions", salted) == 0
    assert await _cached(hf_client, "/v1/chat/completions", salted) > 0
    assert await _cached(hf_client, "/v1/chat/completions",
                         {**messages, "cache_salt": "tenant-b"}) == 0
    engine = hf_client.server.app[SIM_NODE].engine
    ids = load_tokenizer(packaged_model_dir()).chat_token_ids(CHAT)
    for lora_name, salt in ((None, None), ("sql-adapter", None), (None, "tenant-a")):
        assert all(engine.holds(h) for h in request_block_hashes(
            ids, 4, DEFAULT_SEED, lora_name=lora_name, cache_salt=salt))
    resp = await hf_client.post("/v1/chat/completions", json=lora)
    assert (await resp.json())["model"] == "sql-adapter"
    models = await (await hf_client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["sim-llm", "sql-adapter"]
    for bad, status in (({"model": "other"}, 404), ({"cache_salt": ""}, 400)):
        resp = await hf_client.post("/v1/chat/completions", json={**messages, **bad})
        assert resp.status == status and (await resp.json())["object"] == "error"


async def test_fault_refuse_5xx_for_count_requests_then_normal(client):
    """refuse_5xx answers a vLLM-shaped 5xx for `count` requests, then the node serves again."""
    resp = await client.post("/sim/faults", json={"mode": "refuse_5xx", "status": 502,
                                                  "count": 2})
    assert (await resp.json())["remaining"] == 2
    for _ in range(2):
        resp = await client.post("/v1/completions", json={"prompt": "a b"})
        assert resp.status == 502 and (await resp.json())["object"] == "error"
    assert (await client.post("/v1/completions", json={"prompt": "a b"})).status == 200
    assert (await (await client.get("/sim/faults")).json())["mode"] == "none"


async def test_fault_hang_outlasts_a_client_timeout_until_released(client):
    """hang sends no byte (a client read timeout fires); changing the plan releases it."""
    await client.post("/sim/faults", json={"mode": "hang"})
    with pytest.raises(asyncio.TimeoutError):
        await client.post("/v1/completions", json={"prompt": "a b"},
                          timeout=aiohttp.ClientTimeout(total=0.3))
    hung = asyncio.ensure_future(client.post("/v1/completions", json={"prompt": "a b"}))
    await asyncio.sleep(0.1)
    assert not hung.done()
    await client.post("/sim/faults", json={"mode": "none"})
    assert (await asyncio.wait_for(hung, 5)).status == 200
    await client.post("/sim/faults", json={"mode": "hang", "hang_s": 0.05})
    assert (await client.post("/v1/completions", json={"prompt": "a b"})).status == 200


async def test_fault_break_midstream_cuts_the_stream_after_n_events(client):
    """break_midstream: `after_chunks` events arrive, then the connection drops (no [DONE])."""
    await client.post("/sim/faults", json={"mode": "break_midstream", "after_chunks": 2})
    resp = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True})
    assert resp.status == 200
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in resp.content.iter_any():
            received += chunk
    assert received.count(b"data: ") == 2 and b"[DONE]" not in received
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.post("/v1/completions", json={"prompt": "a b"})


async def test_bad_fault_plans_are_refused_with_every_problem(client):
    """An invalid plan is a 400 naming each bad field; the plan stays as it was."""
    resp = await client.post("/sim/faults", json={"mode": "explode", "status": 404,
                                                  "count": 0, "extra": 1})
    message = (await resp.json())["message"]
    assert resp.status == 400
    assert all(word in message for word in ("mode", "status", "count", "extra"))
    assert (await (await client.get("/sim/faults")).json())["mode"] == "none"
