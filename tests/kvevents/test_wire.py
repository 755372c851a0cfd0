"""Engine KV-event wire decoding: golden vLLM/SGLang frames, replay framings, skips, fuzzing.

Golden payloads are built with plain `msgpack.packb` from the field lists documented in
shared/research/kv_events.md (declaration order), which is byte-identical to what the
engines' msgspec encoders produce; a few are written byte by byte to pin int encodings.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_plane.kvevents.wire import (
    END_SEQ,
    HASH_FORMS,
    MAX_BLOCK_HASHES,
    MAX_EVENTS,
    Batch,
    Cleared,
    Removed,
    Stored,
    WireError,
    decode_frames,
    decode_payload,
    fold_hash,
    parse_replay_reply,
    replay_request,
)

MASK64 = 2**64 - 1

# vLLM's event fields in declaration order (0.25 array layout = 0.26 map keys).
STORED_FIELDS = [
    "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
    "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window",
]
REMOVED_FIELDS = ["block_hashes", "medium", "group_idx"]
# Map layout: fields without a default are always emitted, `= None` ones only when set.
STORED_ALWAYS = {
    "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
}
REMOVED_ALWAYS = {"block_hashes", "medium"}


def array_event(tag: str, fields: list[str], **values: Any) -> list[Any]:
    """A tagged array event with every field (trailing defaults included, as msgspec does)."""
    return [tag, *(values.get(name) for name in fields)]


def map_event(tag: str, fields: list[str], always: set[str], **values: Any) -> dict[str, Any]:
    """A tagged map event: "type" first, None-default fields omitted when None."""
    event: dict[str, Any] = {"type": tag}
    for name in fields:
        if name in always or values.get(name) is not None:
            event[name] = values.get(name)
    return event


def stored_array(**values: Any) -> list[Any]:
    return array_event("BlockStored", STORED_FIELDS, **values)


def stored_map(**values: Any) -> dict[str, Any]:
    return map_event("BlockStored", STORED_FIELDS, STORED_ALWAYS, **values)


def removed_map(**values: Any) -> dict[str, Any]:
    return map_event("BlockRemoved", REMOVED_FIELDS, REMOVED_ALWAYS, **values)


def pack_batch(events: list[Any], ts: float = 1.5, dp_rank: int | None = 0) -> bytes:
    return msgpack.packb([ts, events, dp_rank])


def decode_events(events: list[Any], hash_form: str = "vllm") -> tuple[tuple[Any, ...], int]:
    payload = decode_payload(pack_batch(events), hash_form)
    return payload.events, payload.skipped


def seq8(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


TOKENS_32 = list(range(1000, 1032))
BIG = 2**63 + 12345  # msgpack packs it as uint64 (0xcf)


# --- golden layouts ---------------------------------------------------------------------


def test_array_events_with_all_fields_025_layout():
    """A vLLM 0.25 batch (array events, every field) decodes to normalized values."""
    events = [
        stored_array(block_hashes=[BIG, 7], parent_block_hash=3, token_ids=TOKENS_32, block_size=16,
                     lora_id=None, medium="GPU", lora_name="sql-lora", extra_keys=[None, None],
                     group_idx=0, kv_cache_spec_kind="full_attention"),
        array_event("BlockRemoved", REMOVED_FIELDS, block_hashes=[7], medium="GPU", group_idx=0),
        ["AllBlocksCleared"],
    ]
    payload = pack_batch(events, ts=1789095808.5, dp_rank=2)
    assert b"\xcf" + BIG.to_bytes(8, "big") in payload
    assert decode_payload(payload, "vllm") == (
        1789095808.5,
        (Stored((BIG, 7), 3, tuple(TOKENS_32), 16, "gpu", "sql-lora"), Removed((7,), "gpu"), Cleared()),
        2,
        0,
    )


def test_short_v09_array_events():
    """v0.9 events ([tag, hashes, parent, tokens, block_size, lora_id]; [tag, hashes]) are GPU."""
    events = [["BlockStored", [11, 12], None, TOKENS_32, 16, None], ["BlockRemoved", [11]]]
    payload = decode_payload(msgpack.packb([0.25, events]), "vllm")
    assert payload.events == (Stored((11, 12), None, tuple(TOKENS_32), 16, "gpu", None), Removed((11,), "gpu"))
    assert payload.dp_rank is None


def test_map_events_026_layout():
    """vLLM 0.26 tagged maps, None defaults omitted, decode like the array layout."""
    stored = stored_map(block_hashes=[BIG], parent_block_hash=None, token_ids=TOKENS_32[:16],
                        block_size=16, medium="CPU", group_idx=0, kv_cache_spec_kind="full_attention")
    assert list(stored) == ["type", *STORED_FIELDS[:7], "group_idx", "kv_cache_spec_kind"]
    removed = removed_map(block_hashes=[BIG], medium=None)
    assert removed == {"type": "BlockRemoved", "block_hashes": [BIG], "medium": None}
    events, skipped = decode_events([stored, removed, {"type": "AllBlocksCleared"}])
    assert events == (Stored((BIG,), None, tuple(TOKENS_32[:16]), 16, "cpu", None), Removed((BIG,), "gpu"), Cleared())
    assert skipped == 0


def test_array_and_map_layouts_agree():
    """The same event in the 0.25 array and the 0.26 map layout decodes to the same value."""
    values = dict(block_hashes=[1, 2], parent_block_hash=9, token_ids=TOKENS_32, block_size=16,
                  medium="GPU", lora_name="a", group_idx=0, kv_cache_spec_kind="mla_attention")
    assert decode_events([stored_array(**values)]) == decode_events([stored_map(**values)])


def test_outer_batch_as_map():
    """An outer batch written as a map (one stored vLLM snapshot) is read by key."""
    payload = msgpack.packb({"ts": 3.0, "events": [["AllBlocksCleared"]], "data_parallel_rank": 1, "x": 5})
    assert decode_payload(payload, "vllm") == (3.0, (Cleared(),), 1, 0)
    assert decode_payload(msgpack.packb({"events": [], "ts": 4}), "vllm") == (4.0, (), None, 0)


def test_outer_batch_without_rank_and_with_extra_elements():
    """[ts, events] (before DP ranks) and [ts, events, rank, extra...] both decode."""
    assert decode_payload(msgpack.packb([1.0, []]), "vllm") == (1.0, (), None, 0)
    assert decode_payload(msgpack.packb([1.0, [], None]), "vllm").dp_rank is None
    assert decode_payload(msgpack.packb([1.0, [], 3, "future", {}]), "vllm").dp_rank == 3


def test_unknown_keys_and_extra_trailing_elements_are_ignored():
    """Newer engines' extra array elements and map keys (locality, session_id, ...) are ignored."""
    array = [*stored_array(block_hashes=[5], token_ids=[1, 2], block_size=2), "LOCAL", "owner", 42]
    mapped = {**stored_map(block_hashes=[5], token_ids=[1, 2], block_size=2),
              "locality": "LOCAL", "session_id": "s1", "cache_salt": b"x", 7: "int key"}
    removed = [*array_event("BlockRemoved", REMOVED_FIELDS, block_hashes=[5]), "LOCAL", [1]]
    events, skipped = decode_events([array, mapped, removed, ["AllBlocksCleared", 1, 2]])
    stored = Stored((5,), None, (1, 2), 2, "gpu", None)
    assert events == (stored, stored, Removed((5,), "gpu"), Cleared())
    assert skipped == 0


def test_real_vllm_026_capture():
    """The vLLM 0.26.0 capture from kthena#1535 (its 16 token ids were elided; any 16 do)."""
    tokens = list(range(151644, 151660))
    capture = [1789095808.83, [{
        "type": "BlockStored", "block_hashes": [15760518052499183552], "parent_block_hash": None,
        "token_ids": tokens, "block_size": 16, "lora_id": None, "medium": "GPU", "lora_name": None,
        "extra_keys": [None], "group_idx": 0, "kv_cache_spec_kind": "full_attention",
    }], 0]
    batch = decode_frames([b"kv-events", seq8(41), msgpack.packb(capture)], "vllm")
    assert batch == Batch(41, 1789095808.83, (Stored((15760518052499183552,), None, tuple(tokens), 16, "gpu", None),), 0, 0)


def test_research_note_section_5_hex_example():
    """The note's byte-exact map-event example (bytes hash, dp rank nil) matches packb and decodes."""
    digest = hashlib.sha256(b"block").digest()
    hex_example = bytes.fromhex(
        "93 cb3ff8000000000000 91 83 a474797065 ac426c6f636b52656d6f766564"
        " ac626c6f636b5f686173686573 91 c420") + digest + bytes.fromhex("a66d656469756d c0 c0")
    structure = [1.5, [{"type": "BlockRemoved", "block_hashes": [digest], "medium": None}], None]
    assert msgpack.packb(structure) == hex_example
    folded = int.from_bytes(digest, "big") & MASK64
    assert decode_payload(hex_example, "vllm") == (1.5, (Removed((folded,), "gpu"),), None, 0)
    assert seq8(7) == bytes.fromhex("0000000000000007")
    assert seq8(END_SEQ) == bytes.fromhex("ffffffffffffffff")


# --- hashes -----------------------------------------------------------------------------


def test_vllm_folds_32_byte_digests_to_their_last_8_bytes():
    """vLLM's bytes hashes (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0) fold like its int form."""
    digests = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    events, _ = decode_events([stored_array(block_hashes=digests[1:], parent_block_hash=digests[0],
                                            token_ids=TOKENS_32, block_size=16)])
    expected = [int.from_bytes(d, "big") & MASK64 for d in digests]
    assert events[0].parent == expected[0]
    assert events[0].block_hashes == tuple(expected[1:])


def test_sglang_negative_int64_hashes_and_first_8_bytes():
    """SGLang's signed int64 (first 16 hex chars of SHA-256) and its bytes form agree as u64."""
    digest = hashlib.sha256(b"sglang page").digest()
    unsigned = int(digest.hex()[:16], 16)
    signed = unsigned - 2**64 if unsigned >= 2**63 else unsigned
    negative = -(2**63)  # the extreme int64, msgpack 0xd3
    events, _ = decode_events(
        [["BlockStored", [signed, negative, digest], None, [1, 2, 3], 1, None, "GPU"]], "sglang")
    assert events[0].block_hashes == (unsigned, 2**63, unsigned)
    assert fold_hash(-1, "vllm") == MASK64


@pytest.mark.parametrize("value, message", [
    (2**64, "does not fit in 64 bits"),
    (-(2**63) - 1, "does not fit in 64 bits"),
    (b"1234567", "7 bytes"),
    ("abcd", "not str"),
    (True, "not bool"),
    (1.0, "not float"),
    (None, "not nil"),
])
def test_bad_hashes_are_wire_errors(value, message):
    """Hashes wider than 64 bits, short bytes and other types are refused."""
    with pytest.raises(WireError, match=message):
        fold_hash(value, "vllm")


def test_unknown_hash_form_is_a_config_error():
    """An unknown hash form is the caller's bug (ValueError), raised before any decoding."""
    with pytest.raises(ValueError, match="hash_form") as info:
        decode_payload(b"", "trtllm")
    assert not isinstance(info.value, WireError)
    assert HASH_FORMS == ("vllm", "sglang")


# --- int widths, hand-built bytes -------------------------------------------------------


def fixstr(text: str) -> bytes:
    raw = text.encode()
    return bytes([0xA0 | len(raw)]) + raw


def test_every_msgpack_int_width_decodes():
    """Small values packed wide (0xd3 int64, 0xcf uint64, ...) and 16-bit containers decode."""
    u64 = b"\xcf" + struct.pack(">Q", 5)
    i64 = b"\xd3" + struct.pack(">q", 3)
    tokens = [b"\xd3" + struct.pack(">q", 1), b"\xcf" + struct.pack(">Q", 2), b"\xd0\x03",
              b"\xcc\x04", b"\xcd\x00\x05", b"\xce\x00\x00\x00\x06", b"\xd1\x00\x07", b"\x08"]
    stored = (b"\x96" + fixstr("BlockStored") + b"\x91" + u64 + i64
              + b"\xdc\x00\x08" + b"".join(tokens)  # array16 of 8 tokens
              + b"\xcf" + struct.pack(">Q", 8) + b"\xc0")
    negative = b"\xd2" + struct.pack(">i", -2)  # int32
    removed = (b"\xde\x00\x03" + fixstr("type") + fixstr("BlockRemoved")  # map16
               + fixstr("block_hashes") + b"\x91" + negative
               + b"\xd9\x06medium" + b"\xd9\x03CPU")  # str8
    payload = (b"\x93" + b"\xca" + struct.pack(">f", 2.5) + b"\x92" + stored + removed
               + b"\xd3" + struct.pack(">q", 0))
    assert decode_payload(payload, "sglang") == (
        2.5, (Stored((5,), 3, (1, 2, 3, 4, 5, 6, 7, 8), 8, "gpu", None), Removed((2**64 - 2,), "cpu")), 0, 0)


# --- frames and replay ------------------------------------------------------------------


def test_live_frames_decode_with_their_seq():
    """[topic, seq8, payload] gives a Batch with the seq; any buffer type is a frame."""
    payload = pack_batch([["AllBlocksCleared"]], ts=9.0, dp_rank=1)
    expected = Batch(2**63 + 1, 9.0, (Cleared(),), 1, 0)
    assert decode_frames([b"kv@pod@model", seq8(2**63 + 1), payload], "vllm") == expected
    assert decode_frames((b"", bytearray(seq8(2**63 + 1)), memoryview(payload)), "vllm") == expected


@pytest.mark.parametrize("frames, message", [
    ([b"t", seq8(1)], "3 frames"),
    ([b"t", seq8(1), pack_batch([]), b""], "3 frames"),
    ([b"t", b"\x00" * 7, pack_batch([])], "seq frame must be 8 bytes"),
    ([b"t", seq8(1), b""], "payload is empty"),
    ([b"t", 1, pack_batch([])], "frame 1 must be bytes, not int"),
    ([b"t", seq8(1), "text"], "frame 2 must be bytes, not str"),
    (b"topic", "sequence of bytes"),
    (None, "sequence of bytes"),
])
def test_malformed_live_frames(frames, message):
    """Wrong frame counts, seq widths and frame types are WireErrors naming the problem."""
    with pytest.raises(WireError, match=message):
        decode_frames(frames, "vllm")


PAYLOAD = pack_batch([["BlockRemoved", [4]]], ts=2.0, dp_rank=None)
REPLAYED = Batch(12, 2.0, (Removed((4,), "gpu"),), None, 0)


@pytest.mark.parametrize("frames", [
    [b"", seq8(12), PAYLOAD],  # vLLM <= 0.25, SGLang
    [seq8(12), PAYLOAD],
    [b"", b"kv-events", seq8(12), PAYLOAD],  # vLLM 0.26+
    [b"kv-events", seq8(12), PAYLOAD],
    [b"", b"", seq8(12), PAYLOAD],  # 0.26+ with an empty topic
])
def test_replay_reply_framings(frames):
    """Both replay framings decode, with or without the leading empty delimiter."""
    assert parse_replay_reply(frames, "vllm") == REPLAYED


@pytest.mark.parametrize("frames", [
    [b"", seq8(END_SEQ), b""],  # vLLM <= 0.25, SGLang
    [seq8(END_SEQ), b""],
    [b"", b"", seq8(END_SEQ), b""],  # vLLM 0.26+
    [b"", seq8(5), b""],  # empty payload, any seq (Dynamo's rule)
    [b"kv-events", seq8(0), b""],
    [b"", b"kv", seq8(END_SEQ), PAYLOAD],  # END_SEQ wins over a payload
])
def test_replay_end_markers(frames):
    """Both end markers, and an empty payload under any seq, end the replay (None)."""
    assert parse_replay_reply(frames, "vllm") is None


@pytest.mark.parametrize("frames, message", [
    ([PAYLOAD], "2 to 4 frames"),
    ([b"", b"", b"t", seq8(1), PAYLOAD], "2 to 4 frames"),
    ([b"id", b"t", seq8(1), PAYLOAD], "empty delimiter"),
    ([b"", seq8(1)[:7], PAYLOAD], "seq frame must be 8 bytes"),
    ([b"", seq8(1), b"\xc1"], "not valid msgpack"),
])
def test_malformed_replay_replies(frames, message):
    """Anything but the two framings is a WireError."""
    with pytest.raises(WireError, match=message):
        parse_replay_reply(frames, "vllm")


def test_replay_request_frames():
    """A DEALER asks with [b"", start_seq as 8 bytes big-endian]; bad seqs are refused."""
    assert replay_request(0) == [b"", b"\x00" * 8]
    assert replay_request(258) == [b"", bytes.fromhex("0000000000000102")]
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            replay_request(bad)


# --- skips ------------------------------------------------------------------------------

STORE = dict(block_hashes=[1, 2], token_ids=TOKENS_32, block_size=16)


@pytest.mark.parametrize("event", [
    {**stored_map(**STORE), "locality": "REMOTE"},
    {**removed_map(block_hashes=[1]), "locality": "remote"},
    {"type": "AllBlocksCleared", "locality": "REMOTE"},
    {**removed_map(block_hashes=[1]), "locality": "ELSEWHERE"},
    stored_map(**STORE, kv_cache_spec_kind="sliding_window"),
    stored_array(**STORE, kv_cache_spec_kind="mamba"),
    stored_array(block_hashes=[1, 2], token_ids=TOKENS_32[:31], block_size=16),  # sparse span
    stored_array(block_hashes=[1], token_ids=TOKENS_32, block_size=16),
    stored_array(block_hashes=[1], token_ids=[], block_size=0),  # GPU store without tokens
    stored_array(**STORE, medium="NVME"),
    removed_map(block_hashes=[1], medium="HBM3"),
    ["BlockStoredWithMetadata", [1], None, [1], 1, None, None, {"salt": "x"}],
    {"type": "PrefixPinned", "block_hashes": "anything"},
    ["SomethingNew"],
    ["BlockStored", [1], None, [[5, 6], [6, 7]], 2, None, "GPU"],  # EAGLE bigram tokens
])
def test_skipped_events_are_counted(event):
    """Remote, other-group, sparse, unknown-medium, unknown-tag and bigram events are skipped."""
    assert decode_events([["AllBlocksCleared"], event]) == ((Cleared(),), 1)


@pytest.mark.parametrize("event, expected", [
    ({**stored_map(**STORE), "locality": "LOCAL"}, Stored((1, 2), None, tuple(TOKENS_32), 16, "gpu", None)),
    (stored_map(**STORE, kv_cache_spec_kind="sink_full"), Stored((1, 2), None, tuple(TOKENS_32), 16, "gpu", None)),
    (stored_array(block_hashes=[1, 2], token_ids=[], block_size=0, medium="CPU"),
     Stored((1, 2), None, (), 0, "cpu", None)),
    (stored_array(block_hashes=[1, 2], token_ids=[], block_size=16, medium="STORAGE"),
     Stored((1, 2), None, (), 16, "disk", None)),
    (stored_array(block_hashes=[1, 2], token_ids=TOKENS_32, block_size=0, medium="cpu_tier1"),
     Stored((1, 2), None, (), 0, "cpu", None)),
    (stored_array(**STORE, medium="CPU_PINNED"), Stored((1, 2), None, tuple(TOKENS_32), 16, "cpu", None)),
    (stored_array(block_hashes=[], token_ids=[], block_size=16), Stored((), None, (), 16, "gpu", None)),
])
def test_kept_edge_cases(event, expected):
    """Local events, dense groups and token-less offload stores (tier moves) are kept."""
    assert decode_events([event]) == ((expected,), 0)


@pytest.mark.parametrize("medium, tier", [
    (None, "gpu"), ("GPU", "gpu"), ("gpu", "gpu"), ("CPU", "cpu"), ("CPU_TIER1", "cpu"),
    ("CPU_TIER2", "cpu"), ("Cpu_Pinned", "cpu"), ("STORAGE", "disk"), ("DISK", "disk"),
    ("EXTERNAL", "disk"),
])
def test_medium_to_tier(medium, tier):
    """Every known medium maps to its tier, case-insensitively."""
    events, _ = decode_events([array_event("BlockRemoved", REMOVED_FIELDS, block_hashes=[1], medium=medium)])
    assert events == (Removed((1,), tier),)


# --- malformed payloads -----------------------------------------------------------------

CLEAR = ["AllBlocksCleared"]


@pytest.mark.parametrize("batch, message", [
    ([1.0, [CLEAR, CLEAR, CLEAR, ["BlockStored", 5, None, [], 0]]], "event 3: block_hashes must be an array, not int"),
    ([1.0, [["BlockRemoved", [1, b"1234567"]]]], "event 0: block_hashes\\[1\\]: hash has 7 bytes"),
    ([1.0, [["BlockStored", [1], "p", [1], 1]]], "parent_block_hash: hash must be an int or bin, not str"),
    ([1.0, [["BlockStored", [1], None]]], "event 0: token_ids is missing"),
    ([1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": [1]}]], "block_size is missing"),
    ([1.0, [{"type": "BlockRemoved"}]], "block_hashes is missing"),
    ([1.0, [["BlockStored", [1], None, [1], -1]]], "block_size must be an int >= 0"),
    ([1.0, [["BlockStored", [1], None, [1], True]]], "block_size must be an int >= 0"),
    ([1.0, [["BlockStored", [1], None, [1, "2"], 2]]], "token_ids\\[1\\] must be an int, not str"),
    ([1.0, [["BlockStored", [1], None, {}, 1]]], "token_ids must be an array, not map"),
    ([1.0, [["BlockRemoved", [1], 5]]], "medium must be nil or a str, not int"),
    ([1.0, [stored_array(**STORE, lora_name=3)]], "lora_name must be nil or a str"),
    ([1.0, [stored_array(**STORE, kv_cache_spec_kind=[1])]], "kv_cache_spec_kind must be nil or a str"),
    ([1.0, [{**removed_map(block_hashes=[1]), "locality": 1}]], "locality must be nil or a str"),
    ([1.0, [{"block_hashes": [1]}]], "event 0: event map has no type"),
    ([1.0, [[7, [1]]]], "event tag must be a str, not int"),
    ([1.0, [[]]], "event array is empty"),
    ([1.0, [None]], "event must be an array or a map, not nil"),
    ([1.0, {"a": 1}], "events must be an array, not map"),
    (["now", []], "ts must be a number, not str"),
    ([float("inf"), []], "ts must be finite"),
    ([float("nan"), []], "ts must be finite"),
    ([1.0, [], -1], "data_parallel_rank"),
    ([1.0, [], "0"], "data_parallel_rank"),
    ([1.0], "needs ts and events"),
    ({"ts": 1.0}, "batch map has no events"),
    ("batch", "batch must be an array or a map, not str"),
])
def test_malformed_payloads_name_the_problem(batch, message):
    """Wrong types and missing fields raise WireError with a message saying what and where."""
    with pytest.raises(WireError, match=message):
        decode_payload(msgpack.packb(batch), "vllm")


@pytest.mark.parametrize("payload", [
    b"",
    b"\xc1",  # never used
    b"\x93\x01",  # truncated
    msgpack.packb([1.0, []]) + b"\x00",  # trailing data
    b"\xa1\xff",  # invalid UTF-8 str
    msgpack.packb({(1, 2): 1}),  # an array as a map key
    b"\x91" * 100_000 + b"\xc0",  # nesting deeper than the unpacker's stack
    b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 G elements
    msgpack.packb(msgpack.ExtType(5, b"x")),
])
def test_bytes_that_are_not_msgpack(payload):
    """Undecodable or hostile msgpack is a WireError."""
    with pytest.raises(WireError):
        decode_payload(payload, "vllm")


def test_size_limits():
    """More than MAX_EVENTS events, or MAX_BLOCK_HASHES hashes in one event, is refused."""
    decode_payload(msgpack.packb([1.0, [CLEAR] * MAX_EVENTS]), "vllm")
    with pytest.raises(WireError, match="more than 100000"):
        decode_payload(msgpack.packb([1.0, [CLEAR] * (MAX_EVENTS + 1)]), "vllm")
    hashes = list(range(MAX_BLOCK_HASHES + 1))
    with pytest.raises(WireError, match="event 0: block_hashes has 131073 hashes"):
        decode_payload(msgpack.packb([1.0, [["BlockRemoved", hashes]]]), "vllm")


# --- properties -------------------------------------------------------------------------

leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
          | st.text(max_size=12) | st.binary(max_size=40))
structures = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8) | st.integers(-3, 3), children, max_size=5),
    max_leaves=30,
)
TAGS = ["BlockStored", "BlockRemoved", "AllBlocksCleared", "Other"]
KEYS = [*STORED_FIELDS, "type", "locality"]
field_values = (structures | st.lists(st.integers(-(2**63), 2**64 - 1), max_size=4)
                | st.lists(st.binary(min_size=6, max_size=34), max_size=3) | st.integers(0, 4)
                | st.sampled_from(["GPU", "CPU", "DISK", "REMOTE", "LOCAL", "full_attention", "mamba"]))
array_events = st.builds(lambda tag, rest: [tag, *rest], st.sampled_from(TAGS), st.lists(field_values, max_size=12))
map_events = st.builds(lambda tag, rest: {"type": tag, **rest}, st.sampled_from(TAGS),
                       st.dictionaries(st.sampled_from(KEYS), field_values, max_size=12))
near_batches = st.builds(
    lambda ts, events, rank: [ts, events, rank],
    st.floats() | st.integers(0, 2**40) | structures,
    st.lists(array_events | map_events | structures, max_size=5),
    st.none() | st.integers(-2, 4) | structures,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(HASH_FORMS))
def test_arbitrary_bytes_raise_only_wire_errors(payload, hash_form):
    """Any payload bytes either decode or raise WireError."""
    with contextlib.suppress(WireError):
        decode_payload(payload, hash_form)


@settings(max_examples=400, deadline=None)
@given(structures | near_batches, st.sampled_from(HASH_FORMS))
def test_arbitrary_structures_raise_only_wire_errors(batch, hash_form):
    """Any msgpack structure, including near-valid batches, either decodes or raises WireError."""
    with contextlib.suppress(WireError):
        decode_payload(msgpack.packb(batch), hash_form)


frame = st.binary(max_size=24) | st.binary(min_size=8, max_size=8)
frame_lists = (
    st.lists(frame, max_size=6)
    | st.lists(frame | st.none() | st.integers() | st.text(max_size=4), max_size=5)
    | st.builds(lambda parts, batch: [*parts, msgpack.packb(batch)], st.lists(frame, max_size=3), near_batches)
)


@settings(max_examples=400, deadline=None)
@given(frame_lists, st.sampled_from(HASH_FORMS))
def test_arbitrary_frames_raise_only_wire_errors(frames, hash_form):
    """Any list of frames, live or replayed, either decodes or raises WireError."""
    with contextlib.suppress(WireError):
        decode_frames(frames, hash_form)
    with contextlib.suppress(WireError):
        parse_replay_reply(frames, hash_form)


hashes = st.integers(-(2**63), 2**64 - 1) | st.binary(min_size=8, max_size=32)


@settings(max_examples=150, deadline=None)
@given(st.lists(hashes, max_size=4), st.none() | hashes, st.integers(1, 4), st.sampled_from(HASH_FORMS),
       st.sampled_from([None, "GPU", "gpu"]), st.none() | st.text(max_size=8))
def test_valid_stores_decode_alike_in_both_layouts(block_hashes, parent, block_size, hash_form, medium, lora):
    """A well-formed store decodes, array or map, to its hashes folded and its tokens kept."""
    values = dict(block_hashes=block_hashes, parent_block_hash=parent, block_size=block_size,
                  token_ids=list(range(block_size * len(block_hashes))), medium=medium, lora_name=lora)
    expected = Stored(tuple(fold_hash(h, hash_form) for h in block_hashes),
                      None if parent is None else fold_hash(parent, hash_form),
                      tuple(values["token_ids"]), block_size, "gpu", lora)
    for event in (stored_array(**values), stored_map(**values)):
        assert decode_events([event], hash_form) == ((expected,), 0)
