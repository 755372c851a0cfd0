"""Cached answers as a client sees them, and streamed answers as the cache stores them. PURE.

The cache stores a whole answer (``chat.completion`` or ``text_completion``). `as_response`
gives it a new id for a non-streamed hit. `sse_events` replays it as a well-formed stream: a
role chunk (chat), content chunks cut at word boundaries, tool calls, the finish chunk, the
usage chunk when the client asked for it (``choices: []``), and ``data: [DONE]``. `Assembler`
does the reverse for a streamed miss: it folds the chunks' data (the usage chunk included)
into the whole answer to store, or says it cannot (an error event, no finish, several
choices).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

CHUNK_CHARS = 64
DONE = b"data: [DONE]\n\n"


def as_response(body: Mapping[str, Any], response_id: str) -> dict[str, Any]:
    return {**body, "id": response_id}


def _pieces(text: str) -> list[str]:
    """`text` cut into pieces of about `CHUNK_CHARS`, at spaces where there are some."""
    pieces: list[str] = []
    while len(text) > CHUNK_CHARS:
        cut = text.rfind(" ", 1, CHUNK_CHARS)
        cut = CHUNK_CHARS if cut <= 0 else cut
        pieces.append(text[:cut])
        text = text[cut:]
    if text:
        pieces.append(text)
    return pieces


def _event(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_events(body: Mapping[str, Any], response_id: str, include_usage: bool) -> list[bytes]:
    """The SSE events replaying the cached answer `body` (see module docstring)."""
    chat = body.get("object") == "chat.completion"
    choice = (body.get("choices") or [{}])[0]
    head = {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": body.get("created", 0), "model": body.get("model", "")}
    if body.get("system_fingerprint") is not None:
        head["system_fingerprint"] = body["system_fingerprint"]

    def chunk(delta: Mapping[str, Any] | str, finish: str | None = None) -> bytes:
        c: dict[str, Any] = ({"index": 0, "delta": delta, "logprobs": None,
                              "finish_reason": finish} if chat else
                             {"index": 0, "text": delta, "logprobs": None,
                              "finish_reason": finish})
        return _event({**head, "choices": [c], **({"usage": None} if include_usage else {})})

    events: list[bytes] = []
    if chat:
        message = choice.get("message") or {}
        events.append(chunk({"role": "assistant", "content": ""}))
        events += [chunk({"content": p}) for p in _pieces(message.get("content") or "")]
        for i, call in enumerate(message.get("tool_calls") or ()):
            events.append(chunk({"tool_calls": [{"index": i, **call}]}))
        events.append(chunk({}, choice.get("finish_reason") or "stop"))
    else:
        events += [chunk(p) for p in _pieces(choice.get("text") or "")]
        events.append(chunk("", choice.get("finish_reason") or "stop"))
    if include_usage:
        events.append(_event({**head, "choices": [], "usage": body.get("usage")}))
    events.append(DONE)
    return events


class Assembler:
    """Folds a stream's chunk objects into the whole answer (see module docstring)."""

    def __init__(self) -> None:
        self.head: dict[str, Any] | None = None
        self.text: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.role = "assistant"
        self.finish: str | None = None
        self.usage: Any = None
        self.broken = False
        self.chat = True

    def add(self, data: bytes) -> None:
        """Take one SSE event's data (a chunk object, or ``[DONE]``); anything unexpected
        spoils the result."""
        if self.broken:
            return
        if not data or data == b"[DONE]":
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.broken = True
            return
        if not isinstance(obj, dict) or "error" in obj:
            self.broken = True
            return
        if self.head is None:
            self.head = {k: obj[k] for k in ("id", "created", "model", "system_fingerprint")
                         if k in obj}
            self.chat = obj.get("object") == "chat.completion.chunk"
        if obj.get("usage"):
            self.usage = obj["usage"]
        for c in obj.get("choices") or ():
            if not isinstance(c, dict) or c.get("index", 0) != 0:
                self.broken = True
                return
            if self.chat:
                self._delta(c.get("delta") or {})
            elif isinstance(c.get("text"), str):
                self.text.append(c["text"])
            if c.get("finish_reason"):
                self.finish = c["finish_reason"]

    def _delta(self, delta: Mapping[str, Any]) -> None:
        if isinstance(delta.get("role"), str):
            self.role = delta["role"]
        if isinstance(delta.get("content"), str):
            self.text.append(delta["content"])
        for call in delta.get("tool_calls") or ():
            i = call.get("index", 0)
            have = self.calls.setdefault(i, {"id": None, "type": "function",
                                             "function": {"name": "", "arguments": ""}})
            if call.get("id"):
                have["id"] = call["id"]
            fn = call.get("function") or {}
            have["function"]["name"] += fn.get("name") or ""
            have["function"]["arguments"] += fn.get("arguments") or ""

    def result(self) -> dict[str, Any] | None:
        """The whole answer, or None if the stream cannot be stored."""
        if self.broken or self.head is None or self.finish is None:
            return None
        text = "".join(self.text)
        if self.chat:
            message: dict[str, Any] = {"role": self.role, "content": text}
            if self.calls:
                message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
                message["content"] = text or None
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                                      "finish_reason": self.finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish}
        return {**self.head, "object": "chat.completion" if self.chat else "text_completion",
                "choices": [choice], "usage": self.usage}
