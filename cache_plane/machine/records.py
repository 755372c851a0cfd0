"""The machine's LMDB key schema and record codecs (one encoder and decoder each). PURE.

Keys, all under ``cp/`` (the prefix index's own records are `blocklog`'s)::

    cp/meta          [next slot, next model code, block-log sequence, stats, last leader time]
    cp/model/<id>    [code, block_size, hash_seed, epoch]
    cp/node/<id>     `node_wire`
    cp/sess/<id>     [node_id, expires_ms]
    cp/req/<id>      `RequestRecord.wire`

Records written by older code lack trailing fields; they read as their defaults.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..calibration import Learned
from ..model import KVSource, Node, StreamState

PREFIX = b"cp/"
META_KEY = b"cp/meta"
MODEL_PREFIX = b"cp/model/"
NODE_PREFIX = b"cp/node/"
SESSION_PREFIX = b"cp/sess/"
REQUEST_PREFIX = b"cp/req/"


def model_key(model_id: str) -> bytes:
    return MODEL_PREFIX + model_id.encode()


def node_key(node_id: str) -> bytes:
    return NODE_PREFIX + node_id.encode()


def session_key(session_id: str) -> bytes:
    return SESSION_PREFIX + session_id.encode()


def request_key(request_id: str) -> bytes:
    return REQUEST_PREFIX + request_id.encode()


def node_wire(node: Node) -> list[Any]:
    return [node.slot, node.address, list(node.models), node.capacity_blocks, node.max_active,
            [list(p) for p in node.labels], node.state, node.active, node.queue,
            node.lease_until_ms, node.last_event_seq, node.prefill_until_ms, node.instance,
            node.reported_used, node.max_running, node.learned.wire(),
            [[rank, stream.wire()] for rank, stream in sorted(node.streams.items())],
            node.kv_source.wire() if node.kv_source else None]


def node_from_wire(node_id: str, w: list[Any]) -> Node:
    return Node(node_id, w[0], w[1], tuple(w[2]), w[3], w[4], tuple(tuple(p) for p in w[5]),
                w[6], w[7], w[8], w[9], w[10], w[11] if len(w) > 11 else 0,
                w[12] if len(w) > 12 else "", w[13] if len(w) > 13 else -1,
                w[14] if len(w) > 14 else 0,
                Learned.from_wire(w[15]) if len(w) > 15 else Learned(),
                {rank: StreamState.from_wire(sw) for rank, sw in w[16]} if len(w) > 16 else {},
                KVSource(*w[17]) if len(w) > 17 and w[17] else None)



@dataclass(slots=True)
class RequestRecord:
    node: str
    model: int
    blocks: tuple[int, ...]
    pending: tuple[int, ...]
    expires_ms: int
    route_type: str = "miss"
    matched: int = 0
    routed_ms: int = 0          # the leader's clock when it was routed
    expected_wait_ms: int = 0   # the wait the load model expected for it (calibration)
    clear: bool = False         # it found a free slot and at most one step of prefill ahead

    def wire(self) -> list[Any]:
        return [self.node, self.model, list(self.blocks), list(self.pending), self.expires_ms,
                self.route_type, self.matched, self.routed_ms, self.expected_wait_ms,
                self.clear]


@dataclass(slots=True)
class Stats:
    routes: dict[str, int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    blocks_requested: int = 0
    blocks_reused: int = 0
    tokens_reused: int = 0
    evictions: int = 0
    replanned: int = 0  # leader decisions that no longer held at apply and were re-decided

    def wire(self) -> list[Any]:
        return [self.routes, self.rejections, self.blocks_requested, self.blocks_reused,
                self.tokens_reused, self.evictions, self.replanned]



def consume(iterator: Iterable[object]) -> None:
    deque(iterator, maxlen=0)


def by_model(keys: Iterable[int]) -> dict[int, list[int]]:
    """Index keys grouped by model code (groups in code order, keys in their given order)."""
    groups: dict[int, list[int]] = {}
    for key in keys:
        groups.setdefault(key >> 64, []).append(key)
    return dict(sorted(groups.items()))
