"""Chained KV-cache block hashes, compatible with vLLM's ``sha256_cbor`` prefix-caching scheme.

vLLM hashes only *full* blocks. Block ``i``'s digest is::

    sha256(cbor2.dumps((parent_digest, tuple(block_token_ids), extra_keys), canonical=True))

with ``parent_digest`` of block 0 being ``NONE_HASH = sha256(cbor2.dumps(seed, canonical=True))``.
vLLM takes the seed from ``PYTHONHASHSEED``; since v0.33 an unset variable means the fixed
string ``"vllm-none-hash"`` for the SHA-256 algorithms (older versions drew random bytes, which
no router can reproduce). Configure each model with the engine's seed.

In KV events, and everywhere in this package's index, a block is identified by the *external*
hash: the digest's big-endian integer masked to 64 bits (vLLM's
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` form). `extra_keys` are passed through verbatim, one
entry per block (None when empty), exactly as the engine reports them in ``BlockStored``.

`DigestMemo` remembers block digests by (parent digest, tokens, extra keys), so a router that
hashes many prompts sharing a prefix computes each shared block once; the result is the same.

`text_block_hashes` is a fallback for callers without a tokenizer: it chains SHA-256 over
fixed-size character chunks under its own domain tag, so it can never collide with token
hashes; it only finds reuse among requests that also used the text fallback.

Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import cbor2

DEFAULT_SEED = "vllm-none-hash"
MASK64 = (1 << 64) - 1
TEXT_CHARS_PER_TOKEN = 4


def sha256_cbor(obj: Any) -> bytes:
    """vLLM's ``sha256_cbor``: SHA-256 of the canonical CBOR encoding of `obj`."""
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def none_hash(seed: str = DEFAULT_SEED) -> bytes:
    """The parent digest of block 0 for `seed` (vLLM: ``hash_fn(PYTHONHASHSEED)``)."""
    return sha256_cbor(seed)


def to_external(digest: bytes) -> int:
    """The 64-bit integer form of a digest, as vLLM publishes it in KV events."""
    return int.from_bytes(digest, "big") & MASK64


class DigestMemo:
    """Block digests already computed, keyed by (parent digest, block tokens, extra keys).

    Bounded to `capacity` entries; when full, the oldest half (by insertion) is dropped. Not
    thread-safe: one per thread or event loop. Extra keys must be hashable (tuples or None,
    as `vllm_extra_keys` makes them); a block with other extra keys is not remembered.
    """

    def __init__(self, capacity: int = 32768) -> None:
        self.capacity = capacity
        self.digests: dict[tuple[bytes, tuple[int, ...], Any], bytes] = {}
        self.hits = 0
        self.misses = 0

    def digest(self, parent: bytes, block: tuple[int, ...], extra: Any) -> bytes:
        key = (parent, block, extra)
        try:
            found = self.digests.get(key)
        except TypeError:  # unhashable extra keys
            return sha256_cbor(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        found = sha256_cbor(key)
        if len(self.digests) >= self.capacity:
            for old in list(self.digests)[:max(1, self.capacity // 2)]:
                del self.digests[old]
        self.digests[key] = found
        return found


def block_digests(token_ids: Sequence[int], block_size: int, seed: str = DEFAULT_SEED,
                  extra_keys: Sequence[Any] | None = None,
                  memo: DigestMemo | None = None) -> list[bytes]:
    """Return the chained digests of every full block of `token_ids` (`memo`: see DigestMemo)."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    parent = none_hash(seed)
    digests = []
    for i in range(len(token_ids) // block_size):
        block = tuple(token_ids[i * block_size:(i + 1) * block_size])
        extra = extra_keys[i] if extra_keys is not None and i < len(extra_keys) else None
        parent = sha256_cbor((parent, block, extra)) if memo is None \
            else memo.digest(parent, block, extra)
        digests.append(parent)
    return digests


def block_hashes(token_ids: Sequence[int], block_size: int, seed: str = DEFAULT_SEED,
                 extra_keys: Sequence[Any] | None = None,
                 memo: DigestMemo | None = None) -> list[int]:
    """Return the 64-bit external hashes of every full block of `token_ids`."""
    return [to_external(d) for d in block_digests(token_ids, block_size, seed, extra_keys,
                                                  memo)]


def text_block_hashes(text: str, block_size: int, seed: str = DEFAULT_SEED) -> list[int]:
    """Chained hashes over chunks of ``block_size * 4`` characters (approximate tokens)."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    chunk = block_size * TEXT_CHARS_PER_TOKEN
    parent = sha256_cbor(("text", seed))
    hashes = []
    for i in range(len(text) // chunk):
        parent = sha256_cbor(("text", parent, text[i * chunk:(i + 1) * chunk]))
        hashes.append(to_external(parent))
    return hashes
