"""Routing, admission, placement and eviction planning. PURE functions over the index.

Order of decision (the seed router's, made load-aware):
1. session affinity: the session's node, if it is eligible and not overloaded;
2. otherwise every eligible node is scored by the prefill work the request would wait for
   there: the prompt blocks it cannot reuse (tier-weighted) plus the node's prefill backlog,
   as a fraction of the prompt, minus `load_weight` x load (active + queued per allowed active
   request). score = (weighted overlap - backlog_weight x backlog) / prompt blocks
   - load_weight x load (backlog_weight 1.0), so 1.0 is a full hit on an idle node, and reuse
   wins until the node holding the prefix has more prefill queued than the prefix would save
   (NVIDIA Dynamo's cost function has this shape).
   The backlog is estimated from the node's `prefill_until_ms`: every route adds its new
   tokens at the fleet's prefill rate (`prefill_tokens_per_s`, stamped by the leader), and
   the estimate drains as time passes; routes the leader has sent but not applied add theirs;
   and a node running more than `balance_slack` (1.5) times the fleet's mean of active
   requests loses `balance_weight` (1.0) per unit above that (both +1-smoothed), so a popular
   prefix spills to other nodes before one node carries the fleet; a request that starts a
   session is balanced tighter (slack `session_balance_slack`, 1.0), on active requests and
   again on the sessions each node already holds (the session's later turns follow it);
3. a prompt with no reuse anywhere is a miss, placed by the same score (least backlog wins),
   then fewest evictions, then most free blocks.
A node is eligible when it is up, serves the model, is below its max active requests, and
can hold the prompt's new blocks after evicting unpinned least-recently-used blocks (never the
blocks this prompt reuses, never blocks pinned by active requests).
Rejections say why: no node serves the model, none is up, all are busy, the prompt can never
fit, or no node has room right now.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from .index import PrefixIndex
from .model import Candidate, ModelSpec, Node, RouteDecision

_NONE: Mapping[str, tuple[int, int]] = {}


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Weights of the scorer; defaults favour reuse until a node is clearly busier."""

    load_weight: float = 0.5
    backlog_weight: float = 1.0
    balance_weight: float = 1.0
    balance_slack: float = 1.5
    session_balance_slack: float = 1.0
    session_max_load: float = 1.0


DEFAULT_POLICY = PolicyConfig()


def route_type(matched: int, total: int) -> str:
    if total and matched == total:
        return "exact"
    return "prefix" if matched else "miss"


def plan_eviction(index: PrefixIndex, slot: int, count: int, is_pinned: Callable[[int, int], bool],
                  keep: AbstractSet[int] = frozenset()) -> list[int] | None:
    """The `count` least recently used unpinned keys on `slot` not in `keep`, or None."""
    if count <= 0:
        return []
    victims = []
    for key in index.lru_keys(slot):
        if key in keep or is_pinned(slot, key):
            continue
        victims.append(key)
        if len(victims) == count:
            return victims
    return None


def decide(model: ModelSpec, keys: Sequence[int], nodes: Sequence[Node], index: PrefixIndex,
           is_pinned: Callable[[int, int], bool], pinned_count: Callable[[int], int],
           session_node: str | None = None, config: PolicyConfig = DEFAULT_POLICY,
           inflight: Mapping[str, tuple[int, int]] = _NONE, now_ms: int = 0,
           prefill_tokens_per_s: int = 0,
           sessions: Mapping[str, int] | None = None) -> RouteDecision:
    """Choose a node for a prompt (the index keys of its chained block hashes) of `model`.

    `inflight` maps a node to the (routes, new blocks) the leader has decided for it but not
    yet applied; they count as active requests and backlog, so concurrent decisions do not all
    pick the same node. Without `prefill_tokens_per_s` there is no backlog term. `sessions`
    (live sessions per node) is given when the request starts a session: its later turns will
    follow it, so sessions are balanced like active requests.
    """
    per_ms = prefill_tokens_per_s / 1000 / max(model.block_size, 1)  # blocks per ms
    total = len(keys)
    serving = [n for n in nodes if model.id in n.models and n.state != "down"]
    if not serving:
        return _reject(total, "no_node_for_model", f"no node serves model {model.id!r}")
    serving.sort(key=lambda n: n.id)
    matches = index.match(keys, [n.slot for n in serving])
    candidates: list[Candidate] = []
    loads: dict[str, float] = {}
    up = [n for n in serving if n.state == "up"] or serving
    mean_active = sum(n.active + inflight.get(n.id, (0, 0))[0] for n in up) / len(up)
    mean_sessions = sum(sessions.get(n.id, 0) for n in up) / len(up) if sessions else 0.0
    # A request that starts a session brings its later turns along: balance tighter.
    slack = config.balance_slack if sessions is None else config.session_balance_slack
    for node in serving:
        match = matches.get(node.slot)
        overlap = match.blocks if match else 0
        weighted = match.weighted if match else 0.0
        used = index.used(node.slot)
        free = max(node.capacity_blocks - used, 0)
        new_blocks = total - overlap
        evict = max(new_blocks - free, 0)
        sent, sent_blocks = inflight.get(node.id, (0, 0))
        active = node.active + sent
        queued_blocks = sent_blocks + int(max(node.prefill_until_ms - now_ms, 0) * per_ms)
        load = loads[node.id] = (active + node.queue) / max(node.max_active, 1)
        reason = ""
        if node.state != "up":
            reason = "draining"
        elif active >= node.max_active:
            reason = "busy"
        elif total > node.capacity_blocks:
            reason = "too_small"
        elif evict and evict > _evictable(node.slot, used, keys[:overlap], is_pinned,
                                          pinned_count):
            reason = "no_room"
        excess = max((active + 1) / (mean_active + 1) - slack, 0.0)
        if sessions is not None:
            excess += max((sessions.get(node.id, 0) + 1) / (mean_sessions + 1) - slack, 0.0)
        score = ((weighted - config.backlog_weight * queued_blocks) / total if total else 0.0) \
            - config.load_weight * load - config.balance_weight * excess
        candidates.append(Candidate(node.id, overlap, weighted, load, free, evict, score,
                                    not reason, reason, queued_blocks))
    eligible = [c for c in candidates if c.eligible]
    by_id = {n.id: n for n in serving}
    if not eligible:
        reasons = {c.reason for c in candidates}
        if reasons <= {"draining"}:
            return _reject(total, "no_node_up", "every node serving the model is draining",
                           candidates)
        if "too_small" in reasons and reasons <= {"too_small", "draining"}:
            return _reject(total, "prompt_too_large",
                           f"{total} blocks exceed every node's KV capacity", candidates)
        if "no_room" not in reasons:
            return _reject(total, "all_nodes_busy", "every node is at its max active requests",
                           candidates)
        return _reject(total, "no_room", "no node can free enough unpinned blocks", candidates)
    chosen = None
    kind = None
    if session_node is not None:
        session = next((c for c in eligible if c.node_id == session_node), None)
        if session is not None and loads[session.node_id] < config.session_max_load:
            chosen, kind = session, "session"
    if chosen is None:
        chosen = min(eligible, key=lambda c: (-c.score, c.evict_blocks, c.load, -c.free_blocks,
                                              c.node_id))
        kind = route_type(chosen.overlap_blocks, total)
    node = by_id[chosen.node_id]
    keep = set(keys[:chosen.overlap_blocks]) if chosen.evict_blocks else frozenset()
    victims = plan_eviction(index, node.slot, chosen.evict_blocks, is_pinned, keep)
    if victims is None:  # pinned_count was optimistic (pins on blocks of other models)
        return _reject(total, "no_room", "chosen node cannot free enough unpinned blocks",
                       candidates)
    return RouteDecision(node.id, kind, chosen.overlap_blocks, total, tuple(victims),
                         tuple(candidates))


def _evictable(slot: int, used: int, reused: Sequence[int],
               is_pinned: Callable[[int, int], bool], pinned_count: Callable[[int], int]) -> int:
    """Blocks node `slot` could evict: not pinned, and not among the blocks this prompt reuses."""
    unpinned_reused = sum(1 for key in reused if not is_pinned(slot, key))
    return used - pinned_count(slot) - unpinned_reused


def _reject(total: int, code: str, detail: str,
            candidates: Sequence[Candidate] = ()) -> RouteDecision:
    return RouteDecision(None, None, 0, total, (), tuple(candidates), code, detail)
