"""Tokenization as vLLM does it (chat template, special tokens, content parts) and extra keys."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_plane.errors import CachePlaneError
from cache_plane.hashing import DEFAULT_SEED, block_hashes, none_hash, sha256_cbor, to_external
from cache_plane.sim.build_tokenizer import BOS, SPECIAL_TOKENS
from cache_plane.tokenization import (
    HFTokenizer,
    TokenizerError,
    WordTokenizer,
    chat_request_token_ids,
    completion_request_token_ids,
    load_tokenizer,
    packaged_model_dir,
    request_block_hashes,
    vllm_extra_keys,
)

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there, world!"}]
RENDERED = ("<|begin_of_text|><|im_start|>system\nYou are terse.<|im_end|>\n"
            "<|im_start|>user\nHello there, world!<|im_end|>\n")
GENERATION_PROMPT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return load_tokenizer(packaged_model_dir())


def test_the_packaged_tokenizer_loads_offline_and_loads_once(monkeypatch, tok):
    """The fixture loads with the hub offline; a second load of the same dir is the same object."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = load_tokenizer(packaged_model_dir() + "/")
    assert load_tokenizer("tiny-chat") is tok  # a packaged model by name
    assert again is tok and tok.name == "tiny-chat" and tok.max_model_len == 32_768
    assert tok.backend.convert_ids_to_tokens(list(range(4))) == list(SPECIAL_TOKENS)


def test_chat_renders_the_chatml_template_and_encodes_without_special_tokens(tok):
    """Two messages render to the hand-written ChatML text; encoding adds no second BOS."""
    assert tok.chat_text(CHAT) == RENDERED + GENERATION_PROMPT
    ids = tok.chat_token_ids(CHAT)
    assert ids == tok.encode(RENDERED + GENERATION_PROMPT, add_special_tokens=False)
    bos = tok.backend.convert_tokens_to_ids(BOS)
    assert ids[0] == bos and ids.count(bos) == 1
    assert tok.backend.decode(ids) == RENDERED + GENERATION_PROMPT


def test_add_generation_prompt_false_leaves_the_assistant_turn_out(tok):
    """Without the generation prompt the text ends after the last message."""
    assert tok.chat_text(CHAT, add_generation_prompt=False) == RENDERED
    with_prompt, without = tok.chat_token_ids(CHAT), tok.chat_token_ids(
        CHAT, add_generation_prompt=False)
    assert with_prompt[:len(without)] == without and len(with_prompt) > len(without)


def test_a_completion_prompt_gets_bos_from_the_post_processor(tok):
    """Completions encode with special tokens (one BOS first), as vLLM's completions do."""
    ids = tok.prompt_token_ids("Hello there")
    assert ids[0] == tok.backend.convert_tokens_to_ids(BOS)
    assert ids[1:] == tok.encode("Hello there", add_special_tokens=False)


def test_text_content_parts_join_with_newlines_and_empty_ones_drop(tok):
    """A list of text parts renders as vLLM's "string" format: non-empty texts joined by \\n."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"},
                                          {"type": "text", "text": ""},
                                          {"type": "text", "text": "two"}]}]
    assert tok.chat_token_ids(parts) == tok.chat_token_ids(
        [{"role": "user", "content": "one\ntwo"}])
    assert tok.chat_text([{"role": "assistant", "content": None}], add_generation_prompt=False) \
        == "<|begin_of_text|><|im_start|>assistant\n<|im_end|>\n"


def test_tools_and_template_kwargs_reach_the_template(tok):
    """Tools render in the system turn; reserved template kwargs cannot override the call."""
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    text = tok.chat_text(CHAT, tools=tools, chat_template_kwargs={"tokenize": True})
    assert text.startswith("<|begin_of_text|><|im_start|>system\nYou are terse.\n\n# Tools\n")
    assert '"name": "lookup"' in text and text.endswith(GENERATION_PROMPT)


@pytest.mark.parametrize("messages,message", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "only text content parts are supported"),
    ([{"role": "user", "content": [{"type": "text"}]}], "string 'text'"),
    ([{"content": "no role"}], "'role'"),
    ([], "non-empty"),
    ("hello", "non-empty"),
    ([{"role": "user", "content": 7}], "'content'"),
])
def test_bad_messages_are_tokenizer_errors(tok, messages, message):
    """Messages a template cannot take raise TokenizerError, a definite CachePlaneError."""
    with pytest.raises(TokenizerError, match=message) as info:
        tok.chat_token_ids(messages)
    assert isinstance(info.value, CachePlaneError) and info.value.code == "invalid_request"
    assert info.value.definite


def test_loading_errors_name_the_problem(tmp_path):
    """A missing dir or tokenizer.json is a TokenizerError (tokenizer_unavailable)."""
    with pytest.raises(TokenizerError, match="does not exist") as info:
        load_tokenizer(str(tmp_path / "nope"))
    assert info.value.code == "tokenizer_unavailable"
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def _variant(tmp_path, name: str, template: str | None) -> HFTokenizer:
    target = tmp_path / name
    shutil.copytree(packaged_model_dir(), target)
    config = json.loads((target / "tokenizer_config.json").read_text())
    if template is None:
        del config["chat_template"]
    else:
        config["chat_template"] = template
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(str(target))


def test_no_template_and_template_failures_are_tokenizer_errors(tmp_path):
    """Chat without a template, or a template that raises, is a TokenizerError."""
    bare = _variant(tmp_path, "bare", None)
    assert bare.prompt_token_ids("still works")
    with pytest.raises(TokenizerError, match="no chat_template"):
        bare.chat_token_ids(CHAT)
    failing = _variant(tmp_path, "failing", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match="roles must alternate"):
        failing.chat_token_ids(CHAT)


_PIECES = st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS), st.text(max_size=40),
                             st.sampled_from([" ", "\n", "  ", "system\n", "<|im", "_end|>"])),
                   max_size=12)


@settings(max_examples=200, deadline=None)
@given(pieces=_PIECES)
def test_piecewise_encoding_equals_whole_text_encoding(tok, pieces):
    """Split at added tokens + cached pieces gives exactly the whole-text ids, cold and warm."""
    assert tok.piecewise
    text = "".join(pieces)
    whole = list(tok.backend.encode(text, add_special_tokens=False))
    assert tok.encode(text, add_special_tokens=False) == whole
    assert tok.encode(text, add_special_tokens=False) == whole  # now from the piece cache


def test_a_shared_prefix_piece_is_encoded_once(tok):
    """The second request with the same system prompt finds its piece in the cache."""
    system = "You answer questions about caches. " * 50
    tok.chat_token_ids([{"role": "system", "content": system},
                        {"role": "user", "content": "first?"}])
    hits = tok.piece_hits
    tok.chat_token_ids([{"role": "system", "content": system},
                        {"role": "user", "content": "second?"}])
    assert tok.piece_hits > hits


def test_an_added_token_that_strips_whitespace_turns_piecewise_off(tmp_path):
    """lstrip/rstrip tokens eat neighbouring spaces: such a tokenizer encodes whole texts."""
    target = tmp_path / "lstrip"
    shutil.copytree(packaged_model_dir(), target)
    spec = json.loads((target / "tokenizer.json").read_text())
    for token in spec["added_tokens"]:
        token["lstrip"] = True
    (target / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((target / "tokenizer_config.json").read_text())
    for token in (config.get("added_tokens_decoder") or {}).values():
        token["lstrip"] = True
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    stripping = load_tokenizer(str(target))
    assert not stripping.piecewise
    text = "a <|im_start|> b"
    assert stripping.encode(text, add_special_tokens=False) == \
        list(stripping.backend.encode(text, add_special_tokens=False))


def test_the_word_stand_in_renders_chat_as_the_simulator_always_did():
    """WordTokenizer: "<role> content" per message, one hashed id per word."""
    word = WordTokenizer()
    assert word.chat_text([{"role": "system", "content": "be brief"}, {"content": "hi"}]) == \
        "<system> be brief <user> hi"
    assert word.chat_token_ids([{"role": "user", "content": "a b"}]) == word.tokenize(
        "<user> a b")
    assert word.prompt_token_ids("a b c") == word.tokenize("a b c") and len(word.tokenize(
        "a  b\nc")) == 3


def test_request_bodies_follow_vllm_defaults(tok):
    """Body helpers: chat without special tokens by default, completions with; flags honoured."""
    body = {"messages": CHAT}
    assert chat_request_token_ids(tok, body) == tok.chat_token_ids(CHAT)
    assert chat_request_token_ids(tok, {**body, "add_special_tokens": True}) == tok.encode(
        tok.chat_text(CHAT), add_special_tokens=True)
    assert chat_request_token_ids(tok, {**body, "continue_final_message": True}) == \
        tok.chat_token_ids(CHAT, add_generation_prompt=False)[:-2]  # no "<|im_end|>", "\n"
    with pytest.raises(TokenizerError, match="Cannot set both"):
        chat_request_token_ids(tok, {**body, "continue_final_message": True,
                                     "add_generation_prompt": True})
    assert completion_request_token_ids(tok, {"prompt": "hi"}) == tok.prompt_token_ids("hi")
    assert completion_request_token_ids(tok, {"prompt": "hi", "add_special_tokens": False}) \
        == tok.encode("hi", add_special_tokens=False)
    assert completion_request_token_ids(tok, {"prompt": [5, 6, 7]}) == [5, 6, 7]
    with pytest.raises(TokenizerError, match="must be a string"):
        completion_request_token_ids(tok, {"prompt": ["a"]}, lists=False)


def test_extra_keys_follow_vllm_lora_first_then_salt_on_block_zero():
    """LoRA name on every block, the salt after it on block 0 only; nothing -> None."""
    assert vllm_extra_keys(3, None, None) is None
    assert vllm_extra_keys(3, None, "") is None
    assert vllm_extra_keys(0, "ad", "salt") is None
    assert vllm_extra_keys(2, "ad", None) == [("ad",), ("ad",)]
    assert vllm_extra_keys(2, None, "salt") == [("salt",), None]
    assert vllm_extra_keys(2, "ad", "salt") == [("ad", "salt"), ("ad",)]


def test_request_block_hashes_chain_the_extra_keys_like_vllm():
    """Block 0's hash is sha256_cbor((NONE_HASH, tokens, extra)); extras change the chain."""
    ids = list(range(10))
    plain = request_block_hashes(ids, 4, DEFAULT_SEED)
    assert plain == block_hashes(ids, 4, DEFAULT_SEED) and len(plain) == 2
    salted = request_block_hashes(ids, 4, DEFAULT_SEED, cache_salt="s")
    assert salted[0] == to_external(sha256_cbor((none_hash(DEFAULT_SEED), (0, 1, 2, 3),
                                                 ("s",))))
    lora = request_block_hashes(ids, 4, DEFAULT_SEED, lora_name="ad")
    assert len({tuple(plain), tuple(salted), tuple(lora)}) == 3
    assert all(a != b for a, b in zip(plain, salted, strict=True))  # the chain carries the salt
