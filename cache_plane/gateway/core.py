"""The gateway's decisions on requests and responses. PURE: no I/O, no clock.

- `check_request`: the fields the gateway itself relies on, checked with OpenAI's wording
  (400 naming the `param`); everything else is the engine's to judge, and passes through.
- `GatewayError`: an OpenAI-shaped error (``{"error": {message, type, param, code}}``) with its
  HTTP status and, for 429/503, a ``Retry-After``.
- `route_error`: the cluster's refusal of a route, as the client should see it.
- `SSESplitter` and `scan_usage`: cut a byte stream into whole server-sent events (so a broken
  backend never leaves a half line) and pick up the usage of the event that carries it.
- `prediction`: the cluster's predicted prefix reuse against the engine's reported one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

# OpenAI's error types by status (openai-python maps statuses to exception classes the same way).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_denied_error", 404: "not_found_error", 408: "timeout_error",
               413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "internal_server_error", 502: "api_error",
               503: "service_unavailable_error", 504: "timeout_error"}


class GatewayError(Exception):
    """A request the gateway answers with an error (OpenAI's shape, see `body`)."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message,
                          "type": ERROR_TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def invalid(param: str, message: str) -> GatewayError:
    return GatewayError(400, message, param=param, code="invalid_request")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What the gateway needs from a request body (the body itself is forwarded as sent)."""

    chat: bool
    model: str
    stream: bool
    include_usage: bool               # the client asked for the usage chunk
    messages: tuple[Mapping[str, Any], ...] = ()
    prompt: str | None = None
    user: str | None = None
    cache_salt: str | None = None
    max_tokens: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    tools: tuple[Any, ...] | None = None


def _opt(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...],
         what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and kind is not bool:
        raise invalid(name, f"'{name}' must be {what}")
    if not isinstance(value, kind):
        raise invalid(name, f"'{name}' must be {what}")
    return value


def check_request(body: Any, chat: bool, max_prompt_chars: int) -> ChatRequest:
    """Check the fields the gateway uses; raise a 400 `GatewayError` naming the first bad one."""
    if not isinstance(body, dict):
        raise invalid("body", "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "'model' is required and must be a non-empty string")
    stream = _opt(body, "stream", bool, "a boolean") or False
    options = _opt(body, "stream_options", dict, "an object") or {}
    if options and not stream:
        raise invalid("stream_options", "'stream_options' is only allowed when 'stream' is true")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise invalid("stream_options.include_usage", "'include_usage' must be a boolean")
    user = _opt(body, "user", str, "a string")
    salt = _opt(body, "cache_salt", str, "a string")
    if salt == "":
        raise invalid("cache_salt", "'cache_salt' must be a non-empty string")
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = _opt(body, name, int, "an integer")
        if value is not None:
            if value < 1:
                raise invalid(name, f"'{name}' must be at least 1")
            max_tokens = value
    n = _opt(body, "n", int, "an integer")
    if n is not None and n < 1:
        raise invalid("n", "'n' must be at least 1")
    common = {"model": model, "stream": stream, "include_usage": bool(include_usage),
              "user": user, "cache_salt": salt, "max_tokens": max_tokens}
    if not chat:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise invalid("prompt", "'prompt' must be a string (or a list of one string)")
        if len(prompt) > max_prompt_chars:
            raise GatewayError(400, f"'prompt' is longer than {max_prompt_chars} characters",
                               param="prompt", code="context_length_exceeded")
        return ChatRequest(False, prompt=prompt, **common)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty array")
    size = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(where, f"'{where}' must be an object")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise invalid(f"{where}.role", f"'{where}.role' must be a non-empty string")
        content = message.get("content")
        if content is None:
            if role != "assistant":
                raise invalid(f"{where}.content", f"'{where}.content' is required")
        elif isinstance(content, str):
            size += len(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" \
                        or not isinstance(part.get("text"), str):
                    raise invalid(f"{where}.content[{j}]",
                                  f"'{where}.content[{j}]' must be a text part "
                                  "({\"type\": \"text\", \"text\": ...}); this gateway "
                                  "forwards text only")
                size += len(part["text"])
        else:
            raise invalid(f"{where}.content",
                          f"'{where}.content' must be a string or an array of parts")
    if size > max_prompt_chars:
        raise GatewayError(400, f"'messages' hold more than {max_prompt_chars} characters",
                           param="messages", code="context_length_exceeded")
    add_generation = _opt(body, "add_generation_prompt", bool, "a boolean")
    kwargs = _opt(body, "chat_template_kwargs", dict, "an object") or {}
    tools = _opt(body, "tools", list, "an array")
    return ChatRequest(True, messages=tuple(messages),
                       add_generation_prompt=True if add_generation is None else add_generation,
                       chat_template_kwargs=kwargs,
                       tools=tuple(tools) if tools is not None else None, **common)


def session_of(request: ChatRequest, header: str | None, from_user: bool) -> str | None:
    """The session the request belongs to: the header's, else (if enabled) the body's user."""
    if header:
        return header[:256]
    if from_user and request.user:
        return f"user:{request.user}"[:256]
    return None


# The cluster's refusal codes (cache_plane/errors.py) as the client sees them:
# status, OpenAI-style code, Retry-After seconds.
ROUTE_ERRORS: dict[str, tuple[int, str, int | None]] = {
    "all_nodes_busy": (429, "all_nodes_busy", 1),
    "no_room": (503, "no_room", 1),
    "no_node_up": (503, "no_node_up", 2),
    "no_node_for_model": (503, "no_node_for_model", 5),
    "prompt_too_large": (400, "context_length_exceeded", None),
    "unknown_model": (404, "model_not_found", None),
}


def route_error(code: str, detail: str, model: str) -> GatewayError:
    """The client's error for a route the cluster refused with `code`."""
    status, client_code, retry = ROUTE_ERRORS.get(code, (503, code, 1))
    if status == 404:
        return GatewayError(404, f"The model '{model}' does not exist", param="model",
                            code=client_code)
    return GatewayError(status, f"{code}: {detail}", code=client_code, retry_after=retry)


def retryable_status(status: int) -> bool:
    """A backend answer before the first byte that another node may do better with."""
    return status >= 500


class TokenBucket:
    """`rate` requests per second with a burst of two seconds' worth; `now` is given."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, 2 * rate)
        self.tokens = self.capacity
        self.at: float | None = None

    def take(self, now: float) -> float:
        """Take one token: 0 if granted, else the seconds until one is due."""
        if self.at is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


# -- server-sent events -------------------------------------------------------------------


class SSESplitter:
    """Cut a byte stream into whole events (ending in a blank line), as they complete.

    Engines write one event per write, so whole events pass through as they arrive; bytes of
    an unfinished event are held until it ends (`pending` is what a broken stream leaves).
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else data
        events = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            events.append(buffer[start:end + 2])
            start = end + 2
        self._buffer = buffer[start:]
        return events

    @property
    def pending(self) -> bytes:
        return self._buffer


@dataclass(slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


def usage_from(payload: Any) -> Usage | None:
    """The usage of a response or chunk object, if it carries one."""
    if not isinstance(payload, dict) or not isinstance(payload.get("usage"), dict):
        return None
    usage = payload["usage"]

    def count(value: Any) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) \
            and value >= 0 else None

    details = usage.get("prompt_tokens_details")
    cached = count(details.get("cached_tokens")) if isinstance(details, dict) else None
    return Usage(count(usage.get("prompt_tokens")), count(usage.get("completion_tokens")),
                 cached)


def event_data(event: bytes) -> bytes:
    """The data of one SSE event (its ``data:`` lines joined)."""
    return b"".join(line[5:].strip() for line in event.split(b"\n")
                    if line.startswith(b"data:"))


def scan_event(event: bytes) -> tuple[Usage | None, bool]:
    """(usage, is_usage_only) of one SSE event; only an event naming usage is parsed."""
    if b'"usage"' not in event:
        return None, False
    data = event_data(event)
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None, False
    usage = usage_from(payload)
    return usage, usage is not None and payload.get("choices") == []


def carries_output(event: bytes) -> bool:
    """Whether an SSE event carries generated output (TTFT ends there, not at a role chunk)."""
    data = event_data(event)
    if not data.startswith(b"{"):
        return False
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    choices = payload.get("choices") if isinstance(payload, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        if choice.get("text") or choice.get("finish_reason") or delta.get("content") \
                or delta.get("tool_calls") or delta.get("reasoning_content"):
            return True
    return False


def error_event(error: GatewayError) -> bytes:
    """A well-formed SSE error event, then the end marker (vLLM's form of a failed stream)."""
    return b"data: " + orjson.dumps(error.body()) + b"\n\ndata: [DONE]\n\n"


# -- prediction accuracy ------------------------------------------------------------------


def prediction(predicted: int, engine: int, block_size: int) -> str:
    """Compare predicted reuse with the engine's cached tokens: exact, over or under.

    Within one block is exact: an engine recomputes at least the prompt's last token, so a
    full hit shows up to a block less than predicted.
    """
    if abs(predicted - engine) <= block_size:
        return "exact"
    return "over" if predicted > engine else "under"
