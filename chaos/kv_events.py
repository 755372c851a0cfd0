"""`python -m chaos kv-events`: faults on the engines' KV-event wire and on the cluster leader,
under gateway load; then check that the index holds exactly what every engine holds.

A `GatewayStack` with ``kv_events_zmq`` (3 members, 2 sim-nodes publishing vLLM's ZMQ frames,
PUB + ROUTER replay, no HTTP reports; 2 gateways) serves a steady load from concurrent
`openai` clients, each prompt a shared system prefix and a question of new words (new blocks
every time). The engines' KV pools (`capacity_blocks`) are by default too large to fill in a
run: with a full pool the index's own evictions lose blocks the engine keeps (docs/chaos.md),
a divergence that has nothing to do with the wire. Each cycle the nemesis applies one fault,
the kinds taken in rounds shuffled by the seed:

- ``drop-live``: the next 2-8 live frames of one engine are not sent (replay still has them);
- ``reorder-live``: the next 2-6 live frames of one engine go out in reverse order;
- ``restart-publisher``: one engine restarts (seq back to 0, replay buffer and prefix cache
  emptied); the clients pause until no request is in flight first, since the simulator keeps
  running requests' blocks across the restart where a real engine would fail them;
- ``kill-leader``: SIGKILL of the cluster leader, restarted 1-2 s later.

Wire faults wait until the leader follows the target stream live: a stream being replayed
(rebuilt after a leader change, say) would absorb them.

Clients record every request as ``ok``, ``fail`` (an HTTP error status) or ``info`` (no
answer: a hang or a reset). At the end, after the load stops, the checker waits (up to
`quiesce_s`) for:

- **caught up**: every stream's replicated watermark (`kv_streams[0].last_seq` on the leader)
  is the engine's last published seq (`GET /sim/kv-events` ``next_seq - 1``);
- **index = engine**: every node's indexed blocks (`GET /v1/nodes/{id}/blocks`, placed but
  not yet stored ones aside) equal the engine's (`GET /sim/blocks`); differences are named;
- **replicas equal**: every member's `GET /v1/digest` is the same at one applied index;
- **requests kept succeeding**: no ``info`` at all, a ``fail`` only with 429/502/503/504 and
  inside a leader failover window (kill to new leader agreed plus 3 s), and some ``ok`` in
  every cycle.

The stack's directory is removed after a pass and kept after a failure (its path is printed:
`cluster/node*/node.log`, `gpu*.log`, `gateway*.log`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack
import openai
import zmq

from cache_plane.sim.stack import MODEL, GatewayStack

FAULTS = ("drop-live", "reorder-live", "restart-publisher", "kill-leader")
COUNTERS = ("gaps", "replays", "resyncs", "restarts", "rebuilds", "duplicates")
FAILOVER_STATUSES = (429, 502, 503, 504)
FAILOVER_GRACE_S = 3.0
# Zero latency: the stack measures itself.
ENGINE_ARGS = ("--prefill-ms-per-token", "0", "--prefill-base-ms", "0", "--decode-base-ms", "0",
               "--decode-ms-per-seq", "0")
# Large enough that neither an engine nor the index evicts in a run of a few minutes (about
# 400 new blocks a second per engine; see the module docstring).
CAPACITY_BLOCKS = 200_000


@dataclass(frozen=True, slots=True)
class Op:
    """One client request: when it was invoked and answered (monotonic s), and how."""

    worker: int
    start: float
    end: float
    outcome: str            # "ok", "fail" (an HTTP error status) or "info" (no answer)
    detail: str = ""


@dataclass
class Fault:
    cycle: int
    kind: str
    target: str             # "gpu0", "gpu1" or "node2" (a cluster member)
    detail: str
    at: float
    healed: float = 0.0     # for kill-leader: new leader agreed after the restart
    waited: float = 0.0     # for wire faults: seconds until the stream was followed live
    effect: dict[str, int] = field(default_factory=dict)  # stream counter deltas


@dataclass
class KVEventsReport:
    cycles: int
    seed: int
    history: list[Op] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)
    digests: list[Any] = field(default_factory=list)
    router_evictions: int = 0  # blocks the index evicted on its own (/v1/stats evictions)
    converged_after_s: float | None = None
    elapsed_s: float = 0.0
    kept_dir: str | None = None
    diagnosis: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations


def schedule(cycles: int, seed: int, faults: tuple[str, ...] = FAULTS) -> list[str]:
    """The fault of each cycle: `faults` in rounds, each round shuffled by `seed`."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < cycles:
        round_ = list(faults)
        rng.shuffle(round_)
        out.extend(round_)
    return out[:cycles]


# -- the workload -------------------------------------------------------------------------------

class Load:
    """Concurrent openai clients through the gateways; a gate the nemesis can close."""

    def __init__(self, stack: GatewayStack, history: list[Op], seed: int,
                 concurrency: int = 4) -> None:
        self.stack, self.history, self.seed, self.concurrency = stack, history, seed, concurrency
        self.stop = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0

    async def run(self) -> None:
        await asyncio.gather(*(self._worker(w) for w in range(self.concurrency)))

    async def paused(self, timeout: float = 30.0) -> None:
        """Close the gate and wait until no request is in flight."""
        self.gate.clear()
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _worker(self, w: int) -> None:
        rng = random.Random(self.seed * 1000 + w)
        async with openai.AsyncOpenAI(base_url=self.stack.gateway_url(w % 2), max_retries=0,
                                      api_key=self.stack.api_key, timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                await self.gate.wait()
                n += 1
                system = f"You are assistant number {rng.randrange(4)}. " * 12
                question = " ".join(f"w{w}q{n}x{k}" for k in range(8))  # new blocks
                self.in_flight += 1
                start = time.monotonic()
                try:
                    await client.chat.completions.create(
                        model=MODEL, max_tokens=2, messages=[
                            {"role": "system", "content": system},
                            {"role": "user", "content": question}])
                    self.history.append(Op(w, start, time.monotonic(), "ok"))
                except openai.APIStatusError as exc:
                    self.history.append(Op(w, start, time.monotonic(), "fail",
                                           str(exc.status_code)))
                except openai.APIError as exc:  # no answer: a hang or a reset
                    self.history.append(Op(w, start, time.monotonic(), "info",
                                           f"{type(exc).__name__}: {str(exc)[:160]}"))
                finally:
                    self.in_flight -= 1


# -- observation --------------------------------------------------------------------------------

class Observer:
    """What the harness reads: the leader's views, the sim-nodes' views, every digest."""

    def __init__(self, stack: GatewayStack, session: aiohttp.ClientSession) -> None:
        assert stack.cluster is not None
        self.stack, self.cluster, self.session = stack, stack.cluster, session

    async def get(self, url: str, cluster: bool = True) -> Any:
        headers = self.cluster.auth_headers if cluster else {}
        async with self.session.get(url, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=5)) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def leader_url(self) -> str:
        leader = await asyncio.to_thread(self.cluster.wait_for_leader)
        return self.cluster.nodes[leader].url

    async def stream(self, leader: str, i: int) -> dict[str, Any]:
        """The replicated record of engine `i`'s stream ({} before its first batch)."""
        streams = (await self.get(f"{leader}/v1/nodes/gpu{i}"))["kv_streams"]
        return dict(streams[0]) if streams else {}

    async def counters(self) -> dict[str, dict[str, int]]:
        leader = await self.leader_url()
        return {f"gpu{i}": {k: (await self.stream(leader, i)).get(k, 0) for k in COUNTERS}
                for i in range(self.stack.engines)}

    async def wait_live(self, i: int, timeout: float = 45.0) -> float:
        """Wait until the leader follows engine `i`'s stream live (not replaying: a rebuild
        after a leader change takes a while); the seconds waited (`timeout` if it never did)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                node = await self.get(f"{await self.leader_url()}/v1/nodes/gpu{i}")
                if all(s.get("phase") == "live" for s in node.get("kv_ingest") or [{}]):
                    break
            await asyncio.sleep(0.1)
        return time.monotonic() - start

    async def engine(self, i: int, path: str) -> Any:
        return await self.get(self.stack.engine_url(i) + path, cluster=False)

    async def post_engine(self, i: int, body: dict[str, Any]) -> Any:
        async with self.session.post(self.stack.engine_url(i) + "/sim/kv-events", json=body,
                                     timeout=aiohttp.ClientTimeout(total=10)) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def compare(self, i: int) -> dict[str, Any]:
        """Engine `i` as the leader indexes it and as the engine is."""
        leader = await self.leader_url()
        view = await self.get(f"{leader}/v1/nodes/gpu{i}/blocks")
        tiers = {block: tier for blocks in view["models"].values() for block, tier in blocks}
        indexed = {block for block, tier in tiers.items() if tier != "pending"}
        held = set((await self.engine(i, "/sim/blocks"))["blocks"])
        published = (await self.engine(i, "/sim/kv-events"))["next_seq"] - 1
        stream = await self.stream(leader, i)
        last_seq = stream.get("last_seq", -1)
        return {"indexed": len(indexed), "held": len(held), "missing": sorted(held - indexed),
                "extra": sorted(indexed - held), "last_seq": last_seq, "published": published,
                "caught_up": last_seq == published,
                "tiers": {b: tiers[b] for b in held ^ indexed if b in tiers},
                **{k: stream.get(k, 0) for k in COUNTERS}}

    async def digests(self) -> list[Any]:
        return list(await asyncio.gather(*(self.get(node.url + "/v1/digest")
                                           for node in self.cluster.nodes)))


# -- the nemesis --------------------------------------------------------------------------------

async def strike(kind: str, cycle: int, rng: random.Random, obs: Observer, load: Load,
                 hold_s: float) -> Fault:
    """Apply one fault (for kill-leader: kill, wait `hold_s`, restart, wait for a leader)."""
    cluster = obs.cluster
    engine = rng.randrange(obs.stack.engines)
    if kind == "kill-leader":
        leader = await asyncio.to_thread(cluster.wait_for_leader)
        fault = Fault(cycle, kind, f"node{leader}", f"down {hold_s:.1f} s", time.monotonic())
        await asyncio.to_thread(cluster.kill, leader)
        await asyncio.sleep(hold_s)
        await asyncio.to_thread(cluster.start_node, leader)
        await asyncio.to_thread(cluster.wait_for_leader)
        fault.healed = time.monotonic()
        return fault
    # A wire fault on a stream being replayed would be absorbed by the replay: strike live.
    waited = await obs.wait_live(engine)
    if kind == "restart-publisher":
        await load.paused()
        fault = Fault(cycle, kind, f"gpu{engine}", "seq -> 0, buffer and cache emptied",
                      time.monotonic(), waited=waited)
        try:
            await obs.post_engine(engine, {"restart": True})
        finally:
            load.gate.set()
        return fault
    n = rng.randint(2, 8) if kind == "drop-live" else rng.randint(2, 6)
    fault = Fault(cycle, kind, f"gpu{engine}", f"n={n}", time.monotonic(), waited=waited)
    await obs.post_engine(engine, {kind.replace("-", "_"): n})
    return fault


def trace_blocks(replay_endpoint: str, blocks: set[int], timeout_s: float = 5.0) -> list[str]:
    """Every event in the engine's replay buffer that names one of `blocks` (array layout, int
    hashes: the stack's defaults), read straight off the wire: to tell a lost event from one
    the cluster mis-applied."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(replay_endpoint)
    out = []
    try:
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        while dealer.poll(int(timeout_s * 1000)):
            frames = dealer.recv_multipart()
            if frames[-2:] == [b"\xff" * 8, b""]:
                break
            seq = int.from_bytes(frames[1], "big")
            for event in msgpack.unpackb(frames[2])[1]:
                named = [h for h in event[1] if h in blocks] if len(event) > 1 else []
                out += [f"seq {seq}: {event[0]} {h}" for h in named]
    finally:
        ctx.destroy(linger=0)
    return out


# -- the checker (pure) -------------------------------------------------------------------------

def check_history(history: list[Op], faults: list[Fault],
                  cycle_spans: list[tuple[float, float]]) -> list[str]:
    """Violations in the clients' history: answers missing, failures outside failovers,
    cycles without a success."""
    windows = [(f.at, (f.healed or f.at) + FAILOVER_GRACE_S) for f in faults
               if f.kind == "kill-leader"]
    problems = []
    info = [op for op in history if op.outcome == "info"]
    if info:
        problems.append(f"{len(info)} requests got no answer: {[op.detail for op in info[:3]]}")
    fails = [op for op in history if op.outcome == "fail"]
    wrong = [op for op in fails if int(op.detail) not in FAILOVER_STATUSES]
    if wrong:
        problems.append(f"{len(wrong)} requests failed with {sorted({op.detail for op in wrong})}")
    outside = [op for op in fails if not any(op.end >= a and op.start <= b for a, b in windows)]
    if outside:
        problems.append(f"{len(outside)} requests failed outside a leader failover "
                        f"(statuses {sorted({op.detail for op in outside})})")
    for c, (a, b) in enumerate(cycle_spans, 1):
        if not any(op.outcome == "ok" and a <= op.end <= b for op in history):
            problems.append(f"no request succeeded in cycle {c}")
    return problems


def check_streams(streams: dict[str, dict[str, Any]]) -> list[str]:
    """Violations in the final comparison of each engine with its index."""
    problems = []
    for name, s in streams.items():
        if not s["caught_up"]:
            problems.append(f"{name}: stream behind: the cluster applied up to seq "
                            f"{s['last_seq']}, the engine published up to {s['published']}")
        if s["missing"] or s["extra"]:
            problems.append(
                f"{name}: index diverged: {len(s['missing'])} blocks the engine holds are not "
                f"indexed (e.g. {s['missing'][:3]}), {len(s['extra'])} indexed blocks the "
                f"engine does not hold (e.g. {s['extra'][:3]}); indexed {s['indexed']}, "
                f"held {s['held']}")
    return problems


# -- the run ------------------------------------------------------------------------------------

def _delta(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]],
           names: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in names:
        for k in COUNTERS:
            d = after[name][k] - before[name][k]
            if d:
                out[k] = out.get(k, 0) + d
    return out


async def run_kv_events_chaos(cycles: int, seed: int, faults: tuple[str, ...] = FAULTS,
                              cycle_s: float = 3.0, quiesce_s: float = 60.0,
                              capacity_blocks: int = CAPACITY_BLOCKS,
                              progress: bool = True) -> KVEventsReport:
    report = KVEventsReport(cycles, seed)
    began = time.monotonic()
    rng = random.Random(seed)
    base = tempfile.mkdtemp(prefix="chaos-kv-events-")
    try:
        engine_args = (*ENGINE_ARGS, "--capacity-blocks", str(capacity_blocks))
        with GatewayStack(base, engines=2, gateways=2, engine_args=engine_args,
                          kv_events_zmq=True) as stack:
            async with aiohttp.ClientSession() as session:
                await _run(stack, Observer(stack, session), report, rng, faults, cycle_s,
                           quiesce_s, progress)
    except Exception as exc:  # the harness or the stack broke: a failed run, with its logs
        traceback.print_exc()
        report.violations.append(f"run aborted: {type(exc).__name__}: {exc}")
    report.elapsed_s = time.monotonic() - began
    if report.passed:
        shutil.rmtree(base, ignore_errors=True)
    else:
        report.kept_dir = base
    return report


async def _run(stack: GatewayStack, obs: Observer, report: KVEventsReport, rng: random.Random,
               faults: tuple[str, ...], cycle_s: float, quiesce_s: float,
               progress: bool) -> None:
    load = Load(stack, report.history, report.seed)
    running = asyncio.create_task(load.run())
    spans: list[tuple[float, float]] = []
    try:
        await asyncio.sleep(cycle_s / 2)  # warm up: every stream subscribed and flowing
        for cycle, kind in enumerate(schedule(report.cycles, report.seed, faults), 1):
            start = time.monotonic()
            before = await obs.counters()
            fault = await strike(kind, cycle, rng, obs, load, rng.uniform(1.0, 2.0))
            await asyncio.sleep(max(cycle_s - (time.monotonic() - start), cycle_s / 2))
            names = [f"gpu{i}" for i in range(stack.engines)] if kind == "kill-leader" \
                else [fault.target]
            fault.effect = _delta(await obs.counters(), before, names)
            report.faults.append(fault)
            spans.append((start, time.monotonic()))
            if progress:
                print(f"  cycle {cycle}/{report.cycles}: {_describe(fault)}", flush=True)
    finally:
        load.stop.set()
        load.gate.set()
        await running
    stopped = time.monotonic()
    deadline = stopped + quiesce_s
    while True:
        try:
            report.streams = {f"gpu{i}": await obs.compare(i) for i in range(stack.engines)}
        except (aiohttp.ClientError, TimeoutError):
            report.streams = {}  # a member still electing: ask again
        if report.streams and not check_streams(report.streams):
            report.converged_after_s = time.monotonic() - stopped
            break
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    report.violations += check_streams(report.streams) if report.streams \
        else ["the cluster did not answer at quiescence"]
    leader = await obs.leader_url()
    report.router_evictions = (await obs.get(leader + "/v1/stats"))["evictions"]
    for i in range(stack.engines):
        s = report.streams.get(f"gpu{i}")
        if s and (s["missing"] or s["extra"]):
            named = set(s["missing"][:3] + s["extra"][:3])
            report.diagnosis.append(f"gpu{i} index tiers of the differing blocks: "
                                    f"{ {b: s['tiers'].get(b) for b in named} }")
            report.diagnosis += [f"gpu{i} wire: {line}" for line in await asyncio.to_thread(
                trace_blocks, f"tcp://127.0.0.1:{stack.zmq_ports[i][1]}", named)]
    for _ in range(40):
        report.digests = await obs.digests()
        if len({(d["applied_index"], d["digest"]) for d in report.digests}) == 1:
            break
        await asyncio.sleep(0.25)
    else:
        report.violations.append(f"replicas differ: {report.digests}")
    report.violations += check_history(report.history, report.faults, spans)


def _describe(fault: Fault) -> str:
    effect = ", ".join(f"{k} +{v}" for k, v in fault.effect.items()) or "no counter moved"
    waited = f", after {fault.waited:.1f} s until live" if fault.waited >= 0.5 else ""
    return f"{fault.kind} {fault.target} ({fault.detail}{waited}): {effect}"


def kv_events_summary(report: KVEventsReport) -> str:
    kinds = {k: sum(f.kind == k for f in report.faults) for k in FAULTS}
    ok = sum(op.outcome == "ok" for op in report.history)
    fails: dict[str, int] = {}
    for op in report.history:
        if op.outcome != "ok":
            key = op.detail if op.outcome == "fail" else "no answer"
            fails[key] = fails.get(key, 0) + 1
    lines = [f"kv-events chaos: seed {report.seed}, {report.cycles} fault cycles in "
             f"{report.elapsed_s:.1f} s"]
    for kind, n in kinds.items():
        if n:
            effect: dict[str, int] = {}
            for f in report.faults:
                for k, v in f.effect.items() if f.kind == kind else ():
                    effect[k] = effect.get(k, 0) + v
            lines.append(f"  {kind} x{n}: stream counters " + (", ".join(
                f"{k} +{v}" for k, v in effect.items()) or "unchanged"))
    lines.append(f"  requests ok {ok}, failed {fails or 'none'}")
    for name, s in report.streams.items():
        lines.append(f"  {name}: seq 0..{s['published']}, applied to {s['last_seq']}, blocks "
                     f"indexed/held {s['indexed']}/{s['held']}; "
                     + ", ".join(f"{k} {s[k]}" for k in COUNTERS))
    lines.append(f"  blocks the index evicted on its own: {report.router_evictions}")
    if report.converged_after_s is not None:
        lines.append(f"  converged {report.converged_after_s:.1f} s after the load stopped")
    if report.digests:
        lines.append(f"  digests at applied index "
                     f"{sorted({d['applied_index'] for d in report.digests})}: "
                     f"{'equal' if len({d['digest'] for d in report.digests}) == 1 else 'DIFFER'}")
    lines += [f"  {line}" for line in report.diagnosis]
    if report.kept_dir:
        lines.append(f"  logs kept in {report.kept_dir} (cluster/node*/node.log, gpu*.log)")
    lines.append("  PASS" if report.passed else "  FAIL: " + "; ".join(report.violations))
    return "\n".join(lines)
