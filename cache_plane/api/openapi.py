"""The OpenAPI 3.1 document of a cache_plane member; its request schemas also validate bodies.

The document describes every endpoint a member serves, the domain's and veristore's (generic
KV, status, digest, health, backup, membership), as the handlers accept them. Each
operation's `security` comes from the one endpoint -> role table (`app.ACCESS_TABLE`,
looked up like the auth middleware does): ``[{"bearer": [role]}]`` (OpenAPI 3.1 lets a
non-OAuth scheme list role names) or ``[]`` for public endpoints. `tests/api/test_openapi.py`
checks that the document's operations are exactly the app's routes, and
`tests/api/test_contract.py` fuzzes a live member against it.

`SCHEMAS` are the request bodies `api/validation.py` compiles; `WIRE_SCHEMAS` are the
veristore bodies (validated by hand in `veristore_py/api.py`) and the responses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from veristore_py import api as kv_api
from veristore_py.auth import PUBLIC, ROLES, required_role
from veristore_py.state import MAX_IDEM_BYTES, MAX_KEY_BYTES, MAX_SCAN_LIMIT, MAX_VALUE_BYTES

from .. import limits as L

U64 = {"type": "integer", "minimum": 0, "maximum": L.MAX_BLOCK_HASH}
TOKEN = {"type": "integer", "minimum": 0, "maximum": L.MAX_TOKEN_ID}
# An id: at most MAX_ID_BYTES UTF-8 bytes, stated as JSON Schema can (see limits.py).
ID = kv_api.text_schema(L.MAX_ID_BYTES, min_length=1)
# Completion report fields that teach the load model (cache_plane/calibration.py).
COUNT = {"type": "integer", "minimum": 0, "maximum": L.MAX_COUNT}
# A member's host:port, exactly as `veristore_py.api._address` accepts it.
ADDRESS = {"type": "string", "pattern": kv_api.ADDRESS_PATTERN,
           "maxLength": kv_api.MAX_ADDRESS_CHARS}
# Generic KV strings are stored as UTF-8 bytes, limited like ids.
KV_TEXT = kv_api.text_schema(MAX_VALUE_BYTES)
IDEM = {**kv_api.text_schema(MAX_IDEM_BYTES, min_length=1), "type": ["string", "null"],
        "description": "a retry with the same key replays the first outcome"}
REVISION = {"type": "integer", "minimum": 0}
# A response-cache key (cache_plane/responses/keys.py): SHA-256 in lowercase hex.
CACHE_KEY = {"type": "string", "pattern": "^[0-9a-f]{64}$"}


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props,
            "additionalProperties": False}


def _open(required: list[str], **props: Any) -> dict[str, Any]:
    """An object whose other fields the handler ignores (veristore's bodies) or may add."""
    return {"type": "object", "required": required, "properties": props}


COMPLETE = _obj(
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
)



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
        instance_id=kv_api.text_schema(L.MAX_ID_BYTES),
        kv_events={**_obj(
            ["endpoint"],
            endpoint={**kv_api.text_schema(L.MAX_ID_BYTES, min_length=1),
                      "description": "the engine's ZMQ PUB, as a member connects to it: "
                                     "tcp://HOST:PORT (vLLM kv-events-config endpoint)"},
            replay_endpoint={**kv_api.text_schema(L.MAX_ID_BYTES, min_length=1),
                             "description": "its ROUTER replay socket (none: no replay)"},
            topic=kv_api.text_schema(L.MAX_ID_BYTES),
            hash_form={"enum": ["vllm", "sglang"],
                       "description": "how 32-byte hashes fold to 64 bits (default vllm)"},
            ranks={"type": "integer", "minimum": 1, "maximum": 256,
                   "description": "data-parallel ranks: rank r on the endpoint's port + r"}),
            "description": "the cluster leader subscribes to these KV events "
                           "(docs/kv_events.md)"},
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
    "RegisterModel": _obj(
        ["model_id"], model_id=ID,
        block_size={"type": "integer", "minimum": 1, "maximum": L.MAX_BLOCK_SIZE},
        hash_seed={"type": "string", "maxLength": L.MAX_ID_BYTES},
    ),
    "Route": {
        **_obj(["model"], model=ID, session_id=ID, request_id=ID,
               token_ids={"type": "array", "items": TOKEN, "maxItems": L.MAX_PROMPT_TOKENS},
               block_hashes={"type": "array", "items": U64, "maxItems": L.MAX_PROMPT_BLOCKS},
               prompt={"type": "string", "maxLength": L.MAX_PROMPT_CHARS},
               max_tokens={"type": "integer", "minimum": 0, "maximum": 2**24,
                           "description": "accepted (vLLM/llm-d compatibility), not used yet"},
               dry_run={"type": "boolean"},
               ack={"enum": ["committed", "decided"],
                    "description": "committed (default): answer once the decision is "
                                   "replicated; decided: answer as soon as the leader has "
                                   "decided, commit in the background (docs/gateway.md)"}),
        "description": "give the prompt as exactly one of token_ids, block_hashes or prompt",
        "oneOf": [{"required": ["token_ids"]}, {"required": ["block_hashes"]},
                  {"required": ["prompt"]}],
    },
    "Complete": COMPLETE,
    "CompleteBatch": _obj(
        ["reports"], reports={"type": "array", "minItems": 1, "maxItems": L.MAX_REPORTS,
                              "items": COMPLETE,
                              "description": "completion reports, each as for /v1/complete"}),
    "KVEvents": _obj(
        ["node_id", "seq", "events"], node_id=ID, model=ID,
        seq={"type": "integer", "minimum": 0, "maximum": L.MAX_SEQ},
        rank={"type": "integer", "minimum": 0, "maximum": L.MAX_SLOTS,
              "description": "the engine's data-parallel rank: a stream of its own, with its "
                             "own seq (default 0)"},
        events={"type": "array", "maxItems": L.MAX_EVENTS, "items": _obj(
            ["type"], type={"enum": ["stored", "removed", "cleared"]},
            block_hashes={"type": "array", "items": U64, "maxItems": L.MAX_PROMPT_BLOCKS},
            parent_hash={"anyOf": [U64, {"type": "null"}], "description": "accepted (vLLM/llm-d compatibility), not used yet"},
            tier={"enum": ["gpu", "cpu", "disk"]},
        )},
    ),
    "CachePut": _obj(
        ["key", "tenant", "model", "epoch", "response"],
        key=CACHE_KEY, tenant=ID, model={**ID, "description": "the base model the cluster "
                                                             "knows (its epoch's owner)"},
        epoch={**COUNT, "description": "the model's epoch the key was computed under; an "
                                       "older one is refused (stored: false)"},
        namespace=kv_api.text_schema(L.MAX_ID_BYTES),
        bucket={"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$",
                "description": "the semantic bucket (everything but the last question)"},
        question={"type": ["string", "null"], "maxLength": 4096,
                  "description": "the last user message (semantic matching and its guards)"},
        response={"type": "object", "description": "the whole answer, as the client got it"},
        embedding={"type": "array", "maxItems": 4096, "items": {"type": "number"},
                   "description": "the question's embedding (stored as float16)"},
        ttl_s={"type": "integer", "minimum": 1, "maximum": 30 * 86400,
               "description": "seconds to keep it (default: response_cache_ttl_s)"},
        prompt_tokens=COUNT, completion_tokens=COUNT,
        latency_ms={**COUNT, "description": "what the backend took: the time a hit saves"}),
    "CacheTouch": _obj(["keys"], keys={"type": "array", "items": CACHE_KEY, "minItems": 1,
                                       "maxItems": 4096}),
    "CachePurge": {**_obj([], tenant=ID, model=ID,
                          namespace=kv_api.text_schema(L.MAX_ID_BYTES),
                          all={"const": True,
                               "description": "purge everything (when no filter is given)"}),
                   "minProperties": 1,
                   "description": "give tenant, model and/or namespace (entries matching "
                                  "all given), or all: true"},
}

_ITEM = _obj(["key", "value", "revision"], key={"type": "string"}, value={"type": "string"},
             revision=REVISION)
WIRE_SCHEMAS: dict[str, dict[str, Any]] = {
    # veristore's request bodies: fields not named here are ignored
    "KVPut": _open(["value"], value=KV_TEXT, idempotency_key=IDEM),
    "KVDelete": _open([], idempotency_key=IDEM),
    "KVCas": _open(["expected", "value"],
                   expected={**KV_TEXT, "type": ["string", "null"],
                             "description": "null: the key must be absent"},
                   value={**KV_TEXT, "type": ["string", "null"],
                          "description": "null: delete the key"},
                   idempotency_key=IDEM),
    "AddMember": _open(["raft", "http"], raft=ADDRESS, http=ADDRESS),
    # responses
    "Error": _obj(
        ["error", "detail", "definite"],
        error={"type": "string", "description": "a stable code, e.g. unknown_model"},
        detail={"type": "string", "description": "for people; never parse it"},
        definite={"type": "boolean",
                  "description": "true: the operation certainly did not take effect"},
        leader={"type": "string", "description": "307: the same request's URL on the leader"},
        candidates={"type": "array", "items": {"type": "object"},
                    "description": "a rejected route: each node's breakdown"},
        request_id={"type": "string", "description": "a rejected route's request id"}),
    "Object": {"type": "object", "description": "see docs/api.md for the fields"},
    "KVItem": _ITEM,
    "KVWritten": _obj(["revision", "prev_revision", "replayed"], revision=REVISION,
                      prev_revision=REVISION, replayed={"type": "boolean"}),
    "KVDeleted": _obj(["deleted", "revision", "replayed"], deleted={"type": "boolean"},
                      revision=REVISION, replayed={"type": "boolean"}),
    "KVSwapped": _obj(["succeeded", "current", "revision", "replayed"],
                      succeeded={"type": "boolean"}, current={"type": ["string", "null"]},
                      revision=REVISION, replayed={"type": "boolean"}),
    "KVPage": _obj(["items", "more"], items={"type": "array", "items": _ITEM},
                   more={"type": "boolean"}),
    "Status": _open(
        ["raft_address", "http_address", "state", "leader", "term", "commit_index",
         "applied_index", "members"],
        raft_address={"type": "string"}, http_address={"type": "string"},
        state={"type": "string"}, leader={"type": ["string", "null"]},
        term={"type": "integer"}, commit_index={"type": "integer"},
        applied_index={"type": "integer"},
        members={"type": "array", "items": _open(
            ["raft", "http", "self", "connected"], raft={"type": "string"},
            http={"type": ["string", "null"]}, self={"type": "boolean"},
            connected={"type": "boolean"})}),
    "Digest": _obj(["applied_index", "digest"], applied_index={"type": "integer"},
                   digest={"type": "string", "pattern": "^[0-9a-f]{64}$"}),
    "Live": _obj(["status"], status={"const": "ok"}),
    "Ready": _obj(["status"], status={"const": "ready"}),
    "MemberAdded": _obj(["added", "http"], added={"type": "string"}, http={"type": "string"}),
    "MemberRemoved": _obj(["removed"], removed={"type": "string"}),
    "Nodes": _open(["nodes"], nodes={"type": "array", "items": {"type": "object"}}),
    "Models": _open(["models"], models={"type": "array", "items": {"type": "object"}}),
}

_JSON = "application/json"
_ERRORS = {
    400: "malformed request: bad JSON, a wrong type, an unknown field, a limit exceeded",
    401: "missing or unknown bearer token",
    403: "the token's role is weaker than the endpoint's",
    404: "no such resource",
    405: "this path does not serve the method; `Allow` lists those it does",
    409: "the request conflicts with the replicated state",
    413: "the body is too large, or the prompt can never fit",
    503: "no leader is known, the leader is overloaded, or admission refused the request; "
         "retry after `Retry-After`",
    504: "not committed in time: the outcome is unknown (definite: false)",
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"const": "Bearer"}}},
    405: {"Allow": {"required": True, "schema": {"type": "string"}}},
    503: {"Retry-After": {"schema": {"type": "integer"}}},
}
# What a request that the leader must decide may answer besides its own errors.
_LEADER = (307, 503, 504)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(code: int) -> dict[str, Any]:
    response: dict[str, Any] = {"description": _ERRORS[code],
                                "content": {_JSON: {"schema": _ref("Error")}}}
    if code in _HEADERS:
        response["headers"] = _HEADERS[code]
    return response


def _op(summary: str, ok: str | None, *, body: str | None = None, optional_body: bool = False,
        codes: tuple[int, ...] = (), media: str = _JSON,
        query: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """One operation: its 200 (JSON of schema `ok`, else text or bytes of type `media`),
    its error codes (401/403 come from its role: see `document`), its request body."""
    content = {"schema": _ref(ok) if ok is not None else {"type": "string"}}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": {media: content}}}
    if body is not None:
        codes = (400, 413, *codes)
    for code in sorted({405, *codes}):
        if code == 307:
            responses["307"] = {
                "description": "this member does not lead: repeat the request at `Location`",
                "headers": {"Location": {"required": True,
                                         "schema": {"type": "string", "format": "uri"}}},
                "content": {_JSON: {"schema": _ref("Error")}}}
        else:
            responses[str(code)] = _error(code)
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if query:
        op["parameters"] = list(query)
    if body is not None:
        op["requestBody"] = {"required": not optional_body,
                             "content": {_JSON: {"schema": _ref(body)}}}
    return op


def _path_param(name: str, schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True, "schema": schema}]


_CONSISTENCY = {
    "name": "consistency", "in": "query",
    "schema": {"enum": ["linearizable", "lease", "stale"], "default": "linearizable"},
    "description": "linearizable: through the Raft log (leader only); lease: on the leader "
                   "under its lease; stale: this replica's state"}
_KEY = kv_api.text_schema(MAX_KEY_BYTES, min_length=1)
_SCAN = (
    {"name": "prefix", "in": "query", "schema": kv_api.text_schema(MAX_KEY_BYTES),
     "description": "keys starting with it (default: all)"},
    {"name": "after", "in": "query", "schema": kv_api.text_schema(MAX_KEY_BYTES),
     "description": "keys after this one (the last key of the previous page)"},
    {"name": "limit", "in": "query",
     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_SCAN_LIMIT}},
    _CONSISTENCY,
)
_CACHE_PAGE = (
    {"name": "after", "in": "query", "schema": CACHE_KEY,
     "description": "keys after this one (the 'next' of the previous page)"},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                 "maximum": 5000}},
)
_CACHE_FEED = (
    {"name": "since", "in": "query", "required": True, "schema": REVISION},
    {"name": "wait_ms", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                   "maximum": 5000}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                 "maximum": 5000}},
)
# 409: the idempotency key was used for a write of another op or key.
_KV_WRITE = (409, *_LEADER)
# A follower answers a leader-only request with 307; domain refusals map by code (errors.py:
# a malformed id in the path is the machine's 400).
_DOMAIN = (*_LEADER, 400, 404, 409)


def _paths() -> dict[str, Any]:
    """Every path the member serves and its operations (security is added by `document`)."""
    node, model = _path_param("node_id", ID), _path_param("model_id", ID)
    return {
        "/v1/nodes": {
            "post": _op("Register or update an inference node", "Object", body="RegisterNode",
                        codes=_DOMAIN),
            "get": _op("List inference nodes", "Nodes", codes=(503,))},
        "/v1/nodes/{node_id}": {
            "get": _op("One inference node", "Object", codes=(404, 503)),
            "delete": _op("Remove a node and forget its blocks", "Object", codes=_DOMAIN),
            "parameters": node},
        "/v1/nodes/{node_id}/blocks": {
            "get": _op("The blocks the index says the node holds: per model, [block hash, "
                       "tier] pairs, least recently used first", "Object", codes=(404, 503)),
            "parameters": node},
        "/v1/nodes/{node_id}/heartbeat": {
            "post": _op("Report load, renew the lease (the body is optional)", "Object",
                        body="Heartbeat", optional_body=True, codes=_DOMAIN),
            "parameters": node},
        "/v1/nodes/{node_id}/drain": {
            "post": _op("Stop routing new requests to a node", "Object", codes=_DOMAIN),
            "parameters": node},
        "/v1/nodes/{node_id}/unreachable": {
            "post": _op("A gateway could not reach the node: stop routing to it until its "
                        "next heartbeat", "Object", codes=_DOMAIN),
            "parameters": node},
        "/v1/models": {
            "post": _op("Register a model (block size, hash seed)", "Object",
                        body="RegisterModel", codes=_DOMAIN),
            "get": _op("List models", "Models", codes=(503,))},
        "/v1/models/{model_id}/invalidate": {
            "post": _op("New model version: drop its blocks", "Object", codes=_DOMAIN),
            "parameters": model},
        "/v1/route": {"post": _op("Choose the node for a request (dry_run: no state change)",
                                  "Object", body="Route", codes=_DOMAIN)},
        "/v1/complete": {"post": _op("Report a request's completion (cache fill)", "Object",
                                     body="Complete", codes=_DOMAIN)},
        "/v1/complete/batch": {"post": _op(
            "Report several completions at once (one request, one Raft entry): 'results' "
            "holds each report's result or {error: {code, detail}}, in order", "Object",
            body="CompleteBatch", codes=_DOMAIN)},
        "/v1/kv-events": {"post": _op("Engine KV events, idempotent per (node_id, seq)",
                                      "Object", body="KVEvents", codes=_DOMAIN)},
        "/v1/cluster": {"get": _op("Members, leader, term, indexes (as /v1/status)", "Status")},
        "/v1/status": {"get": _op("Members, leader, term, commit and applied index", "Status")},
        "/v1/digest": {"get": _op("SHA-256 of this replica's state (convergence checks)",
                                  "Digest", codes=(503,))},
        "/v1/stats": {"get": _op("Hit rates, reuse, evictions, rejections", "Object",
                                 codes=(503,))},
        "/v1/kv": {"get": _op("Keys by prefix, in order, a page at a time", "KVPage",
                              codes=(400, *_LEADER), query=_SCAN)},
        "/v1/kv/{key}": {
            "get": _op("Read one key", "KVItem", codes=(400, 404, *_LEADER),
                       query=(_CONSISTENCY,)),
            "put": _op("Write one key", "KVWritten", body="KVPut", codes=_KV_WRITE),
            "delete": _op("Delete one key (the body is optional)", "KVDeleted",
                          body="KVDelete", optional_body=True, codes=_KV_WRITE),
            "parameters": _path_param("key", _KEY)},
        "/v1/kv/{key}/cas": {
            "post": _op("Compare and set one key", "KVSwapped", body="KVCas",
                        codes=_KV_WRITE),
            "parameters": _path_param("key", _KEY)},
        "/v1/backup": {"post": _op(
            "Snapshot this member's state now and download it (for `cache-plane restore`); "
            "any member answers, no redirect", None, media="application/octet-stream",
            codes=(503, 504))},
        "/v1/cluster/members": {"post": _op(
            "Add a Raft member (one change at a time; refused while the members after it "
            "would have no reachable majority)", "MemberAdded", body="AddMember",
            codes=(409, *_LEADER))},
        "/v1/cluster/members/{raft}": {
            "delete": _op("Remove a Raft member (not the leader)", "MemberRemoved",
                          codes=(400, 404, 409, *_LEADER)),
            "parameters": _path_param("raft", ADDRESS)},
        "/v1/cache/entries": {
            "post": _op("Store a response (the leader stamps its expiry and compresses it; "
                        "least recently used entries are evicted past the byte budget)",
                        "Object", body="CachePut", codes=_DOMAIN),
            "get": _op("Entries' metadata in key order, a page at a time; 'rev' is where the "
                       "change feed continues", "Object", codes=(400, 503),
                       query=_CACHE_PAGE)},
        "/v1/cache/entries/{key}": {
            "get": _op("One entry: its metadata and the stored response (this member's "
                       "replica)", "Object", codes=(400, 404, 503)),
            "delete": _op("Delete one entry", "Object", codes=_DOMAIN),
            "parameters": _path_param("key", CACHE_KEY)},
        "/v1/cache/changes": {"get": _op(
            "The change feed: keys changed after revision 'since', each with its entry "
            "(null: gone); waits up to wait_ms for one; reset: reload the entries",
            "Object", codes=(400, 503), query=_CACHE_FEED)},
        "/v1/cache/touch": {"post": _op("Entries served from gateway memory: move them to "
                                        "the recent end of the LRU order (batched)", "Object",
                                        body="CacheTouch", codes=_DOMAIN)},
        "/v1/cache/purge": {"post": _op("Delete the entries of a tenant, model and/or "
                                        "namespace", "Object", body="CachePurge",
                                        codes=_DOMAIN)},
        "/v1/cache/stats": {"get": _op("Entries, bytes, stores, evictions, expiries, "
                                       "invalidations, purges", "Object", codes=(503,))},
        "/health/live": {"get": _op("Process is up", "Live")},
        "/health/ready": {"get": _op("Member with a known leader, caught up", "Ready",
                                     codes=(503,))},
        "/metrics": {"get": _op("Prometheus metrics (text exposition format 0.0.4)", None,
                                media="text/plain")},
        "/openapi.json": {"get": _op("This document", "Object")},
        "/docs": {"get": _op("A page listing the endpoints", None, media="text/html")},
    }


def operations(doc: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The (METHOD, path template) of every operation in an OpenAPI document."""
    return {(method.upper(), path) for path, item in doc["paths"].items()
            for method in item if method != "parameters"}


def document(access: Mapping[tuple[str, str], str] | None = None) -> dict[str, Any]:
    """Build the OpenAPI document served at /openapi.json.

    `access` is the endpoint -> role table (default: the app's `ACCESS_TABLE`); each
    operation needs the role `veristore_py.auth.required_role` finds in it.
    """
    if access is None:
        from .app import ACCESS_TABLE  # (here: app.py imports this module)

        access = ACCESS_TABLE
    paths = _paths()
    for path, item in paths.items():
        for method, op in item.items():
            if method == "parameters":
                continue
            role = required_role(access, method.upper(), path)
            if role == PUBLIC:
                op["security"] = []
                continue
            op["security"] = [{"bearer": [role]}]
            op["responses"]["401"] = _error(401)
            if role != ROLES[0]:  # no token is weaker than read
                op["responses"]["403"] = _error(403)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-serving-cache control plane", "version": "0.1.0",
            "description": (
                "KV-cache aware routing for LLM inference fleets, on a Raft-replicated store. "
                "Writes and linearizable reads go to the Raft leader (followers answer 307). "
                "Errors are JSON `{error, detail, definite}`. Each operation's bearer scope "
                "is the role it needs (read < route < admin; a token of a stronger role "
                "passes); operations with `security: []` need no token, and none does when a "
                "member runs without tokens (insecure mode). Every GET also answers HEAD. "
                "Walkthrough: docs/api.md.")},
        "paths": paths,
        "components": {
            "schemas": {**SCHEMAS, **WIRE_SCHEMAS},
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "a token from the member's tokens file; its role ("
                               + " < ".join(ROLES) + ") must be at least the operation's "
                               "scope"}}},
    }
