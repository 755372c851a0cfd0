"""The gateway's response cache in real processes, through the official `openai` client:
exact and semantic hits, streamed hits and misses, directives, cacheability rules, tenants,
invalidation, purge and delete by the CLI, single flight, and the KPIs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from cache_plane.sim.stack import KEYS, MODEL, GatewayStack
from tests.conftest import until

pytestmark = pytest.mark.integration

KEY_A, KEY_B = list(KEYS)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    with GatewayStack(str(tmp_path_factory.mktemp("rc")), engines=1, gateways=1) as s:
        yield s


def client(stack: GatewayStack, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.gateway_url(), api_key=key, max_retries=0, timeout=30)


def messages(question: str, system: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def ask(stack: GatewayStack, question: str, system: str, key: str = KEY_A,
        **kwargs: Any) -> tuple[str, Any]:
    """One chat request (temperature 0 unless given): its x-cache header and parsed answer."""
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 6)
    raw = client(stack, key).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages(question, system), **kwargs)
    return raw.headers["x-cache"], raw.parse()


def content(answer: Any) -> str:
    return str(answer.choices[0].message.content)


def get_json(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        out: dict[str, Any] = json.load(resp)
        return out


def stats(stack: GatewayStack) -> dict[str, Any]:
    return get_json(stack.gateway_url() + "/cache/stats",
                    {"Authorization": f"Bearer {stack.api_key}"})


def count(stack: GatewayStack, group: str, label: str) -> float:
    return float(stats(stack)[group].get(label, 0))


def wait_stored(stack: GatewayStack, before: float, n: int = 1) -> None:
    """Until the gateway's background stores reached the cluster (`n` more than `before`)."""
    until(lambda: count(stack, "stores", "stored") >= before + n, "the store in the cluster")


def leader_url(stack: GatewayStack) -> str:
    assert stack.cluster is not None
    return stack.cluster.nodes[stack.cluster.wait_for_leader()].url


def cache_cli(stack: GatewayStack, *args: str) -> dict[str, Any]:
    assert stack.cluster is not None and stack.cluster.token_file is not None
    out = subprocess.run(
        [sys.executable, "-m", "cache_plane", "cache", *args, "--endpoint", leader_url(stack),
         "--token-file", stack.cluster.token_file],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_identical_request_hits(stack: GatewayStack) -> None:
    """The second identical request is served from the cache: same answer, hit, an age."""
    system = "Exact hits test. Answer briefly."
    first = client(stack).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages("Name three primary colours.", system), temperature=0,
        max_tokens=6)
    assert first.headers["x-cache"] == "miss"
    again = client(stack).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages("Name three primary colours.", system), temperature=0,
        max_tokens=6)
    assert again.headers["x-cache"] == "hit"
    assert again.headers["x-cache-tier"] == "l1"
    assert int(again.headers["age"]) >= 0
    assert again.headers["x-cache-key"] == first.headers["x-cache-key"]
    assert content(again.parse()) == content(first.parse())
    assert again.parse().id != first.parse().id  # a hit gets an id of its own


def test_reworded_question_is_a_semantic_hit(stack: GatewayStack) -> None:
    """A reworded question in the same conversation is a semantic hit; a changed number is not."""
    system = "Semantic test. Answer with one word."
    stored = count(stack, "stores", "stored")
    _, first = ask(stack, "What is the capital of France?", system)
    wait_stored(stack, stored)  # (its embedding is computed on the way to the cluster)
    raw = client(stack).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages("Which city is the capital of France?", system),
        temperature=0, max_tokens=6)
    assert raw.headers["x-cache"] == "semantic-hit"
    assert float(raw.headers["x-cache-similarity"]) >= 0.9
    assert content(raw.parse()) == content(first)

    stored = count(stack, "stores", "stored")
    ask(stack, "What is 12 times 7?", system)
    wait_stored(stack, stored)
    rejected = count(stack, "semantic_rejected", "numbers")
    assert ask(stack, "What is 13 times 7?", system)[0] == "miss"
    assert count(stack, "semantic_rejected", "numbers") == rejected + 1  # the guard, not luck


def test_streamed_hit_and_streamed_miss(stack: GatewayStack) -> None:
    """A hit replays as a stream the client parses; a streamed miss is stored whole."""
    system = "Streaming test. Answer briefly."
    _, stored = ask(stack, "List four even numbers.", system, max_tokens=8)
    raw = client(stack).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages("List four even numbers.", system), temperature=0,
        max_tokens=8, stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-cache"] == "hit"
    chunks = list(raw.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == content(stored)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == \
        stored.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == stored.usage.completion_tokens

    system = "Streamed miss test. Answer briefly."  # (a bucket of its own: no semantic hit)
    raw = client(stack).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages("List four odd numbers.", system), temperature=0,
        max_tokens=8, stream=True)
    assert raw.headers["x-cache"] == "miss"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    result, answer = ask(stack, "List four odd numbers.", system, max_tokens=8)
    assert result == "hit"
    assert content(answer) == streamed
    assert answer.usage is not None and answer.usage.completion_tokens == 8


def test_no_store_and_no_cache(stack: GatewayStack) -> None:
    """no-store (header or body) keeps the answer out; no-cache goes to the backend."""
    for i, kwargs in enumerate([{"extra_headers": {"Cache-Control": "no-store"}},
                                {"extra_body": {"cache": {"no-store": True}}}]):
        system = f"No-store test, case {i}. Answer briefly."  # (buckets of their own)
        question = "Spell the word 'cache' backwards."
        assert ask(stack, question, system, **kwargs)[0] == "miss"
        assert ask(stack, question, system)[0] == "miss"  # nothing was stored
        assert ask(stack, question, system)[0] == "hit"   # (the one before was)

    for i, kwargs in enumerate([{"extra_headers": {"Cache-Control": "no-cache"}},
                                {"extra_body": {"cache": {"no-cache": True}}}]):
        system = f"No-cache test, case {i}. Answer briefly."
        question = "Spell the word 'cache' forwards."
        ask(stack, question, system)
        assert ask(stack, question, system)[0] == "hit"
        before = stats(stack)["results"].get("bypass", 0)
        result, _ = ask(stack, question, system, **kwargs)
        assert result == "bypass"
        assert stats(stack)["results"]["bypass"] == before + 1


def test_max_age_and_s_maxage(stack: GatewayStack) -> None:
    """max-age=0 never reads; an entry older than max-age (or s-maxage) is not served."""
    system = "Max-age test. Answer briefly."
    question = "Count from one to five."
    ask(stack, question, system)
    assert ask(stack, question, system, extra_headers={"Cache-Control": "max-age=0"})[0] == \
        "bypass"
    assert ask(stack, question, system, extra_body={"cache": {"s-maxage": 0}})[0] == "bypass"
    assert ask(stack, question, system, extra_headers={"Cache-Control": "max-age=60"})[0] == \
        "hit"
    assert ask(stack, question, system, extra_body={"cache": {"s-maxage": 60}})[0] == "hit"
    time.sleep(1.1)  # the entry must grow older than one second (a clock, not an event)
    no_store = {"Cache-Control": "max-age=1, no-store"}
    assert ask(stack, question, system, extra_headers=no_store)[0] == "miss"
    assert ask(stack, question, system,
               extra_body={"cache": {"s-maxage": 1, "no-store": True}})[0] == "miss"
    assert ask(stack, question, system, extra_headers={"Cache-Control": "max-age=60"})[0] == \
        "hit"


def test_ttl_expires(stack: GatewayStack) -> None:
    """An entry stored with cache ttl=1 is gone (a miss) soon after a second."""
    system = "TTL test. Answer briefly."
    question = "Name a prime number."
    stored = count(stack, "stores", "stored")
    ask(stack, question, system, extra_body={"cache": {"ttl": 1}})
    assert ask(stack, question, system, extra_headers={"Cache-Control": "no-store"})[0] == "hit"
    wait_stored(stack, stored)
    expired = stats(stack)["cluster"]["expired"]
    until(lambda: ask(stack, question, system,
                      extra_headers={"Cache-Control": "no-store"})[0] == "miss",
          "the entry to expire", timeout=5)
    until(lambda: stats(stack)["cluster"]["expired"] > expired,
          "the cluster's housekeeping to expire it", timeout=5)


def test_namespace_separates_entries(stack: GatewayStack) -> None:
    """The same request in another namespace (or none) is a different entry."""
    system = "Namespace test. Answer briefly."
    question = "Name a shade of blue."
    ns = {"extra_body": {"cache": {"namespace": "team-x"}}}
    assert ask(stack, question, system, **ns)[0] == "miss"
    assert ask(stack, question, system, **ns)[0] == "hit"
    assert ask(stack, question, system,
               extra_body={"cache": {"namespace": "team-y"}})[0] == "miss"
    assert ask(stack, question, system)[0] == "miss"


@pytest.mark.parametrize(("why", "kwargs", "question"), [
    ("temperature", {"temperature": 0.9}, "Suggest a name for a cat."),
    ("temperature", {"temperature": openai.omit}, "Suggest a name for a dog."),  # 1.0
    ("n", {"n": 2}, "Suggest a name for a fish."),
    ("logprobs", {"logprobs": True}, "Suggest a name for a bird."),
    ("time_dependent", {}, "What time is it now?"),
    ("personalised", {"user": "alice"}, "Suggest a name for a horse."),
])
def test_uncacheable_requests_bypass(stack: GatewayStack, why: str, kwargs: dict[str, Any],
                                     question: str) -> None:
    """Hot, multi-choice, logprobs, time-dependent and personal requests are not cached."""
    system = "Bypass test. Answer briefly."
    before = count(stack, "bypasses", why)
    for _ in range(2):
        assert ask(stack, question, system, **kwargs)[0] == "bypass"
    assert count(stack, "bypasses", why) == before + 2


def test_tenants_never_share_entries(stack: GatewayStack) -> None:
    """Another tenant's identical (or reworded) request is a miss."""
    system = "Tenant test. Answer with one word."
    stored = count(stack, "stores", "stored")
    ask(stack, "Which planet is known as the red planet?", system)
    assert ask(stack, "Which planet is known as the red planet?", system)[0] == "hit"
    wait_stored(stack, stored)  # (with its embedding: a semantic candidate too)
    no_store = {"Cache-Control": "no-store"}  # B stores nothing it could hit itself
    for question in ("Which planet is known as the red planet?",
                     "What planet is called the red planet?"):
        assert ask(stack, question, system, KEY_B, extra_headers=no_store)[0] == "miss"
    assert ask(stack, "What planet is called the red planet?", system)[0] == "semantic-hit"


def test_invalid_directives_are_openai_errors(stack: GatewayStack) -> None:
    """A directive the cache cannot read is a 400 in OpenAI's shape, naming it."""
    system = "Invalid directives test."
    for kwargs, param in [({"extra_headers": {"Cache-Control": "max-age=abc"}},
                           "Cache-Control"),
                          ({"extra_body": {"cache": {"ttl": -1}}}, "cache.ttl"),
                          ({"extra_body": {"cache": {"no-store": "yes"}}}, "cache.no-store"),
                          ({"extra_body": {"cache": {"bogus": 1}}}, "cache"),
                          ({"extra_body": {"cache": "no-store"}}, "cache")]:
        with pytest.raises(openai.BadRequestError) as bad:
            ask(stack, "Is this valid?", system, **kwargs)
        assert bad.value.status_code == 400
        assert bad.value.param == param
        assert bad.value.code == "invalid_request"
        assert isinstance(bad.value.body, dict)
        assert set(bad.value.body) == {"message", "type", "param", "code"}


def test_a_large_header_max_age_is_accepted(stack: GatewayStack) -> None:
    """Cache-Control max-age of a year (a common value) is read as 'any age we hold'."""
    system = "Large max-age test. Answer briefly."
    ask(stack, "Name a month.", system)
    assert ask(stack, "Name a month.", system,
               extra_headers={"Cache-Control": "max-age=31536000"})[0] == "hit"


def test_single_flight(stack: GatewayStack) -> None:
    """Concurrent identical requests with a slow backend: one backend call, the rest wait."""
    system = "Single flight test. Answer briefly."
    question = "Name the four seasons."

    def backend_calls() -> float:
        with urllib.request.urlopen(stack.engine_url() + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:request_success_total"))

    async def burst(n: int) -> list[str]:
        async with openai.AsyncOpenAI(base_url=stack.gateway_url(), api_key=KEY_A,
                                      max_retries=0, timeout=30) as c:
            raws = await asyncio.gather(*(c.chat.completions.with_raw_response.create(
                model=MODEL, messages=messages(question, system), temperature=0, max_tokens=6)
                for _ in range(n)))
        answers = {content(r.parse()) for r in raws}
        assert len(answers) == 1
        return [r.headers["x-cache"] for r in raws]

    plan = json.dumps({"mode": "hang", "hang_s": 1.5, "count": 1}).encode()
    req = urllib.request.Request(stack.engine_url() + "/sim/faults", data=plan,
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).close()
    before_calls, before = backend_calls(), stats(stack)
    try:
        results = asyncio.run(burst(8))
    finally:
        req = urllib.request.Request(stack.engine_url() + "/sim/faults",
                                     data=b'{"mode": "none"}',
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).close()
    after = stats(stack)
    assert backend_calls() - before_calls == 1
    assert sorted(results) == ["hit"] * 7 + ["miss"]

    def delta(group: str, label: str) -> float:
        return float(after[group].get(label, 0) - before[group].get(label, 0))
    assert delta("results", "miss") == 1 and delta("results", "hit") == 7
    assert delta("tiers", "flight") + delta("tiers", "l1") == 7
    assert delta("tiers", "flight") >= 1


def test_stats_and_metrics(stack: GatewayStack) -> None:
    """GET /v1/cache/stats and /metrics show the cache's counts."""
    system = "Stats test. Answer briefly."
    ask(stack, "Name a metal.", system)
    ask(stack, "Name a metal.", system)
    out = stats(stack)
    assert out["results"]["hit"] >= 1 and out["results"]["miss"] >= 1
    assert 0 < out["hit_rate"] < 1
    assert out["tiers"]["l1"] >= 1
    assert out["l1"]["entries"] >= 1 and out["catalog"]["entries"] >= 1
    assert out["cluster"]["entries"] >= 1 and out["cluster"]["stored"] >= 1
    with urllib.request.urlopen(stack.gateway_url()[:-3] + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    series = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
              if line.startswith("cache_plane_gateway_cache_")}
    for name in ("results_total", "hit_tiers_total", "bypasses_total", "stores_total",
                 "l1_entries", "catalog_entries"):
        assert f"cache_plane_gateway_cache_{name}" in series, name
    hits = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('cache_plane_gateway_cache_results_total{result="hit"}'))
    assert hits == out["results"]["hit"]


def test_purge_by_tenant_and_delete_by_key_with_the_cli(stack: GatewayStack) -> None:
    """`cache-plane cache purge --tenant` and `cache delete --key` remove entries everywhere."""
    system = "CLI test. Answer briefly."
    stored = count(stack, "stores", "stored")
    ask(stack, "Name a river.", system, KEY_B)
    ask(stack, "Name a mountain.", system, KEY_A)
    wait_stored(stack, stored, 2)
    assert ask(stack, "Name a river.", system, KEY_B)[0] == "hit"
    out = cache_cli(stack, "purge", "--tenant", KEYS[KEY_B])
    assert out["purged"] >= 1
    until(lambda: ask(stack, "Name a river.", system, KEY_B,
                      extra_headers={"Cache-Control": "no-store"})[0] == "miss",
          "the purge to reach the gateway", timeout=5)
    assert ask(stack, "Name a mountain.", system, KEY_A)[0] == "hit"  # the other tenant's

    raw = client(stack).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages("Name a mountain.", system), temperature=0,
        max_tokens=6)
    assert cache_cli(stack, "delete", "--key", raw.headers["x-cache-key"])["deleted"] == 1
    until(lambda: ask(stack, "Name a mountain.", system,
                      extra_headers={"Cache-Control": "no-store"})[0] == "miss",
          "the delete to reach the gateway", timeout=5)


def test_model_invalidation(stack: GatewayStack) -> None:
    """Invalidating the model drops its entries; answers are then stored under a new key."""
    assert stack.cluster is not None
    system = "Invalidation test. Answer briefly."
    question = "Name a gas."
    stored = count(stack, "stores", "stored")
    _, old = ask(stack, question, system)
    wait_stored(stack, stored)
    raw = client(stack).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages(question, system), temperature=0, max_tokens=6)
    assert raw.headers["x-cache"] == "hit"
    old_key = raw.headers["x-cache-key"]
    req = urllib.request.Request(leader_url(stack) + f"/v1/models/{MODEL}/invalidate",
                                 data=b"", method="POST", headers=stack.cluster.auth_headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        out = json.load(resp)
    assert out["dropped_responses"] >= 1
    until(lambda: ask(stack, question, system,
                      extra_headers={"Cache-Control": "no-store"})[0] == "miss",
          "the invalidation to reach the gateway", timeout=5)

    def new_key() -> str | None:  # once the gateway's model list has the new epoch
        raw = client(stack).chat.completions.with_raw_response.create(
            model=MODEL, messages=messages(question, system), temperature=0, max_tokens=6,
            extra_headers={"Cache-Control": "no-store"})
        key = raw.headers["x-cache-key"]
        return key if key != old_key else None
    key = until(new_key, "the gateway to learn the model's new epoch", timeout=12)
    assert ask(stack, question, system)[0] == "miss"
    raw = client(stack).chat.completions.with_raw_response.create(
        model=MODEL, messages=messages(question, system), temperature=0, max_tokens=6)
    assert raw.headers["x-cache"] == "hit" and raw.headers["x-cache-key"] == key
    assert stats(stack)["cluster"]["invalidated"] >= 1
