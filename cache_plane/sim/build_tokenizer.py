"""Build the tiny chat tokenizer the simulator and the gateway tests use (`models/tiny-chat`).

A byte-level BPE (GPT-2 style byte alphabet, so any text encodes) with a 4096-token vocabulary,
trained with the `tokenizers` library on the Python sources of the installed `cache_plane` and
`veristore_py` packages (code, comments and docstrings: English enough to give prompts realistic
token counts). It has Llama-3 / Qwen style special tokens, a post-processor that puts
``<|begin_of_text|>`` before a plain prompt (as Llama 3 does), and a ChatML chat template (the
shape of Qwen2.5's, without its default system prompt) that starts with ``bos_token``. So a chat
prompt must be encoded with ``add_special_tokens=False`` to get one BOS, not two: exactly the
case vLLM handles by rendering chat to text and encoding it without special tokens.

Output, loadable with ``AutoTokenizer.from_pretrained(dir, local_files_only=True)``:
``tokenizer.json``, ``tokenizer_config.json`` (with ``chat_template``) and
``special_tokens_map.json``. JSON is written with sorted keys and a trailing newline.

Training is deterministic: the same corpus gives byte-identical files (a test checks it). The
checked-in fixture is a snapshot of one build; rebuilding after the sources changed gives a
different vocabulary, so no test may depend on particular token ids.

Run: ``python -m cache_plane.sim.build_tokenizer [--out DIR]`` (default: the packaged fixture).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 32_768
BOS = "<|begin_of_text|>"
EOS = "<|im_end|>"          # what ends an assistant turn (Qwen's eos_token for chat)
PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = (PAD, BOS, IM_START, EOS)  # ids 0..3, in this order
CORPUS_PACKAGES = ("cache_plane", "veristore_py")

# ChatML, shaped like Qwen2.5's template: an optional system turn (with a tools block when tools
# are given), one `<|im_start|>role\n...<|im_end|>\n` per message, assistant tool calls as
# <tool_call> JSON, and `<|im_start|>assistant\n` when a generation prompt is asked for.
# Content must already be a string (or None): callers join text parts first, as vLLM does for
# "string"-format templates.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- (messages[0]['content'] or '') + '\\n\\n' }}"
    "{%- endif %}"
    "{{- '# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + (messages[0]['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call.get('function') else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": '"
    " + (fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson))"
    " + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def corpus_files(packages: Sequence[str] = CORPUS_PACKAGES) -> list[tuple[str, str]]:
    """Return ``(package-relative path, text)`` of every .py file of `packages`, sorted.

    Files are read through `importlib.resources`, so an installed package works as well as a
    checkout.
    """
    found: list[tuple[str, str]] = []
    for package in packages:
        root = resources.files(package)
        for rel, item in _walk(root, package):
            if rel.endswith(".py"):
                found.append((rel, item.read_text(encoding="utf-8")))
    return sorted(found)


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    for child in node.iterdir():
        rel = f"{prefix}/{child.name}"
        if child.is_dir():
            if child.name != "__pycache__":
                yield from _walk(child, rel)
        else:
            yield rel, child


def train(texts: Sequence[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """Train the byte-level BPE on `texts` and return a `tokenizers.Tokenizer`.

    Deterministic for equal `texts` (the trainer breaks count ties by pair order).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    bos_id = tokenizer.token_to_id(BOS)
    # Llama 3's behaviour: a plain prompt gets BOS; the chat template adds its own.
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    return tokenizer


def tokenizer_config() -> dict[str, Any]:
    """Return the ``tokenizer_config.json`` content (special tokens, template, length)."""
    added = {str(i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i, token in enumerate(SPECIAL_TOKENS)}
    return {
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, EOS],
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def special_tokens_map() -> dict[str, Any]:
    """Return the ``special_tokens_map.json`` content."""
    return {"additional_special_tokens": [IM_START, EOS], "bos_token": BOS, "eos_token": EOS,
            "pad_token": PAD}


def build(out: str, texts: Sequence[str] | None = None) -> list[str]:
    """Train on `texts` (default: the package sources) and write the model dir `out`.

    Return the paths written. Overwrites existing files.
    """
    if texts is None:
        texts = [text for _, text in corpus_files()]
    tokenizer = train(texts)
    os.makedirs(out, exist_ok=True)
    # tokenizers writes its own key order; re-dump sorted so equal tokenizers give equal bytes.
    files = {
        "tokenizer.json": json.loads(tokenizer.to_str()),
        "tokenizer_config.json": tokenizer_config(),
        "special_tokens_map.json": special_tokens_map(),
    }
    written = []
    for name, content in files.items():
        path = os.path.join(out, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(content, ensure_ascii=False, sort_keys=True,
                               separators=(",", ":") if name == "tokenizer.json" else None,
                               indent=None if name == "tokenizer.json" else 2) + "\n")
        written.append(path)
    return written


def default_out() -> str:
    """The packaged fixture's directory (`cache_plane/models/tiny-chat`)."""
    return str(resources.files("cache_plane") / "models" / "tiny-chat")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cache_plane.sim.build_tokenizer",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=default_out(),
                        help="model directory to write (default: the packaged tiny-chat)")
    args = parser.parse_args(argv)
    for path in build(args.out):
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
