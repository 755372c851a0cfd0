"""Prompt tokenization as vLLM does it, and the per-request block hashes that follow from it.

A router finds cached prefixes only if it derives the engine's token ids and block hashes
exactly, so this module follows vLLM's OpenAI server:

- **Chat** (`/v1/chat/completions`, `/tokenize` with ``messages``): the messages are rendered to
  text with the tokenizer's chat template (``apply_chat_template(..., tokenize=False)``), then
  encoded with ``add_special_tokens=False``: the template already wrote BOS and friends
  (``ChatCompletionRequest.add_special_tokens`` and ``TokenizeChatRequest.add_special_tokens``
  default to False in vLLM's protocol, e.g. vllm/entrypoints/serve/tokenize/protocol.py). A message's ``content`` given as a list of OpenAI content parts is
  joined the way vLLM does for "string"-format templates: the text parts, empty ones dropped,
  joined with ``"\\n"`` (``_parse_chat_message_content_parts`` in
  vllm/entrypoints/chat_utils.py); None content renders as ``""``. Other part types (images,
  audio) are refused: a text-only router cannot reproduce their placeholder tokens.
- **Completions** (`/v1/completions`, `/tokenize` with ``prompt``): the prompt is encoded with
  ``add_special_tokens=True`` (``TokenizeCompletionRequest`` / ``CompletionRequest`` default).
- **Block hashes**: a LoRA request's blocks carry the adapter's name in their extra keys, and
  a request with a ``cache_salt`` adds the salt to its *first* block's keys only, in the
  order ``lora_name + mm_keys + cache_salt + prompt_embeds`` (``generate_block_hash_extra_keys`` in
  vllm/v1/core/kv_cache_utils.py). `vllm_extra_keys` builds them for text-only requests.

`HFTokenizer` wraps a local Hugging Face tokenizer directory (never downloads:
``local_files_only=True``); `transformers` is imported only when one is loaded. `WordTokenizer`
is the simulator's stand-in (one token per whitespace-separated word) for setups without a
tokenizer. `vllm_extra_keys` and `request_block_hashes` are pure.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

from .errors import CachePlaneError
from .hashing import DEFAULT_SEED, DigestMemo, block_digests, to_external

WORD_VOCAB = 32_000
# Keys a request's chat_template_kwargs may not set: apply_chat_template's own arguments that
# would change what it returns or what it renders (vLLM drops `chat_template` and `tokenize`;
# `add_generation_prompt` and `tools` come from the request's own fields).
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "add_generation_prompt", "chat_template", "conversation", "messages", "return_dict",
    "return_tensors", "tokenize", "tools", "padding", "truncation", "max_length",
})


class TokenizerError(CachePlaneError):
    """A tokenizer could not be loaded, or a request could not be tokenized (definite).

    ``code`` is ``invalid_request`` (the request's fault: bad messages, a content part that is
    not text, a template that fails on this input) or ``tokenizer_unavailable`` (the model
    directory is missing or unreadable: a configuration fault).
    """

    def __init__(self, detail: str, code: str = "invalid_request") -> None:
        super().__init__(code, detail)


class TokenizeLater(Exception):
    """Raised inside `HFTokenizer.quick()` when encoding would take long: run it in a thread."""


class Tokenizer(Protocol):
    """What the gateway and the simulated node need from a tokenizer."""

    @property
    def name(self) -> str: ...

    def chat_token_ids(self, messages: list[dict[str, Any]], *,
                       add_generation_prompt: bool = True,
                       chat_template_kwargs: dict[str, Any] | None = None,
                       tools: list[Any] | None = None) -> list[int]:
        """Return the token ids vLLM would compute for a chat request's messages."""
        ...

    def prompt_token_ids(self, prompt: str) -> list[int]:
        """Return the token ids vLLM would compute for a completion request's prompt."""
        ...


# -- messages ---------------------------------------------------------------------------------

def content_text(content: Any) -> str:
    """Return a message's content as one string, as vLLM gives it to a "string" template.

    A string is returned as is, None as ``""``, and a list of content parts as its text parts
    (empty ones dropped) joined with ``"\\n"``. Raise `TokenizerError` for any other part.
    """
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise TokenizerError("message 'content' must be a string, null or a list of parts")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            raise TokenizerError("only text content parts are supported")
        text = part.get("text")
        if not isinstance(text, str):
            raise TokenizerError("a text content part needs a string 'text'")
        if text:
            texts.append(text)
    return "\n".join(texts)


def normalize_messages(messages: Any, *, default_role: str | None = None
                       ) -> list[dict[str, Any]]:
    """Return copies of `messages` with each ``content`` flattened to a string.

    Other keys (``name``, ``tool_calls``, ``tool_call_id``) are kept for the template. A
    message without a role gets `default_role`, or is refused when that is None.
    """
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("'messages' must be a non-empty list of {role, content}")
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TokenizerError("each message must be an object with 'role' and 'content'")
        role = message.get("role", default_role)
        if not isinstance(role, str) or not role:
            raise TokenizerError("each message needs a string 'role'")
        out.append({**message, "role": role, "content": content_text(message.get("content"))})
    return out


# -- the stand-in -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class WordTokenizer:
    """The simulator's stand-in: one token per whitespace-separated word, id a hash of it.

    Chat renders as ``"<role> content"`` per message, joined with spaces (no generation
    prompt, no template): the simulator's behaviour before real tokenizers existed.
    """

    name: str = "word"

    @staticmethod
    def tokenize(text: str) -> list[int]:
        """Return one id per word: a stable hash of the word, below `WORD_VOCAB`."""
        return [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "big")
                % WORD_VOCAB for w in text.split()]

    def chat_text(self, messages: list[dict[str, Any]]) -> str:
        """Render `messages` as the stand-in's chat text."""
        return " ".join(f"<{m['role']}> {m['content']}"
                        for m in normalize_messages(messages, default_role="user"))

    def chat_token_ids(self, messages: list[dict[str, Any]], *,
                       add_generation_prompt: bool = True,
                       chat_template_kwargs: dict[str, Any] | None = None,
                       tools: list[Any] | None = None) -> list[int]:
        """Tokenize the rendered chat (the keyword arguments are ignored)."""
        return self.tokenize(self.chat_text(messages))

    def prompt_token_ids(self, prompt: str) -> list[int]:
        """Tokenize `prompt` (no special tokens: the stand-in has none)."""
        return self.tokenize(prompt)


# -- Hugging Face ----------------------------------------------------------------------------

class HFTokenizer:
    """A local Hugging Face tokenizer directory, used the way vLLM's OpenAI server uses it.

    Encoding without special tokens (every chat request) is **piecewise**: the text is split at
    the tokenizer's added tokens (``<|im_start|>`` and friends), each piece between them is
    encoded on its own and remembered (LRU, `PIECE_CACHE_ENTRIES` pieces and
    `PIECE_CACHE_CHARS` characters), and the ids are concatenated. Hugging Face's tokenizers
    do the same split first and encode the pieces independently, so the result is the
    whole-text encoding, while a shared system prompt is encoded once instead of per request.
    It is used only when every added token matches verbatim (not normalized, no
    lstrip/rstrip/single_word), and only after a check at load time that it equals the
    whole-text encoding on probe texts; otherwise (`piecewise` False) every text is encoded
    whole.

    Inside ``with tokenizer.quick():`` an encoding that would take long (a piece longer than
    `QUICK_PIECE_CHARS` not in the cache, a whole-text encoding, or the lock held by another
    thread) raises `TokenizeLater` instead, so an event loop can encode cached prompts inline
    and send the rest to a worker thread.

    Encoding holds a lock: a fast tokenizer shared between threads can fail with "Already
    borrowed" otherwise.
    """

    PIECE_CACHE_ENTRIES = 4096
    PIECE_CACHE_CHARS = 16 << 20
    QUICK_PIECE_CHARS = 512

    def __init__(self, path: str, backend: Any) -> None:
        self.path = path
        self.name = os.path.basename(os.path.normpath(path))
        self.backend = backend
        length = getattr(backend, "model_max_length", None)
        # transformers puts a huge sentinel (1e30) there when the config names no length.
        self.max_model_len: int | None = int(length) if isinstance(length, int) and \
            0 < length < 1 << 40 else None
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pieces: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._piece_chars = 0
        self.piece_hits = 0
        self.piece_misses = 0
        self._added: dict[str, int] = {}
        self._split: re.Pattern[str] | None = self._added_token_splitter()
        self.piecewise = self._split is not None and self._piecewise_exact()
        if not self.piecewise:
            self._split = None

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"

    def _added_token_splitter(self) -> re.Pattern[str] | None:
        """A regex matching the added tokens leftmost-longest, or None if one is not verbatim."""
        rust = getattr(self.backend, "backend_tokenizer", None)
        decoder = getattr(self.backend, "added_tokens_decoder", None)
        if rust is None or not isinstance(decoder, dict) or not decoder:
            return None
        for token_id, token in decoder.items():
            content = getattr(token, "content", None)
            if not isinstance(content, str) or not content or \
                    getattr(token, "lstrip", True) or getattr(token, "rstrip", True) or \
                    getattr(token, "single_word", True) or \
                    (getattr(token, "normalized", True) and rust.normalizer is not None):
                return None
            self._added[content] = int(token_id)
        alternatives = sorted(self._added, key=len, reverse=True)  # longest first
        return re.compile("|".join(re.escape(a) for a in alternatives))

    def _piecewise_exact(self) -> bool:
        """Whether piecewise encoding equals whole-text encoding on probe texts."""
        added = list(self._added)
        probes = ["", " ", "\n", "Hello world", "  two  spaces\n\nand lines ",
                  "".join(added), f"{added[0]}x{added[-1]} y {added[0]}\n",
                  f"{added[0]} leading and trailing {added[-1]} ",
                  f"{added[-1]}\u00e9t\u00e9 \u4e2d\u6587 emoji \U0001f600 tab\t{added[0]}"]
        try:
            template = getattr(self.backend, "chat_template", None)
            if template:
                probes.append(self.chat_text([
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": " Hi there!\n"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "12 + 30 = ?"}]))
            for text in probes:
                whole = list(self.backend.encode(text, add_special_tokens=False))
                if self._encode_pieces(text) != whole:
                    return False
        except Exception:  # a tokenizer that cannot run the probes: encode whole texts
            return False
        finally:
            self._pieces.clear()
            self._piece_chars = 0
            self.piece_hits = self.piece_misses = 0
        return True

    def _encode_pieces(self, text: str) -> list[int]:
        """Encode `text` piece by piece (caller holds the lock; `_split` is set)."""
        assert self._split is not None
        rust = self.backend.backend_tokenizer
        ids: list[int] = []
        at = 0
        for match in self._split.finditer(text):
            if match.start() > at:
                ids.extend(self._piece(rust, text[at:match.start()]))
            ids.append(self._added[match.group()])
            at = match.end()
        if at < len(text):
            ids.extend(self._piece(rust, text[at:]))
        return ids

    def _piece(self, rust: Any, piece: str) -> tuple[int, ...]:
        found = self._pieces.get(piece)
        if found is not None:
            self._pieces.move_to_end(piece)
            self.piece_hits += 1
            return found
        if len(piece) > self.QUICK_PIECE_CHARS and getattr(self._local, "quick", False):
            raise TokenizeLater
        self.piece_misses += 1
        found = tuple(rust.encode(piece, add_special_tokens=False).ids)
        if len(piece) <= self.PIECE_CACHE_CHARS // 4:
            self._pieces[piece] = found
            self._piece_chars += len(piece)
            while len(self._pieces) > self.PIECE_CACHE_ENTRIES or \
                    self._piece_chars > self.PIECE_CACHE_CHARS:
                dropped, _ = self._pieces.popitem(last=False)
                self._piece_chars -= len(dropped)
        return found

    def chat_text(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                  chat_template_kwargs: dict[str, Any] | None = None,
                  tools: list[Any] | None = None) -> str:
        """Render `messages` with the chat template (vLLM: ``tokenize=False``).

        `chat_template_kwargs` reach the template (e.g. ``enable_thinking``), except the keys
        apply_chat_template owns; `add_generation_prompt` wins over the same key in them.
        """
        if not getattr(self.backend, "chat_template", None):
            raise TokenizerError(f"tokenizer {self.name!r} has no chat_template",
                                 code="tokenizer_unavailable")
        conversation = normalize_messages(messages)
        if tools is not None and not isinstance(tools, list):
            raise TokenizerError("'tools' must be a list")
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise TokenizerError("'chat_template_kwargs' must be an object")
        kwargs = {k: v for k, v in (chat_template_kwargs or {}).items()
                  if k not in _RESERVED_TEMPLATE_KWARGS}
        try:
            text = self.backend.apply_chat_template(
                conversation, tools=tools, tokenize=False,
                add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as exc:  # jinja2 errors, TypeError/ValueError from bad input
            raise TokenizerError(f"chat template failed to render: {exc}") from exc
        if not isinstance(text, str):
            raise TokenizerError("chat template did not render to a string")
        return text

    def chat_token_ids(self, messages: list[dict[str, Any]], *,
                       add_generation_prompt: bool = True,
                       chat_template_kwargs: dict[str, Any] | None = None,
                       tools: list[Any] | None = None) -> list[int]:
        """Render the chat and encode it without adding special tokens (vLLM's default)."""
        text = self.chat_text(messages, add_generation_prompt=add_generation_prompt,
                              chat_template_kwargs=chat_template_kwargs, tools=tools)
        return self.encode(text, add_special_tokens=False)

    def prompt_token_ids(self, prompt: str) -> list[int]:
        """Encode a completion prompt, adding special tokens (BOS) as vLLM does."""
        if not isinstance(prompt, str):
            raise TokenizerError("'prompt' must be a string")
        return self.encode(prompt, add_special_tokens=True)

    def token_strs(self, token_ids: Sequence[int]) -> list[str]:
        """Return each id's token string (as vLLM's ``/tokenize`` ``token_strs``)."""
        with self._lock:
            return [str(t) for t in self.backend.convert_ids_to_tokens(list(token_ids))]

    @contextlib.contextmanager
    def quick(self) -> Iterator[None]:
        """Within: raise `TokenizeLater` rather than encode slowly (see the class)."""
        self._local.quick = True
        try:
            yield
        finally:
            self._local.quick = False

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Encode `text`; with `add_special_tokens` the post-processor adds BOS and such."""
        piecewise = self._split is not None and not add_special_tokens
        if getattr(self._local, "quick", False):
            if not piecewise or not self._lock.acquire(blocking=False):
                raise TokenizeLater
            try:
                return self._encode_pieces(text)
            finally:
                self._lock.release()
        with self._lock:
            if piecewise:
                return self._encode_pieces(text)
            return list(self.backend.encode(text, add_special_tokens=add_special_tokens))


def load_tokenizer(path: str) -> HFTokenizer:
    """Load the tokenizer in the local directory `path` (cached: a second load is free).

    `path` may also be the bare name of a packaged model (``tiny-chat``) when no such
    directory exists. Raise `TokenizerError` (``tokenizer_unavailable``) when the directory or
    its ``tokenizer.json`` is missing or transformers cannot load it. Nothing is downloaded.
    """
    if not os.path.exists(path) and path and os.sep not in path and "/" not in path and \
            os.path.isdir(packaged_model_dir(path)):
        path = packaged_model_dir(path)
    return _load(os.path.realpath(path))


@functools.lru_cache(maxsize=16)
def _load(path: str) -> HFTokenizer:
    if not os.path.isdir(path):
        raise TokenizerError(f"tokenizer directory {path!r} does not exist",
                             code="tokenizer_unavailable")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise TokenizerError(f"tokenizer directory {path!r} has no tokenizer.json",
                             code="tokenizer_unavailable")
    # Offline by rule (never a download), and quiet: without torch, transformers announces at
    # import that models are unavailable, which is expected here (tokenizers only).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise TokenizerError("loading a tokenizer needs the 'transformers' package",
                             code="tokenizer_unavailable") from exc
    try:
        backend = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # OSError, ValueError, JSON errors: all "cannot load it"
        raise TokenizerError(f"cannot load the tokenizer in {path!r}: {exc}",
                             code="tokenizer_unavailable") from exc
    return HFTokenizer(path, backend)


def packaged_model_dir(name: str = "tiny-chat") -> str:
    """Return the directory of a tokenizer shipped in the package (`cache_plane/models`)."""
    return str(resources.files("cache_plane") / "models" / name)


# -- OpenAI request bodies ---------------------------------------------------------------------

def request_flag(body: dict[str, Any], key: str, default: bool) -> bool:
    """Return the boolean field `key` of a request body; raise `TokenizerError` if not a bool."""
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise TokenizerError(f"'{key}' must be a boolean")
    return value


def chat_request_token_ids(tokenizer: Tokenizer, body: dict[str, Any]) -> list[int]:
    """Return the token ids vLLM runs for a chat body (`/v1/chat/completions`, `/tokenize`).

    Honours vLLM's request fields: ``messages``, ``tools``, ``chat_template_kwargs``,
    ``add_generation_prompt`` (default true), ``continue_final_message`` (default false; it
    turns the generation prompt off) and ``add_special_tokens`` (default false). Raise
    `TokenizerError` for a body vLLM would refuse with a 400.
    """
    add_generation_prompt = request_flag(body, "add_generation_prompt", True)
    continue_final = request_flag(body, "continue_final_message", False)
    add_special = request_flag(body, "add_special_tokens", False)
    if continue_final and body.get("add_generation_prompt") is True:
        raise TokenizerError("Cannot set both `continue_final_message` and "
                             "`add_generation_prompt` to True.")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TokenizerError("'chat_template_kwargs' must be an object")
    if continue_final:
        add_generation_prompt = False
        kwargs = {**(kwargs or {}), "continue_final_message": True}
    tools = body.get("tools")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TokenizerError("'messages' must be a non-empty list of {role, content}")
    if add_special and isinstance(tokenizer, HFTokenizer):
        text = tokenizer.chat_text(messages, add_generation_prompt=add_generation_prompt,
                                   chat_template_kwargs=kwargs, tools=tools)
        return tokenizer.encode(text, add_special_tokens=True)
    return tokenizer.chat_token_ids(messages, add_generation_prompt=add_generation_prompt,
                                    chat_template_kwargs=kwargs, tools=tools)


def completion_request_token_ids(tokenizer: Tokenizer, body: dict[str, Any], *,
                                 lists: bool = True) -> list[int]:
    """Return the token ids of a completion body's ``prompt`` (`/v1/completions`).

    ``add_special_tokens`` defaults to true. With `lists`, a list of token ids is taken as is
    and a list of strings is joined with spaces (one prompt per request, where OpenAI would
    run a batch); without, the prompt must be a string (vLLM's ``/tokenize``). Raise
    `TokenizerError` for a body vLLM would refuse with a 400.
    """
    prompt = body.get("prompt")
    add_special = request_flag(body, "add_special_tokens", True)
    if lists and isinstance(prompt, list):
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        if all(isinstance(p, str) for p in prompt):
            prompt = " ".join(prompt)
    if not isinstance(prompt, str):
        raise TokenizerError("'prompt' must be a string or a list of strings" if lists
                             else "'prompt' must be a string")
    if not add_special and isinstance(tokenizer, HFTokenizer):
        return tokenizer.encode(prompt, add_special_tokens=False)
    return tokenizer.prompt_token_ids(prompt)


# -- block hashes (pure) ----------------------------------------------------------------------

def vllm_extra_keys(n_blocks: int, lora_name: str | None,
                    cache_salt: str | None) -> list[Any] | None:
    """Return the per-block extra keys vLLM hashes for a text-only request, or None if none.

    Block ``i`` gets ``(lora_name,)`` for a LoRA request, plus ``cache_salt`` on block 0 when
    the salt is non-empty, in that order; a block with neither gets None. Mirrors
    ``generate_block_hash_extra_keys`` (vllm/v1/core/kv_cache_utils.py).
    """
    keys: list[Any] = []
    for i in range(n_blocks):
        block: list[str] = []
        if lora_name is not None:
            block.append(lora_name)
        if i == 0 and cache_salt:
            block.append(cache_salt)
        keys.append(tuple(block) if block else None)
    return keys if any(k is not None for k in keys) else None


def request_block_hashes(token_ids: Sequence[int], block_size: int, seed: str = DEFAULT_SEED,
                         lora_name: str | None = None,
                         cache_salt: str | None = None,
                         memo: DigestMemo | None = None) -> list[int]:
    """Return the 64-bit hashes of a request's full blocks, extra keys included (pure)."""
    return list(map(to_external, request_block_digests(token_ids, block_size, seed, lora_name,
                                                       cache_salt, memo)))


def request_block_digests(token_ids: Sequence[int], block_size: int, seed: str = DEFAULT_SEED,
                          lora_name: str | None = None,
                          cache_salt: str | None = None,
                          memo: DigestMemo | None = None) -> list[bytes]:
    """Return the 32-byte digests behind `request_block_hashes` (same blocks, same order; pure)."""
    extra = vllm_extra_keys(len(token_ids) // block_size if block_size > 0 else 0,
                            lora_name, cache_salt)
    return block_digests(token_ids, block_size, seed, extra, memo)
