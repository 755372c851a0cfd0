"""Block hashing: vLLM sha256_cbor chaining, 64-bit external form, text fallback."""

from __future__ import annotations

import hashlib

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_plane.hashing import (
    DEFAULT_SEED,
    DigestMemo,
    block_digests,
    block_hashes,
    none_hash,
    text_block_hashes,
    to_external,
)


def test_first_block_matches_the_vllm_formula_spelled_out():
    """Block 0 = sha256(cbor((sha256(cbor(seed)), tokens, None))), canonical CBOR."""
    parent = hashlib.sha256(cbor2.dumps(DEFAULT_SEED, canonical=True)).digest()
    expected = hashlib.sha256(cbor2.dumps((parent, tuple(range(16)), None), canonical=True)).digest()
    assert block_digests(list(range(16)), 16) == [expected]
    assert none_hash() == parent


def test_only_full_blocks_are_hashed():
    """A 47-token prompt with 16-token blocks has 2 hashes."""
    assert len(block_hashes(list(range(47)), 16)) == 2
    assert block_hashes(list(range(15)), 16) == []


def test_external_form_is_low_64_bits_big_endian():
    """The KV-event integer is the digest's big-endian value masked to 64 bits."""
    digest = bytes(range(32))
    assert to_external(digest) == int.from_bytes(digest[-8:], "big")


def test_seed_and_extra_keys_change_every_hash():
    """Another seed, or extra keys on block 0, changes the whole chain."""
    tokens = list(range(64))
    base = block_hashes(tokens, 16)
    assert set(base).isdisjoint(block_hashes(tokens, 16, seed="42"))
    salted = block_hashes(tokens, 16, extra_keys=[("salt",), None, None, None])
    assert set(base).isdisjoint(salted)


@given(st.lists(st.integers(0, 50_000), max_size=80), st.lists(st.integers(0, 50_000), max_size=80))
def test_chained_hashes_agree_exactly_on_the_shared_full_block_prefix(a, b):
    """Hashes at position i are equal iff the prompts agree on every token up to block i's end."""
    ha, hb = block_hashes(a, 8), block_hashes(b, 8)
    for i in range(min(len(ha), len(hb))):
        same_prefix = a[:(i + 1) * 8] == b[:(i + 1) * 8]
        assert (ha[i] == hb[i]) == same_prefix


def test_text_fallback_is_chained_and_distinct_from_token_hashes():
    """Text hashes share a prefix for a shared text prefix and never equal token hashes."""
    a = text_block_hashes("x" * 200 + "a" * 200, 16)
    b = text_block_hashes("x" * 200 + "b" * 200, 16)
    assert a[:3] == b[:3] and a[-1] != b[-1]


@settings(max_examples=100, deadline=None)
@given(prompts=st.lists(st.lists(st.integers(0, 50), max_size=40), min_size=1, max_size=6),
       extra=st.sampled_from([None, [("lora",)] * 10, [("a", "salt")] + [None] * 9]))
def test_the_digest_memo_changes_no_hash(prompts, extra):
    """Hashes with a (small, often full) memo equal the plain chain, prompt after prompt."""
    memo = DigestMemo(capacity=8)
    for tokens in prompts:
        assert block_hashes(tokens, 4, extra_keys=extra, memo=memo) == \
            block_hashes(tokens, 4, extra_keys=extra)
    assert len(memo.digests) <= 8


def test_the_digest_memo_hashes_a_shared_prefix_once_and_skips_unhashable_keys():
    memo = DigestMemo()
    shared = list(range(64))
    block_hashes(shared + [1, 2, 3, 4], 4, memo=memo)
    misses = memo.misses
    block_hashes(shared + [5, 6, 7, 8], 4, memo=memo)
    assert memo.misses == misses + 1 and memo.hits >= 16
    unhashable = [[["list"]]] * 17
    assert block_hashes(shared, 4, extra_keys=unhashable, memo=memo) == \
        block_hashes(shared, 4, extra_keys=unhashable)
