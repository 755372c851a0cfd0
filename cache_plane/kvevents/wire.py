"""The wire format of vLLM's and SGLang's ZMQ KV-event streams, decoded into plain values. PURE.

An engine publishes one batch per scheduler step as a 3-frame message
``[topic, seq (8 bytes, big-endian unsigned), msgpack payload]``. The payload is
``[ts, events]`` or ``[ts, events, data_parallel_rank]`` (a map with those keys is accepted
too). Each event is either a tagged array ``["BlockStored", field, ...]``, fields in
declaration order (vLLM up to 0.25, SGLang before its switch to maps; older schemas are
shorter arrays), or a tagged map ``{"type": "BlockStored", ...}`` (vLLM 0.26+, newer SGLang).
Trailing elements and keys this module does not know are ignored, so newer engines decode.

Decoding normalizes every block hash to an unsigned 64-bit int (`fold_hash`; for bytes the
fold depends on the engine: vLLM keeps a digest's last 8 bytes, SGLang and TRT-LLM its first
8) and every ``medium`` to a tier (`TIERS`). It drops on purpose, and counts in ``skipped``,
the events an index of this node's full-attention blocks must not take: unknown event tags
and media, blocks of another node (a ``locality`` other than LOCAL), stores of other KV-cache
groups (sliding window, Mamba), and GPU stores whose tokens do not cover their blocks exactly.

Anything malformed raises `WireError`, naming what was wrong; no other exception escapes for
any input bytes or frames. The replay socket's protocol is here too (`replay_request`,
`parse_replay_reply`).

Pure: no I/O, no clock, no logging.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias

import msgpack

MASK64 = (1 << 64) - 1
_INF = float("inf")
# The seq of the replay socket's end-of-replay marker (-1 as a signed 64-bit int).
END_SEQ = MASK64
# Refused outright: more than any engine step produces, bounded so a hostile payload is cheap.
MAX_EVENTS = 100_000
MAX_BLOCK_HASHES = 131_072

# How `bytes` block hashes fold to 64 bits, chosen per engine kind (`fold_hash`).
HASH_FORMS = ("vllm", "sglang")

GPU = "gpu"
CPU = "cpu"
DISK = "disk"
TIERS = (GPU, CPU, DISK)

# Engine `medium`, lowercased -> tier. None (older engines, and the block pool) is the GPU.
_TIER_BY_MEDIUM = {
    "gpu": GPU,
    "cpu": CPU, "cpu_tier1": CPU, "cpu_tier2": CPU, "cpu_pinned": CPU,
    "storage": DISK, "disk": DISK, "external": DISK,
}
# KV-cache groups whose blocks hold every token's KV; a prefix hit in another group is not one.
FULL_ATTENTION_KINDS = frozenset({"full_attention", "mla_attention", "sink_full"})
_LOCAL = "LOCAL"

# Each event's fields in declaration order: an array event's positions after its tag.
_STORED_FIELDS = (
    "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
    "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window",
)
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")

# msgpack type names for error messages (what the sender put on the wire).
_KINDS = {
    type(None): "nil", bool: "bool", int: "int", float: "float", str: "str", bytes: "bin",
    list: "array", dict: "map",
}


class WireError(ValueError):
    """A frame or payload that is not a KV-event message this module can read."""


@dataclass(frozen=True, slots=True)
class Stored:
    """Blocks now cached on `tier`, in prefix order, each a u64 hash.

    `parent` is the hash of the block before the first one (None: the sequence starts here).
    `token_ids` are the tokens of all the blocks, ``block_size`` each; empty for an offload
    store that only moves known hashes to another tier.
    """

    block_hashes: tuple[int, ...]
    parent: int | None
    token_ids: tuple[int, ...]
    block_size: int
    tier: str
    lora_name: str | None


@dataclass(frozen=True, slots=True)
class Removed:
    """Blocks no longer cached on `tier`."""

    block_hashes: tuple[int, ...]
    tier: str


@dataclass(frozen=True, slots=True)
class Cleared:
    """Every block of the node is gone, on all tiers (the engine reset its prefix cache)."""


Event: TypeAlias = Stored | Removed | Cleared


class Payload(NamedTuple):
    """A decoded payload: the engine's timestamp, its events, DP rank and how many were skipped."""

    ts: float
    events: tuple[Event, ...]
    dp_rank: int | None
    skipped: int


@dataclass(frozen=True, slots=True)
class Batch:
    """One engine step's events, with the stream's sequence number.

    `skipped` counts events dropped on purpose (see the module docstring), for metrics.
    """

    seq: int
    ts: float
    events: tuple[Event, ...]
    dp_rank: int | None
    skipped: int


def fold_hash(value: object, hash_form: str) -> int:
    """Return an engine block hash as an unsigned 64-bit int.

    Ints keep their value, negative ones as two's complement. Bytes (at least 8) fold to
    their last 8 bytes big-endian for ``"vllm"`` (vLLM's ``int.from_bytes(d, "big") & MASK64``)
    and their first 8 for ``"sglang"`` (SGLang and TRT-LLM: the signed int64 they would send).
    Raise WireError for anything else; ValueError for an unknown `hash_form`.
    """
    _check_form(hash_form)
    return _fold(value, hash_form)


def decode_payload(payload: bytes, hash_form: str) -> Payload:
    """Decode one msgpack batch payload; raise WireError if it is malformed.

    Deterministic: the same bytes always give the same events and `skipped` count.
    """
    _check_form(hash_form)
    obj = _unpack(payload)
    if isinstance(obj, list):
        if len(obj) < 2:
            raise WireError(f"batch array has {len(obj)} elements, needs ts and events")
        ts, events = obj[0], obj[1]
        dp_rank = obj[2] if len(obj) > 2 else None
    elif isinstance(obj, dict):
        for key in ("ts", "events"):
            if key not in obj:
                raise WireError(f"batch map has no {key}")
        ts, events = obj["ts"], obj["events"]
        dp_rank = obj.get("data_parallel_rank")
    else:
        raise WireError(f"batch must be an array or a map, not {_kind(obj)}")
    if type(ts) not in (int, float):
        raise WireError(f"ts must be a number, not {_kind(ts)}")
    if not -_INF < ts < _INF:
        raise WireError(f"ts must be finite, got {ts}")
    if dp_rank is not None and (type(dp_rank) is not int or dp_rank < 0):
        raise WireError("data_parallel_rank must be nil or an int >= 0")
    if not isinstance(events, list):
        raise WireError(f"events must be an array, not {_kind(events)}")
    if len(events) > MAX_EVENTS:
        raise WireError(f"batch has {len(events)} events, more than {MAX_EVENTS}")
    decoded: list[Event] = []
    for i, raw in enumerate(events):
        try:
            event = _decode_event(raw, hash_form)
        except WireError as exc:
            raise WireError(f"event {i}: {exc}") from None
        if event is not None:
            decoded.append(event)
    return Payload(float(ts), tuple(decoded), dp_rank, len(events) - len(decoded))


def decode_frames(frames: Sequence[bytes], hash_form: str) -> Batch:
    """Decode a live message ``[topic, seq, payload]``; raise WireError if it is malformed.

    The topic is not checked (the subscription filters on it).
    """
    _check_form(hash_form)
    parts = _frames(frames)
    if len(parts) != 3:
        raise WireError(f"a live message has 3 frames (topic, seq, payload), got {len(parts)}")
    return _batch(_seq(parts[1]), decode_payload(parts[2], hash_form))


def replay_request(start_seq: int) -> list[bytes]:
    """Return the frames a DEALER sends to ask the replay socket for every batch from `start_seq`."""
    if type(start_seq) is not int or not 0 <= start_seq <= MASK64:
        raise ValueError(f"start_seq must be an int in [0, 2**64), got {start_seq!r}")
    return [b"", start_seq.to_bytes(8, "big")]


def parse_replay_reply(frames: Sequence[bytes], hash_form: str) -> Batch | None:
    """Decode one message a DEALER receives from the replay socket; None marks the end.

    Both framings are read, with or without the leading empty delimiter frame: vLLM up to
    0.25 and SGLang send ``[b"", seq, payload]``, vLLM 0.26+ ``[b"", topic, seq, payload]``.
    The end marker is seq `END_SEQ` or an empty payload (whatever the other frame holds).
    Raise WireError for anything else.
    """
    _check_form(hash_form)
    parts = _frames(frames)
    if len(parts) == 4:
        if parts[0]:
            raise WireError("a 4-frame replay reply must start with an empty delimiter frame")
    elif len(parts) not in (2, 3):
        raise WireError(f"a replay reply has 2 to 4 frames, got {len(parts)}")
    # 3 frames are [delimiter, seq, payload] or [topic, seq, payload]: the same to us.
    seq, payload = _seq(parts[-2]), parts[-1]
    if seq == END_SEQ or not payload:
        return None
    return _batch(seq, decode_payload(payload, hash_form))


def _check_form(hash_form: str) -> None:
    if hash_form not in HASH_FORMS:
        raise ValueError(f"hash_form must be one of {HASH_FORMS}, got {hash_form!r}")


def _batch(seq: int, payload: Payload) -> Batch:
    return Batch(seq, payload.ts, payload.events, payload.dp_rank, payload.skipped)


def _frames(frames: object) -> list[bytes]:
    """The frames as bytes: anything with the buffer protocol (bytes, memoryview, zmq.Frame)."""
    if not isinstance(frames, Sequence) or isinstance(frames, (str, bytes, bytearray, memoryview)):
        raise WireError(f"frames must be a sequence of bytes, not {_kind(frames)}")
    parts: list[bytes] = []
    for i, frame in enumerate(frames):
        if isinstance(frame, bytes):
            parts.append(frame)
            continue
        try:
            parts.append(bytes(memoryview(frame)))
        except (TypeError, ValueError, BufferError):
            raise WireError(f"frame {i} must be bytes, not {_kind(frame)}") from None
    return parts


def _seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise WireError(f"seq frame must be 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big")


def _unpack(payload: object) -> Any:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError(f"payload must be bytes, not {_kind(payload)}")
    if not payload:
        raise WireError("payload is empty")
    try:
        return msgpack.unpackb(bytes(payload), raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ValueError covers ExtraData, FormatError, StackError and invalid UTF-8 strings;
        # TypeError an array or map used as a map key.
        raise WireError(f"payload is not valid msgpack: {exc}") from exc


def _decode_event(raw: Any, hash_form: str) -> Event | None:
    """One event, None if it is skipped on purpose."""
    if isinstance(raw, list):
        if not raw:
            raise WireError("event array is empty")
        tag = raw[0]
    elif isinstance(raw, dict):
        if "type" not in raw:
            raise WireError("event map has no type")
        tag = raw["type"]
    else:
        raise WireError(f"event must be an array or a map, not {_kind(raw)}")
    if not isinstance(tag, str):
        raise WireError(f"event tag must be a str, not {_kind(tag)}")
    spec = _EVENTS.get(tag)
    if spec is None:
        return None
    names, decode = spec
    if isinstance(raw, list):
        # Shorter arrays are older schemas, longer ones newer: zip keeps what both know.
        return decode(dict(zip(names, raw[1:], strict=False)), hash_form)
    fields = {name: raw[name] for name in names if name in raw}
    locality = _optional_str(raw.get("locality"), "locality")
    event = decode(fields, hash_form)
    # Validated first, so a malformed remote event is still an error.
    return event if locality is None or locality.upper() == _LOCAL else None


def _decode_stored(fields: dict[str, Any], hash_form: str) -> Stored | None:
    hashes = _hashes(_required(fields, "block_hashes"), hash_form)
    parent_raw = fields.get("parent_block_hash")
    parent = None if parent_raw is None else _fold_field(parent_raw, hash_form, "parent_block_hash")
    token_ids = _token_ids(_required(fields, "token_ids"))
    block_size = _required(fields, "block_size")
    if type(block_size) is not int or block_size < 0:
        raise WireError("block_size must be an int >= 0")
    tier = _tier(fields.get("medium"))
    lora_name = _optional_str(fields.get("lora_name"), "lora_name")
    kind = _optional_str(fields.get("kv_cache_spec_kind"), "kv_cache_spec_kind")
    if tier is None or token_ids is None or (kind is not None and kind not in FULL_ATTENTION_KINDS):
        return None
    if tier != GPU and (not token_ids or block_size == 0):
        token_ids = ()  # an offload: known blocks copied to another tier
    elif block_size == 0 or len(token_ids) != block_size * len(hashes):
        return None  # tokens span blocks not listed (hybrid, sparse): not a prefix chain
    return Stored(hashes, parent, token_ids, block_size, tier, lora_name)


def _decode_removed(fields: dict[str, Any], hash_form: str) -> Removed | None:
    hashes = _hashes(_required(fields, "block_hashes"), hash_form)
    tier = _tier(fields.get("medium"))
    return None if tier is None else Removed(hashes, tier)


def _decode_cleared(fields: dict[str, Any], hash_form: str) -> Cleared:
    return Cleared()


# Event tag -> (field names in declaration order, decoder). Other tags are skipped.
_EVENTS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any], str], Event | None]]] = {
    "BlockStored": (_STORED_FIELDS, _decode_stored),
    "BlockRemoved": (_REMOVED_FIELDS, _decode_removed),
    "AllBlocksCleared": ((), _decode_cleared),
}


def _required(fields: dict[str, Any], name: str) -> Any:
    if name not in fields:
        raise WireError(f"{name} is missing")
    return fields[name]


def _hashes(value: Any, hash_form: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise WireError(f"block_hashes must be an array, not {_kind(value)}")
    if len(value) > MAX_BLOCK_HASHES:
        raise WireError(f"block_hashes has {len(value)} hashes, more than {MAX_BLOCK_HASHES}")
    return tuple(_fold_field(h, hash_form, f"block_hashes[{i}]") for i, h in enumerate(value))


def _fold_field(value: Any, hash_form: str, name: str) -> int:
    try:
        return _fold(value, hash_form)
    except WireError as exc:
        raise WireError(f"{name}: {exc}") from None


def _fold(value: object, hash_form: str) -> int:
    if type(value) is int:
        if -(1 << 63) <= value <= MASK64:
            return value & MASK64
        raise WireError("hash does not fit in 64 bits")
    if isinstance(value, bytes):
        if len(value) < 8:
            raise WireError(f"hash has {len(value)} bytes, needs at least 8")
        return int.from_bytes(value[-8:] if hash_form == "vllm" else value[:8], "big")
    raise WireError(f"hash must be an int or bin, not {_kind(value)}")


def _token_ids(value: Any) -> tuple[int, ...] | None:
    """The token ids; None for pairs (SGLang's EAGLE bigram tokens), which are skipped."""
    if not isinstance(value, list):
        raise WireError(f"token_ids must be an array, not {_kind(value)}")
    if all(type(t) is int for t in value):
        return tuple(value)
    if all(isinstance(t, list) and len(t) == 2 and all(type(x) is int for x in t) for t in value):
        return None
    i = next(i for i, t in enumerate(value) if type(t) is not int)
    raise WireError(f"token_ids[{i}] must be an int, not {_kind(value[i])}")


def _tier(medium: Any) -> str | None:
    """The tier of an engine medium; None for a medium this module does not know."""
    if medium is None:
        return GPU
    if not isinstance(medium, str):
        raise WireError(f"medium must be nil or a str, not {_kind(medium)}")
    return _TIER_BY_MEDIUM.get(medium.lower())


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise WireError(f"{name} must be nil or a str, not {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return _KINDS.get(type(value), type(value).__name__)
