"""The gateway in real processes: a 3-member cluster, two sim-nodes, two gateways, the
official `openai` client, curl, faults, a killed engine and a killed leader."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_plane.sim.stack import MODEL, GatewayStack

pytestmark = pytest.mark.integration

SYSTEM = "You are the router's assistant. Keep answers short and exact. " * 30


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    with GatewayStack(str(tmp_path_factory.mktemp("gw")), engines=2, gateways=2) as s:
        yield s


def client(stack: GatewayStack, i: int = 0, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.gateway_url(i), api_key=key or stack.api_key,
                         max_retries=0, timeout=30)


def messages(question: str, system: str = SYSTEM) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def post(url: str, body: Any, key: str | None = None) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def metric(stack: GatewayStack, i: int, name: str) -> float:
    with urllib.request.urlopen(stack.gateway_url(i)[:-3] + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def wait_reports(stack: GatewayStack, i: int, at_least: float, timeout: float = 10.0) -> None:
    """Wait until gateway `i`'s completion reports (sent in batches) reached the cluster."""
    deadline = time.monotonic() + timeout
    while metric(stack, i, "cache_plane_gateway_reports_sent_total") < at_least:
        assert time.monotonic() < deadline, "completion reports did not reach the cluster"
        time.sleep(0.01)


def test_chat_sync_and_prefix_reuse(stack: GatewayStack) -> None:
    """A repeated prompt is routed to the node holding it; the engine confirms the reuse."""
    c = client(stack)
    sent = metric(stack, 0, "cache_plane_gateway_reports_sent_total")
    first = c.chat.completions.create(model=MODEL, messages=messages("first?"), max_tokens=4)
    assert first.choices[0].message.content and first.usage is not None
    wait_reports(stack, 0, sent + 1)  # the cluster learns the prefix from the report
    raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=messages("again?"),
                                                      max_tokens=4)
    again = raw.parse()
    matched = int(raw.headers["x-cache-plane-matched-tokens"])
    assert raw.headers["x-cache-plane-node"] in ("gpu0", "gpu1")
    assert matched > 300
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    cached = again.usage.prompt_tokens_details.cached_tokens or 0
    assert abs(cached - matched) <= 16  # the cluster predicted what the engine reused


def test_completions_and_models(stack: GatewayStack) -> None:
    """Completions (not streamed) and the model list, OpenAI-shaped."""
    c = client(stack)
    out = c.completions.create(model=MODEL, prompt="route this prompt " * 10, max_tokens=3)
    assert out.usage is not None and out.usage.completion_tokens == 3
    assert [m.id for m in c.models.list()] == [MODEL]


def test_async_streaming_with_usage(stack: GatewayStack) -> None:
    """The async client streams chat; the usage chunk comes only when asked for."""
    async def run() -> tuple[list[Any], list[Any]]:
        async with openai.AsyncOpenAI(base_url=stack.gateway_url(1), api_key=stack.api_key,
                                      max_retries=0) as c:
            with_usage = [ch async for ch in await c.chat.completions.create(
                model=MODEL, messages=messages("stream?"), max_tokens=5, stream=True,
                stream_options={"include_usage": True})]
            without = [ch async for ch in await c.chat.completions.create(
                model=MODEL, messages=messages("stream 2?"), max_tokens=5, stream=True)]
            return with_usage, without

    with_usage, without = asyncio.run(run())
    assert with_usage[-1].usage is not None and with_usage[-1].choices == []
    assert with_usage[-1].usage.completion_tokens == 5
    assert all(ch.usage is None for ch in without)
    text = "".join(ch.choices[0].delta.content or "" for ch in without if ch.choices)
    assert len(text.split()) == 5


def test_errors_are_openai_shaped(stack: GatewayStack) -> None:
    """Bad key 401, unknown model 404, bad field 400 naming it, bad JSON 400."""
    with pytest.raises(openai.AuthenticationError):
        client(stack, key="sk-wrong-key-000").models.list()
    with pytest.raises(openai.NotFoundError) as nf:
        client(stack).chat.completions.create(model="nope", messages=messages("x"))
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client(stack).chat.completions.create(model=MODEL, messages=messages("x"),
                                              max_tokens=0)
    assert bad.value.param == "max_tokens"
    status, body = post(stack.gateway_url() + "/chat/completions", b"{not json", stack.api_key)
    assert status == 400 and body["error"]["param"] == "body"


def test_null_stream_options_on_a_stream(stack: GatewayStack) -> None:
    """`stream_options: null` on a stream is the same as leaving it out (no 500)."""
    body = json.dumps({"model": MODEL, "stream": True, "stream_options": None,
                       "max_tokens": 2, "messages": messages("null options?")}).encode()
    req = urllib.request.Request(stack.gateway_url() + "/chat/completions", data=body,
                                 headers={"Authorization": f"Bearer {stack.api_key}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200 and resp.read().endswith(b"data: [DONE]\n\n")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams(stack: GatewayStack) -> None:
    """`curl -N` gets a well-formed event stream ending in [DONE] (the docs' example)."""
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 3,
                       "messages": messages("curl?")})
    out = subprocess.run(
        ["curl", "-sN", stack.gateway_url() + "/chat/completions", "-H",
         f"Authorization: Bearer {stack.api_key}", "-H", "Content-Type: application/json",
         "-d", body], capture_output=True, timeout=30, check=True).stdout
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert all(e.startswith(b"data: ") for e in events)
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_second_gateway_reuses_what_the_first_warmed(stack: GatewayStack) -> None:
    """Gateway B routes to the node where gateway A's request left the prefix."""
    system = "A prefix only this test uses, long enough for many blocks. " * 30
    a = client(stack, 0).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages("warm", system), max_tokens=2)
    time.sleep(0.3)  # the completion report lands in the background
    b = client(stack, 1).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages("reuse", system), max_tokens=2)
    assert b.headers["x-cache-plane-node"] == a.headers["x-cache-plane-node"]
    assert int(b.headers["x-cache-plane-matched-tokens"]) > 300
    assert metric(stack, 1, 'cache_plane_gateway_prediction_total{outcome="exact"}') >= 1


JSONS = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=10)
BODY = st.fixed_dictionaries({"model": st.just(MODEL) | JSONS}, optional={
    "messages": JSONS | st.just([{"role": "user", "content": "fuzz"}]),
    "prompt": JSONS | st.just("fuzz"), "stream": JSONS, "max_tokens": st.integers(-2, 4) | JSONS,
    "stream_options": JSONS, "n": JSONS, "user": JSONS, "cache_salt": JSONS,
    "temperature": JSONS, "tools": JSONS, "chat_template_kwargs": JSONS})


@given(body=BODY | JSONS, chat=st.booleans())
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_bodies_never_500(stack: GatewayStack, body: Any, chat: bool) -> None:
    """Any JSON body gets an answer below 500 (or a backend-side 502/503/504), never a 500."""
    if isinstance(body, dict) and body.get("max_tokens") is None:
        body["max_tokens"] = 2
    path = "/chat/completions" if chat else "/completions"
    status, payload = post(stack.gateway_url() + path, body, stack.api_key)
    assert status != 500, payload
    if status >= 400:
        assert set(payload["error"]) == {"message", "type", "param", "code"}


def faults(stack: GatewayStack, i: int, plan: dict[str, Any]) -> None:
    status, _ = post(stack.engine_url(i) + "/sim/faults", plan)
    assert status == 200


def node_state(stack: GatewayStack, node: str) -> str:
    return str(next(n for n in stack.nodes() if n["node_id"] == node)["state"])


def test_failure_before_first_byte_is_retried_and_reported(stack: GatewayStack) -> None:
    """A node answering 503 is retried elsewhere and leaves routing at once."""
    faults(stack, 0, {"mode": "refuse_5xx", "status": 503})
    try:
        c = client(stack)
        outs = [c.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages(f"retry {i}", f"Retry system {i}. " * 40),
            max_tokens=2) for i in range(4)]
        assert all(o.headers["x-cache-plane-node"] == "gpu1" for o in outs)
        assert node_state(stack, "gpu0") == "unreachable"
        assert metric(stack, 0, "cache_plane_gateway_retries_total") >= 1
    finally:
        faults(stack, 0, {"mode": "none"})
    deadline = time.monotonic() + 10  # its next heartbeat (every lease / 3) takes it back
    while node_state(stack, "gpu0") != "up":
        assert time.monotonic() < deadline, "gpu0 did not come back on its heartbeat"
        time.sleep(0.2)


def test_break_after_first_byte_ends_with_an_error_event(stack: GatewayStack) -> None:
    """A stream the backend breaks ends with an SSE error event and [DONE], no half line."""
    for i in (0, 1):
        faults(stack, i, {"mode": "break_midstream", "after_chunks": 2, "count": 1})
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 20,
                       "messages": messages("break?")}).encode()
    req = urllib.request.Request(stack.gateway_url() + "/chat/completions", data=body,
                                 headers={"Authorization": f"Bearer {stack.api_key}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
    finally:
        for i in (0, 1):
            faults(stack, i, {"mode": "none"})
    events = [e for e in raw.split(b"\n\n") if e]
    assert raw.endswith(b"\n\n")
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "backend_error"
    for i in (0, 1):
        faults(stack, i, {"mode": "break_midstream", "after_chunks": 2, "count": 1})
    try:
        with pytest.raises(openai.APIError):  # the official client surfaces it as an error
            for _ in client(stack).chat.completions.create(
                    model=MODEL, messages=messages("break 2?"), max_tokens=20, stream=True):
                pass
    finally:
        for i in (0, 1):
            faults(stack, i, {"mode": "none"})


def test_client_disconnect_is_reported_cancelled(stack: GatewayStack) -> None:
    """A client that gives up before the first byte cancels the backend call; the gateway
    counts it (499) and reports the route cancelled."""
    for i in (0, 1):
        faults(stack, i, {"mode": "hang", "hang_s": 5, "count": 1})
    before = metric(stack, 0, 'cache_plane_gateway_requests_total{endpoint="chat",model="'
                               f'{MODEL}",status="499"}}')
    try:
        with pytest.raises(openai.APITimeoutError):
            openai.OpenAI(base_url=stack.gateway_url(), api_key=stack.api_key, max_retries=0,
                          timeout=0.5).chat.completions.create(
                model=MODEL, messages=messages("hang?"), max_tokens=2)
        deadline = time.monotonic() + 5
        while metric(stack, 0, 'cache_plane_gateway_requests_total{endpoint="chat",model="'
                               f'{MODEL}",status="499"}}') <= before:
            assert time.monotonic() < deadline, "the disconnect was not counted"
            time.sleep(0.1)
    finally:
        for i in (0, 1):
            faults(stack, i, {"mode": "none"})


def test_engine_tokenizer_mode(stack: GatewayStack) -> None:
    """A gateway that asks the engine's /tokenize predicts the same reuse as a local one."""
    i = stack.add_gateway("--tokenizer", f"{MODEL}=engine")
    system = "Engine tokenizer mode shares this prefix with the local tokenizer. " * 30
    client(stack, 0).chat.completions.create(model=MODEL, messages=messages("a", system),
                                             max_tokens=2)
    time.sleep(0.3)
    raw = client(stack, i).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages("b", system), max_tokens=2)
    assert int(raw.headers["x-cache-plane-matched-tokens"]) > 300
    usage = raw.parse().usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert abs((usage.prompt_tokens_details.cached_tokens or 0)
               - int(raw.headers["x-cache-plane-matched-tokens"])) <= 16


def test_killed_engine_and_killed_leader(stack: GatewayStack) -> None:
    """Kill an engine: requests keep succeeding and it leaves routing within about a second.
    Kill the cluster leader under load: the gateways keep serving after failover."""
    assert stack.cluster is not None
    c = client(stack)
    stack.kill("gpu1")
    killed = time.monotonic()
    left_at = None
    ok = 0
    for i in range(20):
        c.chat.completions.create(model=MODEL, messages=messages(f"after kill {i}",
                                                                 f"Kill {i}. " * 40),
                                  max_tokens=2)
        ok += 1
        if left_at is None and node_state(stack, "gpu1") != "up":
            left_at = time.monotonic() - killed
    assert ok == 20
    assert left_at is not None and left_at < 2.0

    leader = stack.cluster.wait_for_leader()
    errors = 0
    done = 0
    start = time.monotonic()
    for i in range(60):
        if i == 10:
            stack.cluster.kill(leader)
        try:
            client(stack, i % 2).chat.completions.create(
                model=MODEL, messages=messages(f"failover {i}"), max_tokens=2)
            done += 1
        except openai.APIStatusError as exc:
            assert exc.status_code in (503, 504), exc
            errors += 1
    assert done >= 45, f"only {done} of 60 succeeded across the failover"
    assert time.monotonic() - start < 60
    assert metric(stack, 0, 'cache_plane_gateway_requests_total{endpoint="chat"') >= done // 2
