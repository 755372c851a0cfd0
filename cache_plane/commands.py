"""One constructor per replicated command: the wire form the machine reads (msgpack maps).

The leader's service, the in-process simulator and the benchmarks build commands here and
nowhere else, so a field has one name and one place. Each constructor returns the map with
its keys in a fixed order: msgpack keeps insertion order, and a command's bytes are part of
the Raft log (`tests/integration/test_store_fixture.py` pins the encodings). Optional fields
are left out when not given, as the machine reads absent fields as their defaults.

`now_ms` is the leader's clock. Commands whose handlers read it take it as an argument;
the others get it stamped last by the proposer (`CachePlaneService.submit`), if absent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Command = dict[str, Any]

# Report fields of a completion that calibrate the load model (see `calibration`).
USAGE_FIELDS = ("prompt_tokens", "output_tokens", "cached_tokens", "ttft_ms", "latency_ms")


def priors(prefill_tokens_per_s: float, decode_ms_per_token: float,
           mean_output_tokens: float) -> Command:
    """The load model's priors (the leader's settings), stamped into route, complete, expire."""
    return {"prefill_tokens_per_s": prefill_tokens_per_s,
            "decode_ms_per_token": decode_ms_per_token,
            "mean_output_tokens": mean_output_tokens}


def register_model(model: str, block_size: int, hash_seed: str) -> Command:
    return {"op": "cp.register_model", "model": model, "block_size": block_size,
            "hash_seed": hash_seed}


def invalidate_model(model: str) -> Command:
    return {"op": "cp.invalidate_model", "model": model}


def register_node(node: str, address: str, models: Sequence[str], capacity_blocks: int,
                  max_active: int, labels: Mapping[str, str], lease_ms: int, *,
                  instance_id: str | None = None, max_running: int | None = None,
                  kv_events: Mapping[str, Any] | None = None) -> Command:
    command: Command = {"op": "cp.register_node", "node": node, "address": address,
                        "models": list(models), "capacity_blocks": capacity_blocks,
                        "max_active": max_active, "labels": dict(labels), "lease_ms": lease_ms}
    if instance_id is not None:
        command["instance_id"] = instance_id
    if kv_events is not None:
        command["kv_events"] = dict(kv_events)
    if max_running is not None:
        command["max_running"] = max_running
    return command


def heartbeat(node: str, active: int, queue: int, lease_ms: int,
              used: int | None = None) -> Command:
    """Running (`active`) and waiting (`queue`) requests; `used`: the engine's KV blocks."""
    command: Command = {"op": "cp.heartbeat", "node": node, "active": active, "queue": queue,
                        "lease_ms": lease_ms}
    if used is not None:
        command["used"] = used
    return command


def drain(node: str) -> Command:
    return {"op": "cp.drain", "node": node}


def remove_node(node: str) -> Command:
    return {"op": "cp.remove_node", "node": node}


def route(model: str, blocks: list[int], request_id: str, now_ms: int, request_ttl_ms: int,
          session_ttl_ms: int, prior: Mapping[str, Any], load_weight: float,
          session_max_load: float, session_id: str | None = None) -> Command:
    """A route to decide (the leader adds its decision with `with_decision`)."""
    command: Command = {"op": "cp.route", "model": model, "blocks": blocks,
                        "request_id": request_id, "now_ms": now_ms,
                        "request_ttl_ms": request_ttl_ms, "session_ttl_ms": session_ttl_ms,
                        **prior, "load_weight": load_weight,
                        "session_max_load": session_max_load}
    if session_id:
        command["session_id"] = session_id
    return command


def with_decision(command: Command, node: str, route_type: str | None, matched: int,
                  victims: list[list[int]], binding: bool = False) -> Command:
    """Stamp the leader's decision into a route command (in place; returns it).

    `binding`: the decision was already answered (``ack: decided``), so the request went to
    `node` whatever the state says at apply; if the decision no longer fits there, apply
    records nothing instead of choosing another node.
    """
    command.update(node=node, route_type=route_type, matched=matched, evict=victims)
    if binding:
        command["binding"] = True
    return command


def node_unreachable(node: str) -> Command:
    """A gateway could not reach `node`: stop routing to it until its next heartbeat."""
    return {"op": "cp.node_unreachable", "node": node}


def complete(request_id: str, node: str, status: str, output_blocks: list[int],
             usage: Mapping[str, int], prior: Mapping[str, Any]) -> Command:
    """A completion report; `usage` holds any of `USAGE_FIELDS`."""
    return {"op": "cp.complete", "request_id": request_id, "node": node, "status": status,
            "output_blocks": output_blocks,
            **{k: usage[k] for k in USAGE_FIELDS if k in usage}, **prior}


def kv_events(node: str, seq: int, events: list[Any], model: str | None = None) -> Command:
    command: Command = {"op": "cp.kv_events", "node": node, "seq": seq, "events": events}
    if model is not None:
        command["model"] = model
    return command


def kv_batches(node: str, rank: int, batches: list[Any], *, model: str | None = None,
               resync: str | None = None, contiguous: bool = True, gaps: int = 0,
               replays: int = 0) -> Command:
    """Batches of one KV-event stream: ``[seq, ts_ms, events]`` each (see machine.blocks)."""
    command: Command = {"op": "cp.kv_batches", "node": node, "rank": rank, "batches": batches,
                        "contiguous": contiguous}
    for name, value in (("model", model), ("resync", resync)):
        if value is not None:
            command[name] = value
    if gaps or replays:
        command["gaps"], command["replays"] = gaps, replays
    return command


def expire(now_ms: int, block_ttl_ms: int, prior: Mapping[str, Any]) -> Command:
    return {"op": "cp.expire", "now_ms": now_ms, "block_ttl_ms": block_ttl_ms, **prior}


def compact_log(slot: int | None = None) -> Command:
    return {"op": "cp.compact_log"} if slot is None else {"op": "cp.compact_log", "slot": slot}


def cache_put(key: str, *, tenant: str, model: str, epoch: int, namespace: str,
              bucket: str | None, question: str | None, body: bytes, embedding: bytes,
              now_ms: int, expires_ms: int, max_bytes: int, prompt_tokens: int,
              completion_tokens: int, latency_ms: int) -> Command:
    """Store a response (`body` compressed by the leader), evicting LRU entries past `max_bytes`."""
    return {"op": "cp.cache_put", "key": key, "tenant": tenant, "model": model, "epoch": epoch,
            "namespace": namespace, "bucket": bucket, "question": question, "body": body,
            "embedding": embedding, "now_ms": now_ms, "expires_ms": expires_ms,
            "max_bytes": max_bytes, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "latency_ms": latency_ms}


def cache_touch(keys: Sequence[str], now_ms: int) -> Command:
    return {"op": "cp.cache_touch", "keys": list(keys), "now_ms": now_ms}


def cache_delete(key: str) -> Command:
    return {"op": "cp.cache_delete", "key": key}


def cache_purge(tenant: str | None = None, model: str | None = None,
                namespace: str | None = None, everything: bool = False) -> Command:
    command: Command = {"op": "cp.cache_purge"}
    for name, value in (("tenant", tenant), ("model", model), ("namespace", namespace)):
        if value is not None:
            command[name] = value
    if everything:
        command["all"] = True
    return command
