"""The response cache's pure core: keys, cacheability, directives, replay, the catalog."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_plane.gateway.core import event_data
from cache_plane.responses import keys, replay, rules
from cache_plane.responses.catalog import Catalog, EntryInfo, answers_agree

SCOPE = keys.Scope("tenant-a", "m", 0)
BODY = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Capital of France?"}],
        "temperature": 0, "max_tokens": 16}

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
FIELD = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(
    lambda k: k not in keys.DENY_LIST)


def _shuffled(value, rnd):
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: _shuffled(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rnd) for v in value]
    return value


@settings(max_examples=200)
@given(body=st.dictionaries(FIELD, JSON, max_size=6), denied=st.dictionaries(
    st.sampled_from(sorted(keys.DENY_LIST)), JSON, max_size=4), seed=st.randoms())
def test_the_exact_key_ignores_key_order_and_deny_listed_fields(body, denied, seed):
    shuffled = _shuffled({**body, **denied}, seed)
    assert keys.exact_key(SCOPE, shuffled) == keys.exact_key(SCOPE, body)


@settings(max_examples=200)
@given(body=st.dictionaries(FIELD, JSON, min_size=1, max_size=6), data=st.data())
def test_the_exact_key_changes_with_every_other_field(body, data):
    name = data.draw(st.sampled_from(sorted(body)))
    other = data.draw(JSON.filter(lambda v: keys.canonical(v) != keys.canonical(body[name])))
    assert keys.exact_key(SCOPE, {**body, name: other}) != keys.exact_key(SCOPE, body)
    assert keys.exact_key(SCOPE, {k: v for k, v in body.items() if k != name}) \
        != keys.exact_key(SCOPE, body)


def test_the_key_depends_on_tenant_model_epoch_and_namespace_and_reads_0_0_as_0():
    base = keys.exact_key(SCOPE, BODY)
    for scope in (keys.Scope("tenant-b", "m", 0), keys.Scope("tenant-a", "m2", 0),
                  keys.Scope("tenant-a", "m", 1), keys.Scope("tenant-a", "m", 0, "ns")):
        assert keys.exact_key(scope, BODY) != base
    assert keys.exact_key(SCOPE, {**BODY, "temperature": 0.0}) == base


def test_the_bucket_leaves_out_only_the_last_question():
    other = {**BODY, "messages": [BODY["messages"][0], {"role": "user", "content": "Hi"}]}
    assert keys.bucket_key(SCOPE, other) == keys.bucket_key(SCOPE, BODY)
    assert keys.bucket_key(SCOPE, {**BODY, "max_tokens": 17}) != keys.bucket_key(SCOPE, BODY)
    longer = {**BODY, "messages": [*BODY["messages"], {"role": "assistant", "content": "x"}]}
    assert keys.bucket_key(SCOPE, longer) is None  # the last message is not the user's
    assert keys.last_question({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}) == "a\nb"


@pytest.mark.parametrize(("change", "reason"), [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "logprobs"),
    ({"temperature": 0.9}, "temperature"), ({"temperature": None}, "temperature"),
    ({"user": "u1"}, "personalised"),
    ({"messages": [{"role": "user", "content": "What is the weather today?"}]},
     "time_dependent"),
    ({"messages": [{"role": "user", "content": "what time is it"}]}, "time_dependent"),
    ({}, None), ({"n": 1, "temperature": 0.8}, None),
])
def test_cacheability_rules(change, reason):
    body = {k: v for k, v in {**BODY, **change}.items() if v is not None}
    assert rules.bypass_reason(body, "m", rules.CacheRules(), personal_ok=False) == reason


def test_a_models_configured_default_temperature_and_opted_in_personal_requests():
    cold = rules.CacheRules(model_temperature={"m": 0.0})
    body = {k: v for k, v in BODY.items() if k != "temperature"}
    assert rules.bypass_reason(body, "m", cold, False) is None
    assert rules.bypass_reason({**BODY, "user": "u"}, "m", cold, personal_ok=True) is None


def test_directives_from_the_header_and_the_litellm_body_object():
    d = rules.directives("no-store, max-age=60", {"ttl": 30, "namespace": "docs"})
    assert (d.read, d.write, d.ttl_s, d.max_age_s, d.namespace) == (True, False, 30, 60, "docs")
    assert not rules.directives("max-age=0", None).read
    assert not rules.directives(None, {"no-cache": True}).read
    assert rules.directives(None, {"s-maxage": 5}).max_age_s == 5
    for header, body in (("max-age=abc", None), (None, {"ttl": -1}), (None, {"nocache": 1}),
                         (None, "yes"), (None, {"no-store": "true"})):
        with pytest.raises(rules.DirectiveError):
            rules.directives(header, body)


ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
          "choices": [{"index": 0, "message": {"role": "assistant",
                                                "content": "Paris is the capital. " * 9},
                       "logprobs": None, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 9, "completion_tokens": 40, "total_tokens": 49}}


@pytest.mark.parametrize("usage", [True, False])
def test_a_replayed_stream_assembles_back_into_the_stored_answer(usage):
    events = replay.sse_events(ANSWER, "chatcmpl-2", include_usage=usage)
    assert events[-1] == replay.DONE and all(e.endswith(b"\n\n") for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert (chunks[-1]["choices"] == []) is usage
    folded = replay.Assembler()
    for event in events:
        folded.add(event_data(event))
    result = folded.result()
    assert result is not None
    assert result["choices"][0]["message"] == ANSWER["choices"][0]["message"]
    assert result["usage"] == (ANSWER["usage"] if usage else None)


def test_an_error_event_or_a_missing_finish_is_not_stored():
    broken = replay.Assembler()
    broken.add(b'{"error": {"message": "x"}}')
    assert broken.result() is None
    cut = replay.Assembler()
    cut.add(event_data(replay.sse_events(ANSWER, "x", False)[1]))
    assert cut.result() is None


def _info(key, question, vector, bucket="b", expires=10**12):
    return EntryInfo(key, "t", "m", 0, "", bucket, question, 0, expires,
                     vector=np.asarray(vector, dtype=np.float32))


def test_the_catalog_serves_the_most_similar_fresh_entry_the_guards_let_through():
    c = Catalog()
    c.put(_info("k1", "What is 12 times 7?", [1, 0, 0]))
    c.put(_info("k2", "What is the capital of France?", [0.96, 0.28, 0]))
    c.put(_info("k3", "capital of France?", [0.6, 0.8, 0], expires=5))
    got = c.similar("b", np.asarray([1, 0, 0], dtype=np.float32),
                    "Which city is the capital of France?", 0.9, now_ms=10, max_age_s=None)
    assert got.entry is not None and got.entry.key == "k2" and got.rejected == ("numbers",)
    miss = c.similar("b", np.asarray([0, 0, 1], dtype=np.float32), "x", 0.9, 10, None)
    assert miss.entry is None and miss.rejected == ()
    assert c.has_neighbours("b", "k1") and not c.has_neighbours("other", "k1")
    c.drop("k1")
    c.drop("k2")
    c.drop("k3")
    assert not c.buckets and not c.entries


def test_answers_agree_up_to_case_spacing_and_most_words():
    assert answers_agree("Paris.", "paris")
    assert answers_agree("The capital is Paris", "The capital is Paris, France")
    assert not answers_agree("Paris", "Berlin")
    assert orjson.loads(orjson.dumps(replay.as_response(ANSWER, "new")))["id"] == "new"


def test_a_large_max_age_means_any_age_and_a_forward_backward_swap_is_guarded():
    assert rules.directives("max-age=31536000", None).max_age_s == rules.MAX_TTL_S
    from cache_plane.responses.guards import guard
    assert guard("Spell the word 'cache' backwards.", "Spell the word 'cache' forwards.")


@pytest.mark.parametrize(("a", "b"), [
    ("How do I log in to the AWS console?", "How do I log out of the AWS console?"),
    ("How do I zoom in on a Mac?", "How do I zoom out on a Mac?"),
    ("Scale up the deployment", "Scale down the deployment"),
])
def test_phrasal_opposites_are_guarded(a, b):
    from cache_plane.responses.guards import guard
    assert guard(a, b) == "negation"
    assert guard(a, a.replace("How do I", "How can I")) is None


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 30)), max_size=120), st.integers(0, 30))
def test_semantic_lookup_equals_a_scan_of_the_bucket_after_any_stores_and_drops(ops, probe):
    """The bucket's growing matrix (rows added, zeroed, compacted) answers as a plain scan."""
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((31, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    c = Catalog()
    for store, i in ops:
        if store:
            c.put(_info(f"k{i}", "same question", vectors[i]))
        else:
            c.drop(f"k{i}")
    got = c.similar("b", vectors[probe], "same question", 0.5, now_ms=1, max_age_s=None)
    live = {k: float(vectors[int(k[1:])] @ vectors[probe]) for k in c.entries}
    want = max(live, key=live.__getitem__) if live and max(live.values()) >= 0.5 else None
    assert (got.entry.key if got.entry else None) == want
