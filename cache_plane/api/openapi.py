"""The OpenAPI 3.1 document of the cache_plane API; its schemas also validate request bodies."""

from __future__ import annotations

from typing import Any

from .. import limits as L

U64 = {"type": "integer", "minimum": 0, "maximum": L.MAX_BLOCK_HASH}
TOKEN = {"type": "integer", "minimum": 0, "maximum": L.MAX_TOKEN_ID}
# An id: at most MAX_ID_BYTES UTF-8 bytes (`x-max-bytes`, checked by api/validation.py);
# maxLength states the same number as characters, which JSON Schema can express.
ID = {"type": "string", "minLength": 1, "maxLength": L.MAX_ID_BYTES,
      "x-max-bytes": L.MAX_ID_BYTES}
# Completion report fields that teach the load model (cache_plane/calibration.py).
COUNT = {"type": "integer", "minimum": 0, "maximum": L.MAX_COUNT}


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props,
            "additionalProperties": False}


SCHEMAS: dict[str, dict[str, Any]] = {
    "RegisterNode": _obj(
        ["node_id", "address", "models", "capacity_blocks"],
        node_id=ID, address=ID,
        models={"type": "array", "items": ID, "minItems": 1, "maxItems": L.MAX_MODELS_PER_NODE},
        capacity_blocks={"type": "integer", "minimum": 1, "maximum": L.MAX_CAPACITY_BLOCKS},
        max_active={"type": "integer", "minimum": 1, "maximum": L.MAX_ACTIVE,
                    "description": "the most requests (running + waiting) the router sends "
                                   "the node; more are rejected as all_nodes_busy"},
        max_running={"type": "integer", "minimum": 1, "maximum": L.MAX_ACTIVE,
                     "description": "the engine's running slots (vLLM --max-num-seqs); "
                                    "requests beyond them wait in its queue. Default: "
                                    "max_active (capped at it)"},
        labels={"type": "object", "additionalProperties": {"type": "string", "maxLength": 256},
                "maxProperties": L.MAX_LABELS},
        instance_id={"type": "string", "maxLength": L.MAX_ID_BYTES,
                     "x-max-bytes": L.MAX_ID_BYTES},
    ),
    "Heartbeat": _obj(
        [], active_requests={"type": "integer", "minimum": 0, "maximum": L.MAX_REPORTED,
                             "description": "running requests (vLLM num_requests_running)"},
        queue_depth={"type": "integer", "minimum": 0, "maximum": L.MAX_REPORTED,
                     "description": "requests waiting for a running slot (vLLM "
                                    "num_requests_waiting)"},
        used_blocks={"type": "integer", "minimum": 0, "maximum": L.MAX_CAPACITY_BLOCKS,
                     "description": "the engine's own count of KV blocks in use; GET /v1/nodes "
                                    "shows it as reported_used_blocks beside the index's "
                                    "used_blocks (a growing gap means lost KV events)"},
    ),
    "AddMember": _obj(
        ["raft", "http"], raft={"type": "string", "pattern": "^.+:[0-9]{1,5}$", "maxLength": 256},
        http={"type": "string", "pattern": "^.+:[0-9]{1,5}$", "maxLength": 256},
    ),
    "RegisterModel": _obj(
        ["model_id"], model_id=ID,
        block_size={"type": "integer", "minimum": 1, "maximum": L.MAX_BLOCK_SIZE},
        hash_seed={"type": "string", "maxLength": L.MAX_ID_BYTES},
    ),
    "Route": _obj(
        ["model"], model=ID, session_id=ID, request_id=ID,
        token_ids={"type": "array", "items": TOKEN, "maxItems": L.MAX_PROMPT_TOKENS},
        block_hashes={"type": "array", "items": U64, "maxItems": L.MAX_PROMPT_BLOCKS},
        prompt={"type": "string", "maxLength": L.MAX_PROMPT_CHARS},
        max_tokens={"type": "integer", "minimum": 0, "maximum": 2**24, "description": "accepted (vLLM/llm-d compatibility), not used yet"},
        dry_run={"type": "boolean"},
    ),
    "Complete": _obj(
        ["request_id", "node_id"], request_id=ID, node_id=ID,
        status={"enum": ["ok", "failed", "cancelled"]},
        block_hashes={"type": "array", "items": U64, "maxItems": L.MAX_PROMPT_BLOCKS},
        prompt_tokens={**COUNT, "description": "the prompt's tokens (usage.prompt_tokens)"},
        output_tokens={**COUNT, "description": "tokens generated (usage.completion_tokens)"},
        cached_tokens={**COUNT, "description": "prompt tokens served from the engine's prefix "
                                              "cache (usage.prompt_tokens_details."
                                              "cached_tokens)"},
        ttft_ms={**COUNT, "description": "time to first token as the engine or gateway "
                                        "measured it"},
        latency_ms={**COUNT, "description": "time from arrival to the last token, likewise "
                                           "(default: the leader's route-to-report time)"},
    ),
    "KVEvents": _obj(
        ["node_id", "seq", "events"], node_id=ID, model=ID,
        seq={"type": "integer", "minimum": 0, "maximum": L.MAX_SEQ},
        events={"type": "array", "maxItems": L.MAX_EVENTS, "items": _obj(
            ["type"], type={"enum": ["stored", "removed", "cleared"]},
            block_hashes={"type": "array", "items": U64, "maxItems": L.MAX_PROMPT_BLOCKS},
            parent_hash={"anyOf": [U64, {"type": "null"}], "description": "accepted (vLLM/llm-d compatibility), not used yet"},
            tier={"enum": ["gpu", "cpu", "disk"]},
        )},
    ),
    "Error": _obj(["error", "detail", "definite"], error={"type": "string"},
                  detail={"type": "string"}, definite={"type": "boolean"}),
}


def _op(summary: str, body: str | None = None, *, mutating: bool = True,
        codes: tuple[int, ...] = ()) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {
        "200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
    }}
    for code in (400, 401, 404, 409, 413, 503, 504, *codes):
        if code == 401 and not mutating:
            continue
        op["responses"][str(code)] = {"description": "error", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    if mutating:
        op["responses"]["307"] = {"description": "not the leader: repeat at Location"}
        op["security"] = [{"bearer": []}]
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{body}"}}}}
    return op


def _backup_op() -> dict[str, Any]:
    """Answered by the member asked (any member, no redirect): its state as a snapshot file."""
    op = _op("Snapshot this member's state now and download it (for `cache-plane restore`)")
    op["responses"].pop("307")
    op["responses"]["200"] = {"description": "snapshot file", "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    return op


def _id_param(name: str) -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True, "schema": ID}]


def document() -> dict[str, Any]:
    """Build the OpenAPI document served at /openapi.json."""
    paths: dict[str, Any] = {
        "/v1/nodes": {"post": _op("Register or update an inference node", "RegisterNode"),
                      "get": _op("List inference nodes", mutating=False)},
        "/v1/nodes/{node_id}": {"get": _op("One inference node", mutating=False),
                                "delete": _op("Remove a node and forget its blocks"),
                                "parameters": _id_param("node_id")},
        "/v1/nodes/{node_id}/heartbeat": {"post": _op("Report load, renew the lease", "Heartbeat"),
                                          "parameters": _id_param("node_id")},
        "/v1/nodes/{node_id}/drain": {"post": _op("Stop routing new requests to a node"),
                                      "parameters": _id_param("node_id")},
        "/v1/models": {"post": _op("Register a model (block size, hash seed)", "RegisterModel"),
                       "get": _op("List models", mutating=False)},
        "/v1/models/{model_id}/invalidate": {"post": _op("New model version: drop its blocks"),
                                             "parameters": _id_param("model_id")},
        "/v1/route": {"post": _op("Choose the node for a request (dry_run: no state change)",
                                  "Route")},
        "/v1/complete": {"post": _op("Report a request's completion (cache fill)", "Complete")},
        "/v1/kv-events": {"post": _op("Engine KV events, idempotent per (node_id, seq)",
                                      "KVEvents")},
        "/v1/cluster": {"get": _op("Members, leader, term, indexes, health", mutating=False)},
        "/v1/stats": {"get": _op("Hit rates, reuse, evictions, rejections", mutating=False)},
        "/v1/backup": {"post": _backup_op()},
        "/v1/cluster/members": {"post": _op("Add a Raft member (one change at a time)",
                                            "AddMember")},
        "/v1/cluster/members/{raft}": {"delete": _op("Remove a Raft member (not the leader)"),
                                       "parameters": _id_param("raft")},
        "/health/live": {"get": _op("Process is up", mutating=False)},
        "/health/ready": {"get": _op("Member with a known leader, caught up", mutating=False)},
        "/metrics": {"get": _op("Prometheus metrics", mutating=False)},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "llm-serving-cache control plane", "version": "0.1.0",
                 "description": "KV-cache aware routing for LLM inference fleets. Writes go to "
                                "the Raft leader (followers answer 307)."},
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
