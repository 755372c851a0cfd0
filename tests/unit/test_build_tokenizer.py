"""The tiny-chat tokenizer builder: deterministic training, and a fixture that matches it."""

from __future__ import annotations

import json
import os

from cache_plane.sim.build_tokenizer import (
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    build,
    corpus_files,
    special_tokens_map,
    tokenizer_config,
)
from cache_plane.tokenization import packaged_model_dir

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _read(directory, name: str) -> bytes:
    with open(os.path.join(directory, name), "rb") as f:
        return f.read()


def test_rebuilding_from_the_same_corpus_gives_byte_identical_files(tmp_path):
    """Training is deterministic: two builds from one corpus write the same bytes."""
    texts = [text for _, text in corpus_files()]
    assert len(texts) > 20 and any(path.startswith("veristore_py/") for path, _ in corpus_files())
    build(str(tmp_path / "a"), texts)
    build(str(tmp_path / "b"), texts)
    for name in FILES:
        assert _read(tmp_path / "a", name) == _read(tmp_path / "b", name), name
    vocab = json.loads(_read(tmp_path / "a", "tokenizer.json"))["model"]["vocab"]
    assert len(vocab) == VOCAB_SIZE


def test_the_packaged_fixture_is_what_the_builder_writes():
    """Config and special tokens equal the builder's; vocab size and special ids hold; small."""
    fixture = packaged_model_dir()
    assert json.loads(_read(fixture, "tokenizer_config.json")) == tokenizer_config()
    assert json.loads(_read(fixture, "special_tokens_map.json")) == special_tokens_map()
    model = json.loads(_read(fixture, "tokenizer.json"))
    assert len(model["model"]["vocab"]) == VOCAB_SIZE
    assert [t["content"] for t in model["added_tokens"]] == list(SPECIAL_TOKENS)
    assert [t["id"] for t in model["added_tokens"]] == list(range(len(SPECIAL_TOKENS)))
    assert sum(os.path.getsize(os.path.join(fixture, n)) for n in FILES) < 400_000
