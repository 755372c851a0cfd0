"""The gateway's pure core: request checks, errors, SSE splitting, usage, limits."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_plane.gateway import core
from cache_plane.gateway.core import GatewayError


def check(body: object, chat: bool = True) -> core.ChatRequest:
    return core.check_request(body, chat, 1000)


@pytest.mark.parametrize(("body", "param"), [
    ([], "body"),
    ({}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": ["hi"]}, "messages[0]"),
    ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
     "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": True},
     "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}],
      "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "messages": [{"role": "user", "content": "x" * 1001}]}, "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "cache_salt": ""},
     "cache_salt"),
])
def test_bad_chat_bodies_name_the_field(body: object, param: str) -> None:
    """A malformed chat body is a 400 naming the offending field, OpenAI-shaped."""
    with pytest.raises(GatewayError) as info:
        check(body)
    assert info.value.status == 400
    assert info.value.param == param
    error = info.value.body()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


def test_completion_prompt_forms() -> None:
    """A completion takes a string or a list of one string; anything else is a 400."""
    assert check({"model": "m", "prompt": "hi"}, chat=False).prompt == "hi"
    assert check({"model": "m", "prompt": ["hi"]}, chat=False).prompt == "hi"
    with pytest.raises(GatewayError) as info:
        check({"model": "m", "prompt": 3}, chat=False)
    assert info.value.param == "prompt"


def test_session_from_header_then_user() -> None:
    """The session comes from the header, else from `user` when enabled."""
    req = check({"model": "m", "messages": [{"role": "user", "content": "x"}], "user": "u1"})
    assert core.session_of(req, "s9", True) == "s9"
    assert core.session_of(req, None, True) == "user:u1"
    assert core.session_of(req, None, False) is None


def test_route_errors_map_to_client_statuses() -> None:
    """Cluster refusals become 429/503 with Retry-After, 404 for an unknown model."""
    busy = core.route_error("all_nodes_busy", "full", "m")
    assert (busy.status, busy.headers()) == (429, {"Retry-After": "1"})
    assert core.route_error("no_room", "", "m").status == 503
    assert core.route_error("unknown_model", "", "m").status == 404
    assert core.route_error("prompt_too_large", "", "m").status == 400


def test_sse_splitter_holds_partial_events() -> None:
    """Whole events pass as they complete; a half event stays pending."""
    s = core.SSESplitter()
    assert s.feed(b"data: a\n\ndata: b") == [b"data: a\n\n"]
    assert s.pending == b"data: b"
    assert s.feed(b"\n\n") == [b"data: b\n\n"]


@given(st.lists(st.text(alphabet="ab{}:\" ", max_size=20), max_size=8), st.data())
@settings(max_examples=200, deadline=None)
def test_sse_splitter_any_chunking(texts: list[str], data: st.DataObject) -> None:
    """However the bytes are cut, the same events come out, in order."""
    stream = b"".join(b"data: " + t.encode() + b"\n\n" for t in texts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    s = core.SSESplitter()
    out = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += s.feed(stream[a:b])
    assert out == [b"data: " + t.encode() + b"\n\n" for t in texts]
    assert s.pending == b""


def test_scan_event_finds_usage_only_in_usage_chunks() -> None:
    """The usage chunk (choices []) is recognised; content chunks are not parsed."""
    chunk = {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2,
                                      "prompt_tokens_details": {"cached_tokens": 8}}}
    usage, only = core.scan_event(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    assert usage == core.Usage(10, 2, 8) and only
    assert core.scan_event(b'data: {"choices": [{"delta": {}}]}\n\n') == (None, False)
    assert core.scan_event(b"data: [DONE]\n\n") == (None, False)


def test_error_event_is_well_formed() -> None:
    """A broken stream ends with a parseable error event and [DONE]."""
    raw = core.error_event(GatewayError(502, "gone", code="backend_error"))
    events = [e for e in raw.split(b"\n\n") if e]
    assert json.loads(events[0][6:])["error"]["code"] == "backend_error"
    assert events[1] == b"data: [DONE]"


def test_token_bucket() -> None:
    """A burst of two seconds' worth, then one request per 1/rate seconds."""
    bucket = core.TokenBucket(2.0)
    assert [bucket.take(0.0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0


def test_prediction_outcomes() -> None:
    """Within one block is exact; otherwise over or under."""
    assert core.prediction(688, 688, 16) == "exact"
    assert core.prediction(688, 672, 16) == "exact"
    assert core.prediction(688, 0, 16) == "over"
    assert core.prediction(0, 64, 16) == "under"


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
FIELDS = st.fixed_dictionaries({}, optional={
    "model": JSON | st.just("m"), "messages": JSON | st.just([{"role": "user", "content": "x"}]),
    "prompt": JSON, "stream": JSON, "stream_options": JSON, "max_tokens": JSON, "n": JSON,
    "user": JSON, "cache_salt": JSON, "tools": JSON, "chat_template_kwargs": JSON})


@given(FIELDS | JSON, st.booleans())
@settings(max_examples=400, deadline=None)
def test_check_request_only_raises_gateway_errors(body: object, chat: bool) -> None:
    """Any JSON body is either accepted or refused with a 400; nothing else escapes."""
    try:
        check(body, chat)
    except GatewayError as exc:
        assert exc.status == 400


def test_carries_output_skips_the_role_chunk() -> None:
    """TTFT ends at the first event with output, not at the role chunk."""
    role = b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n'
    token = b'data: {"choices": [{"delta": {"content": "t1 "}}]}\n\n'
    text = b'data: {"choices": [{"text": "t1 ", "finish_reason": null}]}\n\n'
    assert not core.carries_output(role)
    assert core.carries_output(token) and core.carries_output(text)
    assert not core.carries_output(b"data: [DONE]\n\n")
