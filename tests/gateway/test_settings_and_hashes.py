"""Gateway settings (every problem at once) and block hashes equal to the engine's."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from cache_plane.gateway import core
from cache_plane.gateway.app import Gateway
from cache_plane.gateway.settings import load_api_keys, load_gateway_settings
from cache_plane.sim.node import Prompt, SimNode, SimNodeSettings
from cache_plane.sim.server import _parse
from veristore_py.errors import ConfigError


def keys_file(tmp_path: Path, text: str = '[keys."sk-test-key-1"]\ntenant = "a"\n') -> str:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    os.chmod(path, 0o600)
    return str(path)


def test_settings_report_every_problem(tmp_path: Path) -> None:
    """Bad settings are refused with all their problems listed."""
    with pytest.raises(ConfigError) as info:
        load_gateway_settings(None, env={"CACHE_PLANE_GATEWAY_ROUTE_ACK": "never",
                                         "CACHE_PLANE_GATEWAY_MAX_RETRIES": "x"},
                              overrides={"listen": "0.0.0.0:8080"})
    text = "\n".join(info.value.problems)
    for part in ("cluster", "api_keys_file", "route_ack", "max_retries", "beyond loopback"):
        assert part in text


def test_settings_layers(tmp_path: Path) -> None:
    """File, then environment, then flags."""
    config = tmp_path / "g.toml"
    config.write_text(f'cluster = ["http://127.0.0.1:1"]\napi_keys_file = '
                      f'"{keys_file(tmp_path)}"\nmax_retries = 1\n[tokenizers]\nm = "text"\n')
    s = load_gateway_settings(str(config), env={"CACHE_PLANE_GATEWAY_MAX_RETRIES": "3",
                                                "CACHE_PLANE_GATEWAY_ROUTE_ACK": "decided"},
                              overrides={"route_ack": "committed"})
    assert (s.max_retries, s.route_ack, dict(s.tokenizers)) == (3, "committed", {"m": "text"})


def test_api_keys_file_problems(tmp_path: Path) -> None:
    """Short keys, missing tenants and bad rates are all reported."""
    path = keys_file(tmp_path, '[keys."short"]\ntenant = "a"\n[keys."sk-long-enough"]\n'
                                'requests_per_s = -1\ntenant = "b"\n[keys."sk-no-tenant-x"]\n')
    with pytest.raises(ConfigError) as info:
        load_api_keys(path)
    assert len(info.value.problems) == 3


BODIES: list[tuple[bool, dict[str, Any]]] = [
    (True, {"model": "tiny-chat", "messages": [
        {"role": "system", "content": "You route requests to the node that holds the prefix. " * 20},
        {"role": "user", "content": "Which node holds block 7?"}]}),
    (True, {"model": "tiny-chat", "cache_salt": "tenant-a", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "part one " * 30},
                                     {"type": "text", "text": "part two"}]}]}),
    (True, {"model": "sql-lora", "messages": [{"role": "user", "content": "select * " * 40}]}),
    (True, {"model": "tiny-chat", "add_generation_prompt": False,
            "messages": [{"role": "user", "content": "no generation prompt " * 20}]}),
    (False, {"model": "tiny-chat", "prompt": "A completion prompt with enough words. " * 20}),
]


@pytest.mark.parametrize(("chat", "body"), BODIES)
def test_gateway_hashes_equal_the_engines(tmp_path: Path, chat: bool,
                                          body: dict[str, Any]) -> None:
    """The gateway's block hashes equal the sim-node's, block by block (chat, completion,
    content parts, cache_salt, LoRA)."""
    settings = load_gateway_settings(None, env={}, overrides={
        "cluster": ["http://127.0.0.1:1"], "api_keys_file": keys_file(tmp_path),
        "tokenizers": {"tiny-chat": "tiny-chat"}, "lora": {"sql-lora": "tiny-chat"}})
    gateway = Gateway(settings)
    gateway.tokenizers["tiny-chat"] = __import__(
        "cache_plane.tokenization", fromlist=["load_tokenizer"]).load_tokenizer("tiny-chat")
    spec = {"model_id": "tiny-chat", "block_size": 16, "hash_seed": "vllm-none-hash"}
    parsed = core.check_request(body, chat, 1 << 20)
    form, count = asyncio.run(gateway.block_hashes(parsed, body, spec))
    node = SimNode(SimNodeSettings(model="tiny-chat", tokenizer="tiny-chat",
                                   lora_modules=("sql-lora",)))
    prompt = _parse(node, body, chat)
    assert isinstance(prompt, Prompt)
    engine_blocks = node.new_request(prompt).blocks
    assert count == len(prompt.token_ids)
    assert len(engine_blocks) >= 3
    assert list(form["block_hashes"]) == list(engine_blocks)


def test_gateway_cli_refuses_bad_settings_clearly(tmp_path: Path) -> None:
    """`cache-plane gateway` with bad settings or a missing tokenizer exits 2 saying why."""
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cache_plane", "gateway", *args],
                              capture_output=True, text=True, timeout=60)

    out = run("--listen", "0.0.0.0:8080", "--route-ack", "decided")
    assert out.returncode == 2
    assert "cluster" in out.stderr and "api_keys_file" in out.stderr
    assert "beyond loopback" in out.stderr
    out = run("--cluster", "http://127.0.0.1:1", "--api-keys-file", keys_file(tmp_path),
              "--tokenizer", f"m={tmp_path / 'missing'}")
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr
    out = run("--tokenizer", "no-equals-sign")
    assert out.returncode == 2 and "NAME=VALUE" in out.stderr
