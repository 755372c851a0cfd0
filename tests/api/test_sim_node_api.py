"""The simulated node's vLLM-compatible API, through aiohttp's test client."""

from __future__ import annotations

import json

import pytest

from cache_plane.sim.server import SimNodeSettings, create_app


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
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}


async def test_streamed_chat_completion_ends_with_done(client):
    resp = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3,
        "stream": True})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) == 4
    assert json.loads(events[0])["object"] == "chat.completion.chunk"


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
