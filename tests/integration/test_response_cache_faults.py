"""The response cache across process faults: a gateway started later, a restarted gateway and a
killed cluster leader all serve the entries stored before, from the cluster (L2)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from cache_plane.sim.stack import KEYS, MODEL, GatewayStack
from tests.conftest import until

pytestmark = pytest.mark.integration

KEY = next(iter(KEYS))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    with GatewayStack(str(tmp_path_factory.mktemp("rcf")), engines=1, gateways=1) as s:
        yield s


def ask(stack: GatewayStack, i: int, question: str, system: str) -> tuple[dict[str, str], str]:
    """One cacheable chat request to gateway `i`: its cache headers and the answer's text."""
    c = openai.OpenAI(base_url=stack.gateway_url(i), api_key=KEY, max_retries=0, timeout=30)
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, temperature=0, max_tokens=6,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}])
    headers = {k: raw.headers[k] for k in ("x-cache", "x-cache-tier") if k in raw.headers}
    return headers, str(raw.parse().choices[0].message.content)


def get_json(url: str, headers: dict[str, str]) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=5) as resp:
            out: dict[str, Any] = json.load(resp)
            return out
    except (OSError, ValueError):
        return None


def stored(stack: GatewayStack, i: int) -> float:
    out = get_json(stack.gateway_url(i) + "/cache/stats", {"Authorization": f"Bearer {KEY}"})
    assert out is not None
    return float(out["stores"].get("stored", 0))


def store(stack: GatewayStack, system: str, questions: list[str]) -> dict[str, str]:
    """Ask each question through gateway 0 until the cluster holds the answers; the answers."""
    before = stored(stack, 0)
    answers = {}
    for q in questions:
        headers, answers[q] = ask(stack, 0, q, system)
        assert headers["x-cache"] == "miss"
    until(lambda: stored(stack, 0) >= before + len(questions), "the stores in the cluster")
    return answers


def wait_health(stack: GatewayStack, i: int) -> None:
    until(lambda: get_json(stack.gateway_url(i)[:-3] + "/health", {}), "the gateway's /health",
          timeout=60)


def member_stats(stack: GatewayStack, i: int) -> dict[str, Any] | None:
    assert stack.cluster is not None
    return get_json(stack.cluster.nodes[i].url + "/v1/cache/stats", stack.cluster.auth_headers)


def test_a_later_gateway_serves_what_the_first_stored(stack: GatewayStack) -> None:
    """A gateway started after the answers were stored serves them: exact and semantic hits."""
    system = "Later gateway test. Answer with one word."
    answers = store(stack, system, ["What is the capital of Italy?", "Who wrote Hamlet?"])
    i = stack.add_gateway()
    headers, text = ask(stack, i, "What is the capital of Italy?", system)
    assert headers == {"x-cache": "hit", "x-cache-tier": "l2"}
    assert text == answers["What is the capital of Italy?"]
    headers, text = ask(stack, i, "Who is the author of Hamlet?", system)
    assert headers["x-cache"] == "semantic-hit"
    assert text == answers["Who wrote Hamlet?"]


def test_a_restarted_gateway_serves_from_the_cluster(stack: GatewayStack) -> None:
    """Kill -9 a gateway and start it again: what it stored before is a hit, from L2."""
    system = "Gateway restart test. Answer briefly."
    answers = store(stack, system, ["Name a colour of the rainbow."])
    stack.kill("gateway0")
    stack.start_gateway(0)
    wait_health(stack, 0)
    headers, text = ask(stack, 0, "Name a colour of the rainbow.", system)
    assert headers == {"x-cache": "hit", "x-cache-tier": "l2"}
    assert text == answers["Name a colour of the rainbow."]


def test_entries_survive_a_killed_leader(stack: GatewayStack) -> None:
    """Kill -9 the leader: a new gateway without L1 serves every stored entry from the new
    leader's cluster; the killed member, restarted, holds the same entries as the others."""
    assert stack.cluster is not None
    cluster = stack.cluster
    system = "Leader kill test. Answer briefly."
    questions = ["Name a tree.", "Name a flower.", "Name a fruit."]
    answers = store(stack, system, questions)
    leader = cluster.wait_for_leader()
    cluster.kill(leader)
    assert cluster.wait_for_leader() != leader
    i = stack.add_gateway("--cache-l1-max-bytes", "0")
    for q in questions:
        for _ in range(2):  # (no L1: the second is read from the cluster again)
            headers, text = ask(stack, i, q, system)
            assert headers == {"x-cache": "hit", "x-cache-tier": "l2"}, q
            assert text == answers[q]

    cluster.start_node(leader)

    def agreed() -> bool:
        views = [member_stats(stack, m) for m in range(len(cluster.nodes))]
        if any(v is None for v in views):
            return False
        return len({(v["entries"], v["bytes"], v["rev"]) for v in views if v}) == 1
    until(agreed, "the restarted member to catch up", timeout=30)
    view = member_stats(stack, leader)
    assert view is not None and view["entries"] >= len(questions) + 3


def test_verification_estimates_the_false_hit_rate(tmp_path: Any) -> None:
    """Engines whose answer depends on the question (`--answers prompt`), every semantic hit
    verified: a related-topic pair served as a semantic hit is found to disagree."""
    with GatewayStack(str(tmp_path), engines=1, gateways=1,
                      engine_args=(*GatewayStack.engine_args, "--answers", "prompt"),
                      gateway_args=("--cache-verify-fraction", "1")) as s:
        system = "Verification test. Answer briefly."
        assert ask(s, 0, "How do I make pizza dough?", system)[0]["x-cache"] == "miss"
        until(lambda: stored(s, 0) >= 1, "the first answer stored")
        headers, _ = until(lambda: (lambda h: h if h[0]["x-cache"] == "semantic-hit" else None)(
            ask(s, 0, "How do I make pie dough?", system)), "a semantic hit")

        def verified() -> dict[str, Any] | None:
            out = get_json(s.gateway_url(0) + "/cache/stats", {"Authorization": f"Bearer {KEY}"})
            return out if out and out["verifications"]["disagree"] else None
        stats = until(verified, "the verification")
        assert stats["estimated_false_hit_rate"] == 1.0
        with urllib.request.urlopen(s.gateway_url(0)[:-3] + "/metrics", timeout=5) as resp:
            assert "cache_plane_gateway_cache_estimated_false_hit_rate 1.0" in resp.read().decode()
