"""Routing, admission, placement and eviction planning. PURE functions over the index.

Order of decision (the seed router's, made load-aware):
1. session affinity: the session's node, if it is eligible and has a free running slot
   (load below `session_max_load`, 1.0: running + waiting requests per running slot);
2. otherwise every eligible node is priced by one load model in one unit, the milliseconds
   until this request's first token there (`load_model`):
       ttft = fixed + backlog + queue + prefill
   - fixed: the part of a time to first token that does not grow with the prompt (the step
     that admits it, per-request overheads; learned, one decode step until then);
   - backlog: the prefill still running for requests that hold a slot (`prefill_until_ms`,
     advanced by each route that finds a free slot and by each queued request that takes a
     freed one; it drains on the leader's clock only while the work can actually run);
   - queue: with every running slot taken (`max_running`, or fewer when the KV cache holds
     fewer requests of the node's mean size: `running_slots`), the request waits for `ahead`
     requests to finish,
     one every `output_tokens x decode_ms_per_token / slots` on average, plus the prefill of
     the requests queued before it. `ahead` counts the engine-reported running and waiting
     requests, the leader's routes since the last heartbeat (applied, and proposed but not
     yet applied) minus the completions reported since;
   - prefill: the prompt's uncached tokens x the node's prefill time per token; the cached
     prefix (tier-weighted) saves `saved_ms`, the prefix's value in the same unit.
   The speeds (prefill ms per token and a time to first token's fixed part, decode ms per
   output token, mean output and uncached prompt tokens) are the node's own, learned from its
   completion reports (`calibration`; prefill shrunk towards the fleet's), with the settings
   as priors.
   The cost minimised is ttft plus three penalties, all in milliseconds. Where load sits is
   priced in the fleet's units (mean decode step `step`, mean output `output`): a node's own
   learned decode speed partly reflects its current load, and would count it twice.
   - work (`work_weight`, 3.0): the prefill this node would do beyond the least any node
     would do, x its load (requests per running slot, capped at 2): a miss on a busy node
     stalls every request batched with it, so prefix reuse is worth more where load is;
   - load (`load_weight`, 16.0): load x `step` per unit, a steady preference for emptier
     nodes (16 decode steps per unit of load);
   - balance (`balance_weight`, 0.5): a node holding more than `balance_slack` (1.3) times
     the fleet's mean of requests (running + queued + in flight, +1-smoothed) pays the
     excess x one request's service time (`output x step`), so a popular prefix spills
     before one node carries the fleet; a request that starts a session is balanced tighter
     (`session_balance_slack`, 1.0), on requests and again on the sessions each node already
     holds (its later turns follow it).
   The weights were chosen on the routing sweep (`benchmarks/routing_quality.py --sweep`;
   docs/benchmarks.md has the matrix). No term is divided by the prompt's size, and no load
   term grows with it: a 2-block and a 200-block prompt that differ only in where load sits
   get the same node.
3. a prompt with no reuse anywhere is a miss, placed by the same cost, then fewest
   evictions, then most free blocks.
A node is eligible when it is up, serves the model, holds fewer than `max_active` requests
(running + waiting), and can hold the prompt's new blocks after evicting unpinned
least-recently-used blocks (never the blocks this prompt reuses, never blocks pinned by
active requests). Rejections say why: no node serves the model, none is up, all are busy,
the prompt can never fit, or no node has room right now.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from .calibration import DEFAULT_SPEEDS, Speeds, pool, speeds
from .index import PrefixIndex
from .model import Candidate, ModelSpec, Node, RouteDecision

_NONE: Mapping[str, tuple[int, int]] = {}
_NO_SENT = (0, 0)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Weights of the cost's penalties (see the module docstring for each term)."""

    load_weight: float = 16.0
    balance_weight: float = 0.5
    balance_slack: float = 1.3
    session_balance_slack: float = 1.0
    session_max_load: float = 1.0
    work_weight: float = 3.0


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


@dataclass(frozen=True, slots=True)
class Wait:
    """What a node's load makes a new request wait before its own prefill (milliseconds)."""

    backlog_ms: float   # prefill of requests already holding a running slot
    queue_ms: float     # waiting for a running slot, and the prefill of those queued before it


def fleet_speeds(nodes: Iterable[Node], prior: Speeds) -> dict[str, Speeds]:
    """Every node's speeds for the load model: its own shrunk towards the fleet's."""
    nodes = list(nodes)
    fleet = pool(n.learned for n in nodes)
    return {n.id: speeds(n.learned, prior, fleet) for n in nodes}


def running_slots(node: Node, pace: Speeds, block_size: int) -> int:
    """How many requests `node` runs at once: its running slots, or fewer if its KV cache
    holds fewer (KV-limited admission: a running request holds its uncached prompt and its
    output; cached prefixes are shared)."""
    per_request = pace.new_tokens + pace.output_tokens
    if per_request <= 0:
        return max(node.slots, 1)
    return max(min(node.slots, int(node.capacity_blocks * block_size / per_request)), 1)


def load_model(node: Node, pace: Speeds, now_ms: int, block_size: int, sent: int = 0,
               sent_tokens: int = 0, slots: int | None = None) -> Wait:
    """The expected wait of one more request on `node` (see the module docstring).

    `sent` routes (`sent_tokens` uncached prompt tokens) were proposed by the leader and not
    yet applied: they are on their way to the node, ahead of this request. `slots`: its
    `running_slots`, if the caller has them.
    """
    if slots is None:
        slots = running_slots(node, pace, block_size)
    return Wait(*_wait(node, pace, now_ms, node.active + node.queue + sent, sent_tokens, slots))


def _wait(node: Node, pace: Speeds, now_ms: int, requests: int, sent_tokens: int,
          slots: int) -> tuple[float, float]:
    """(backlog_ms, queue_ms) of `load_model`; a plain tuple: `decide` runs it per node."""
    until = node.prefill_until_ms - now_ms
    backlog = (until if until > 0 else 0) + sent_tokens * pace.prefill_ms_per_token
    ahead = requests - slots + 1
    if ahead <= 0:
        return backlog, 0.0
    turnover = pace.output_tokens * pace.decode_ms_per_token / slots
    return backlog, ahead * turnover + (ahead - 1) * pace.new_tokens * pace.prefill_ms_per_token


def decide(model: ModelSpec, keys: Sequence[int], nodes: Sequence[Node], index: PrefixIndex,
           is_pinned: Callable[[int, int], bool], pinned_count: Callable[[int], int],
           session_node: str | None = None, config: PolicyConfig = DEFAULT_POLICY,
           inflight: Mapping[str, tuple[int, int]] = _NONE, now_ms: int = 0,
           prior: Speeds = DEFAULT_SPEEDS,
           sessions: Mapping[str, int] | None = None,
           paces: Mapping[str, Speeds] | None = None) -> RouteDecision:
    """Choose a node for a prompt (the index keys of its chained block hashes) of `model`.

    `inflight` maps a node to the (routes, new blocks) the leader has decided for it but not
    yet applied; they count as requests and backlog, so concurrent decisions do not all pick
    the same node. `prior` holds the settings' speeds, used where a node has learned nothing
    yet; `paces`, if given, are the nodes' speeds already worked out from them (the machine
    caches them). `sessions` (live sessions per node) is given when the request starts a
    session: its later turns will follow it, so sessions are balanced like requests.
    """
    total = len(keys)
    bs = max(model.block_size, 1)
    serving = [n for n in nodes if model.id in n.models and n.state != "down"]
    if not serving:
        return _reject(total, "no_node_for_model", f"no node serves model {model.id!r}")
    serving.sort(key=lambda n: n.id)
    matches = index.match(keys, [n.slot for n in serving])
    candidates: list[Candidate] = []
    loads: dict[str, float] = {}
    up = [n for n in serving if n.state == "up"] or serving
    mean_requests = sum(n.active + n.queue + inflight.get(n.id, (0, 0))[0] for n in up) / len(up)
    mean_sessions = sum(sessions.get(n.id, 0) for n in up) / len(up) if sessions else 0.0
    # A request that starts a session brings its later turns along: balance tighter.
    slack = config.balance_slack if sessions is None else config.session_balance_slack
    if paces is None:
        paces = fleet_speeds(nodes, prior)
    # The least prefill any node would do: work a node adds beyond it is the extra work.
    # Penalties for where load sits are priced in the fleet's units (a node's own learned
    # decode speed is partly its current load: pricing load with it would count load twice).
    step = sum(paces[n.id].decode_ms_per_token for n in serving) / len(serving)
    output = sum(paces[n.id].output_tokens for n in serving) / len(serving)
    least = min((total - (matches[n.slot].weighted if n.slot in matches else 0.0))
                * bs * paces[n.id].prefill_ms_per_token for n in serving)
    balance_weight, load_weight = config.balance_weight, config.load_weight
    work_weight = config.work_weight
    for node in serving:
        match = matches.get(node.slot)
        overlap = match.blocks if match else 0
        weighted = match.weighted if match else 0.0
        used = index.used(node.slot)
        free = node.capacity_blocks - used
        if free < 0:
            free = 0
        new_blocks = total - overlap
        evict = new_blocks - free if new_blocks > free else 0
        sent, sent_blocks = inflight.get(node.id, _NO_SENT)
        requests = node.active + node.queue + sent
        pace = paces[node.id]
        per_token = pace.prefill_ms_per_token
        slots = running_slots(node, pace, bs)
        backlog, queue_ms = _wait(node, pace, now_ms, requests, sent_blocks * bs, slots)
        saved = weighted * bs * per_token
        unsaved = total - weighted
        prefill = (unsaved if unsaved > 0 else 0.0) * bs * per_token
        ttft = pace.fixed_ms + backlog + queue_ms + prefill
        load = loads[node.id] = requests / slots
        reason = ""
        if node.state != "up":
            reason = node.state if node.state == "unreachable" else "draining"
        elif requests >= node.max_active:
            reason = "busy"
        elif total > node.capacity_blocks:
            reason = "too_small"
        elif evict and evict > _evictable(node.slot, used, keys[:overlap], is_pinned,
                                          pinned_count):
            reason = "no_room"
        excess = (requests + 1) / (mean_requests + 1) - slack
        excess = excess if excess > 0 else 0.0
        if sessions is not None:
            more = (sessions.get(node.id, 0) + 1) / (mean_sessions + 1) - slack
            excess += more if more > 0 else 0.0
        extra = prefill - least
        penalty = (balance_weight * excess * step * output
                   + load_weight * load * step
                   + work_weight * (load if load < 2.0 else 2.0) * (extra if extra > 0 else 0.0))
        candidates.append(Candidate(node.id, overlap, weighted, load, free, evict,
                                    -(ttft + penalty), not reason, reason, ttft,
                                    queue_ms, backlog, prefill, saved, penalty,
                                    1000 / per_token, pace.decode_ms_per_token))
    eligible = [c for c in candidates if c.eligible]
    by_id = {n.id: n for n in serving}
    if not eligible:
        reasons = {c.reason for c in candidates}
        if reasons <= {"draining", "unreachable"}:
            return _reject(total, "no_node_up",
                           "every node serving the model is draining or unreachable",
                           candidates)
        if "too_small" in reasons and reasons <= {"too_small", "draining", "unreachable"}:
            return _reject(total, "prompt_too_large",
                           f"{total} blocks exceed every node's KV capacity", candidates)
        if "no_room" not in reasons:
            return _reject(total, "all_nodes_busy",
                           "every node holds its max active requests", candidates)
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
