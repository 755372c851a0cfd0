"""Attack a real 3-member cluster under load and judge the recorded history (Jepsen-style).

Clients (asyncio, through the public HTTP API with the same clients routers use) run a mix of
linearizable reads and compare-and-set writes on a few register keys and puts of unique keys;
routers register inference nodes and a model, then route requests (committed and dry-run)
and report their completion. Every operation's invocation, completion and outcome is
recorded: `ok`, `fail` (a definite error: it did not happen) or `info` (unknown: it may have
happened). A probe writes every 50 ms to time failovers. Between healthy periods a nemesis
(`nemesis.py`) injects one fault, holds it, heals it; then the clients pause while every
replica must reach the same state digest.

At the end: every acknowledged put is read back; each register's history must be
linearizable (`checker.check_register`); route decisions must come from a leader holding its
quorum (`checker.check_decisions`) and the replicated route count must match the acknowledged
routes; convergence must have held after every fault.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cache_plane.client import CachePlaneClient
from veristore_py.client import KeyNotFoundError, VeristoreClient
from veristore_py.errors import VeristoreError
from veristore_py.localcluster import LocalCluster, throwaway_pki

from .checker import (
    INF,
    Op,
    check_acked_writes,
    check_decisions,
    check_register,
    check_route_count,
    failover_stats,
)
from .nemesis import FAULTS, Disks, Nemesis
from .network import Network

REGISTERS = 4
TOKEN = "chaos-suite-token"  # admin: the KV clients write the generic store
ROUTE_TOKEN = "chaos-suite-route-token"  # the routers' role
MODEL = "chaos-model"
INFERENCE_NODES = ("inference-0", "inference-1")


@dataclass
class Report:
    seed: int
    cycles: int
    faults: dict[str, int] = field(default_factory=dict)
    fault_log: list[dict[str, Any]] = field(default_factory=list)
    operations: dict[str, int] = field(default_factory=dict)
    operations_by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    not_ok_reasons: dict[str, int] = field(default_factory=dict)  # most common, for reading
    not_ok_first_at: dict[str, list[float]] = field(default_factory=dict)  # their first times
    lost_writes: list[str] = field(default_factory=list)
    registers: dict[str, str] = field(default_factory=dict)
    decision_violations: list[str] = field(default_factory=list)
    route_count: str | None = None
    stalls: list[dict[str, Any]] = field(default_factory=list)
    convergence: list[dict[str, Any]] = field(default_factory=list)
    failover: dict[str, Any] = field(default_factory=dict)
    failover_by_fault: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def passed(self) -> bool:
        return (not self.lost_writes and "violation" not in self.registers.values()
                and not self.decision_violations and self.route_count is None
                and not self.stalls
                and all(c["converged"] for c in self.convergence))


class History:
    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.start = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.start


async def _run_op(client: VeristoreClient, history: History, pid: int, kind: str, key: str,
                  args: tuple[Any, ...]) -> Op:
    t0 = history.now()
    try:
        if kind == "read":
            try:
                got = await client.get(key)
                result: Any = None if got is None else got["value"]
            except KeyNotFoundError:
                result = None
        elif kind == "cas":
            result = bool((await client.cas(key, args[0], args[1]))["succeeded"])
        else:
            await client.put(key, args[0])
            result = None
        op = Op(pid, kind, key, args, t0, history.now(), "ok", result)
    except VeristoreError as exc:
        outcome = "fail" if exc.definite else "info"
        op = Op(pid, kind, key, args, t0, history.now() if outcome == "fail" else INF, outcome,
                str(exc)[:200])
    history.ops.append(op)
    return op


async def _client(pid: int, urls: list[str], history: History, stop: asyncio.Event,
                  paused: asyncio.Event, rng: random.Random, tls: dict[str, Any]) -> None:
    seen: dict[str, Any] = {}
    n = 0
    async with VeristoreClient(urls, token=TOKEN, timeout=4.0, attempt_timeout=1.0,
                               **tls) as client:
        while not stop.is_set():
            await paused.wait()
            n += 1
            key = f"reg-{rng.randrange(REGISTERS)}"
            roll = rng.random()
            if roll < 0.4:
                op = await _run_op(client, history, pid, "read", key, ())
                if op.outcome == "ok":
                    seen[key] = op.result
            elif roll < 0.8:
                await _run_op(client, history, pid, "cas", key, (seen.get(key), f"p{pid}-{n}"))
            else:
                await _run_op(client, history, pid, "put", f"w-{pid}-{n}", (f"v{n}",))
            await asyncio.sleep(rng.uniform(0, 0.02))


async def _route_op(client: CachePlaneClient, history: History, pid: int, kind: str,
                    request_id: str, blocks: list[int]) -> Op:
    t0 = history.now()
    try:
        got = await client.route(MODEL, block_hashes=blocks, request_id=request_id,
                                 dry_run=kind == "route-dry")
        op = Op(pid, kind, request_id, (), t0, history.now(), "ok",
                (got["term"], got["index"], got["node_id"]))
    except VeristoreError as exc:
        outcome = "fail" if exc.definite else "info"
        op = Op(pid, kind, request_id, (), t0, history.now() if outcome == "fail" else INF,
                outcome, str(exc)[:200])
    history.ops.append(op)
    return op


async def _complete_op(client: CachePlaneClient, history: History, pid: int, request_id: str,
                       node_id: str, blocks: list[int]) -> None:
    t0 = history.now()
    try:
        await client.complete(request_id, node_id, block_hashes=blocks)
        history.ops.append(Op(pid, "complete", request_id, (), t0, history.now(), "ok"))
    except VeristoreError as exc:
        history.ops.append(Op(pid, "complete", request_id, (), t0,
                              history.now() if exc.definite else INF,
                              "fail" if exc.definite else "info"))


async def _setup_fleet(urls: list[str], tls: dict[str, Any]) -> None:
    """Register the model and the inference nodes the routers route to."""
    async with CachePlaneClient(urls, token=TOKEN, timeout=30.0, **tls) as client:
        await client.register_model(MODEL, block_size=16)
        for node_id in INFERENCE_NODES:
            await client.register_node(node_id, f"http://{node_id}.invalid:8000", [MODEL],
                                       capacity_blocks=100_000, max_active=100_000)


async def _router(pid: int, urls: list[str], history: History, stop: asyncio.Event,
                  paused: asyncio.Event, rng: random.Random, tls: dict[str, Any]) -> None:
    """Route requests sharing a few prefixes (25% dry-run) and report each routed one done."""
    prefixes = [[rng.getrandbits(63) for _ in range(8)] for _ in range(4)]
    n = 0
    async with CachePlaneClient(urls, token=ROUTE_TOKEN, timeout=4.0, attempt_timeout=1.0,
                                **tls) as client:
        while not stop.is_set():
            await paused.wait()
            n += 1
            blocks = rng.choice(prefixes) + [rng.getrandbits(63) for _ in range(rng.randint(1, 4))]
            kind = "route-dry" if rng.random() < 0.25 else "route"
            op = await _route_op(client, history, pid, kind, f"r{pid}-{n}", blocks)
            if kind == "route" and op.outcome == "ok":
                await _complete_op(client, history, pid, op.key, op.result[2], blocks)
            await asyncio.sleep(rng.uniform(0, 0.02))


async def _probe(urls: list[str], history: History, stop: asyncio.Event,
                 successes: list[float], tls: dict[str, Any]) -> None:
    n = 0
    # Short attempts, as a router would use: a paused leader must not hold the probe for long.
    async with VeristoreClient(urls, token=TOKEN, timeout=1.0, attempt_timeout=0.25,
                               **tls) as client:
        while not stop.is_set():
            n += 1
            op = await _run_op(client, history, 99, "put", f"probe-{n}", (str(n),))
            if op.outcome == "ok":
                successes.append(op.complete)
            await asyncio.sleep(0.05)


def _make_tls(base_dir: str) -> dict[str, Any]:
    """A throwaway CA, the members' certificate and a client certificate (mTLS), and the
    role file: the suite runs the members as production does (docs/security.md)."""
    pki = throwaway_pki(os.path.join(base_dir, "tls"))
    tokens = os.path.join(base_dir, "tls", "tokens")
    with open(tokens, "w", encoding="utf-8") as f:
        f.write(f"route {ROUTE_TOKEN}\n")
    return {"ca_file": pki["ca"], "client_cert_file": pki["client"],
            "settings": {"tls_cert_file": pki["cert"], "tls_key_file": pki["key"],
                         "tls_client_ca_file": pki["ca"], "tokens_file": tokens}}


async def _converge(cluster: LocalCluster, timeout: float = 5.0) -> tuple[bool, float]:
    """Wait until every member reports the same applied index and state digest."""
    import aiohttp

    started = time.monotonic()
    connector = aiohttp.TCPConnector(ssl=cluster.ssl_context or True)
    async with aiohttp.ClientSession(headers=cluster.auth_headers,
                                     connector=connector) as session:
        async def view(url: str) -> Any:
            try:
                async with session.get(url + "/v1/digest",
                                       timeout=aiohttp.ClientTimeout(total=2)) as r:
                    return await r.json()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return None

        while time.monotonic() - started < timeout:
            # All members at once: the leader's housekeeping commits an entry every second,
            # so digests are only comparable when taken at the same applied index.
            views = await asyncio.gather(*(view(url) for url in cluster.urls))
            if all(views) and len({(v["applied_index"], v["digest"]) for v in views}) == 1:
                return True, time.monotonic() - started
            await asyncio.sleep(0.05)
    return False, time.monotonic() - started


async def run(cycles: int, seed: int, clients: int = 4, routers: int = 2,
              base_dir: str | None = None, log_level: str = "warning",
              faults: Sequence[str] = FAULTS, tls_on: bool = True) -> Report:
    """Run `cycles` faults, each kind of `faults` in turn, in an order shuffled by `seed`."""
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown or not faults:
        raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(FAULTS)}")
    rng = random.Random(seed)
    schedule = [faults[i % len(faults)] for i in range(cycles)]
    rng.shuffle(schedule)
    report = Report(seed, cycles)
    created = base_dir is None  # a directory of its own: removed after a clean run
    base_dir = base_dir or tempfile.mkdtemp(prefix="chaos-")
    tls_files = _make_tls(base_dir) if tls_on else {}
    tls: dict[str, Any] = ({"ca_file": tls_files["ca_file"],
                            "cert_file": tls_files["client_cert_file"]} if tls_on else {})
    cluster = LocalCluster(base_dir, module="cache_plane", api_token=TOKEN,
                           ca_file=tls_files.get("ca_file"),
                           client_cert_file=tls_files.get("client_cert_file"),
                           settings={"log_level": log_level, **tls_files.get("settings", {})},
                           proxy_links=True,
                           # the routers' inference nodes send no heartbeats
                           env={"CACHE_PLANE_NODE_LEASE_MS": str(24 * 3600 * 1000),
                                # checkpoint block logs all the time, under every fault
                                "CACHE_PLANE_BLOCK_LOG_SLACK_BLOCKS": "64",
                                "CACHE_PLANE_BLOCK_LOG_MAX_RECORDS": "8",
                                # and snapshot the Raft log often, so that lagging members
                                # install snapshots under the faults too
                                "CACHE_PLANE_COMPACTION_MIN_ENTRIES": "200"})
    network = Network(cluster.links)
    disks = Disks(cluster)
    nemesis = Nemesis(cluster, network, disks, rng)
    history = History()
    stop, running = asyncio.Event(), asyncio.Event()
    running.set()
    probe_ok: list[float] = []
    failovers: list[tuple[str, float]] = []
    started = time.monotonic()
    clean_end = False
    tasks: list[asyncio.Task[None]] = []
    try:
        network.start()
        disks.mount()
        cluster.start()
        await asyncio.to_thread(cluster.wait_for_leader, 30.0)
        await _setup_fleet(cluster.urls, tls)
        tasks += [asyncio.create_task(_client(p, cluster.urls, history, stop, running,
                                             random.Random(seed * 100 + p), tls))
                 for p in range(clients)]
        tasks += [asyncio.create_task(_router(50 + p, cluster.urls, history, stop, running,
                                              random.Random(seed * 100 + 50 + p), tls))
                  for p in range(routers)]
        tasks.append(asyncio.create_task(_probe(cluster.urls, history, stop, probe_ok, tls)))
        for kind in schedule:
            await asyncio.sleep(rng.uniform(1.0, 2.0))  # healthy period
            report.faults[kind] = report.faults.get(kind, 0) + 1
            details = await nemesis.inject(kind, history.now)
            t_fault = details["at_s"]
            report.fault_log.append({"fault": kind, **details})
            try:
                await asyncio.to_thread(cluster.wait_for_leader, 30.0)
            except TimeoutError:  # a violation: record what each member says, and stop
                report.stalls.append({"fault": kind, "members": [
                    cluster.status(i) for i in range(cluster.size)]})
                break
            for _ in range(100):  # first probe write that completed after the fault
                later = [t for t in probe_ok if t > t_fault]
                if later:
                    failovers.append((kind, min(later) - t_fault))
                    break
                await asyncio.sleep(0.1)
            running.clear()  # quiesce the clients, then every replica must agree
            await asyncio.sleep(0.3)
            converged, took = await _converge(cluster)
            report.convergence.append({"fault": kind, "converged": converged,
                                       "seconds": round(took, 3)})
            print(f"  cycle {len(report.fault_log)}/{cycles}: {report.fault_log[-1]}, "
                  f"converged {converged} in {took:.2f} s", file=sys.stderr, flush=True)
            running.set()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not report.stalls:
            await asyncio.to_thread(cluster.wait_for_leader, 30.0)
            await _final_checks(cluster, history, report, tls)
        clean_end = report.passed
    finally:
        stop.set()
        running.set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        cluster.close()
        network.close()
        if not clean_end:  # keep the evidence: tmpfs contents vanish on unmount
            for node in cluster.nodes:
                shutil.copytree(node.data_dir, node.data_dir + "-kept", dirs_exist_ok=True)
        disks.unmount()
        if clean_end and created:
            shutil.rmtree(base_dir, ignore_errors=True)
    report.operations = {o: sum(1 for op in history.ops if op.outcome == o)
                         for o in ("ok", "fail", "info")}
    reasons: dict[str, int] = {}
    for op in history.ops:
        by_kind = report.operations_by_kind.setdefault(op.kind, {"ok": 0, "fail": 0, "info": 0})
        by_kind[op.outcome] += 1
        if op.outcome != "ok":
            reason = f"{op.kind} {op.outcome}: {str(op.result)[:80]}"
            reasons[reason] = reasons.get(reason, 0) + 1
            first = report.not_ok_first_at.setdefault(reason, [])
            if len(first) < 3:
                first.append(round(op.invoke, 2))
    report.not_ok_reasons = dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:12])
    report.not_ok_first_at = {r: report.not_ok_first_at[r] for r in report.not_ok_reasons}
    report.failover = failover_stats([s for _, s in failovers])
    report.failover_by_fault = {k: failover_stats([s for f, s in failovers if f == k])
                                for k in FAULTS if k in report.faults}
    report.elapsed_s = round(time.monotonic() - started, 1)
    return report


async def _final_checks(cluster: LocalCluster, history: History, report: Report,
                        tls: dict[str, Any]) -> None:
    final: dict[str, Any] = {}
    async with VeristoreClient(cluster.urls, token=TOKEN, timeout=10.0, **tls) as client:
        for key in sorted({op.key for op in history.ops if op.kind == "put"}):
            try:
                got = await client.get(key)
                final[key] = None if got is None else got["value"]
            except KeyNotFoundError:
                final[key] = None
        for r in range(REGISTERS):  # a final read joins each register's history
            await _run_op(client, history, 100, "read", f"reg-{r}", ())
        stats = await client.request("GET", "/v1/stats")
    report.lost_writes = [op.key for op in check_acked_writes(history.ops, final)]
    report.decision_violations = check_decisions(history.ops)
    report.route_count = check_route_count(history.ops, int(stats["routes_total"]))
    for r in range(REGISTERS):
        key = f"reg-{r}"
        report.registers[key] = check_register([op for op in history.ops if op.key == key])


def summary(report: Report) -> str:
    f = report.failover
    lines = [
        f"chaos run: seed {report.seed}, {report.cycles} fault cycles in {report.elapsed_s} s",
        f"  faults: {', '.join(f'{k} {v}' for k, v in sorted(report.faults.items()))}",
        f"  operations: {report.operations}",
        f"  by kind: {report.operations_by_kind}",
        f"  lost acknowledged writes: {len(report.lost_writes)}",
        f"  registers: {report.registers}",
        f"  route decisions from a leader without its quorum: "
        f"{len(report.decision_violations)}; route count: {report.route_count or 'consistent'}",
        f"  converged after every fault: "
        f"{all(c['converged'] for c in report.convergence)} "
        f"(slowest {max((c['seconds'] for c in report.convergence), default=0):.2f} s)",
        f"  failover (fault -> first acknowledged write): p50 {f['p50_s']:.2f} s, "
        f"p99 {f['p99_s']:.2f} s, max {f['max_s']:.2f} s over {f['count']} faults",
    ]
    for kind, stats in report.failover_by_fault.items():
        lines.append(f"    {kind}: p50 {stats['p50_s']:.2f} s, p99 {stats['p99_s']:.2f} s "
                     f"({stats['count']})")
    journal = [d for d in report.fault_log if d["fault"] == "corrupt-journal"]
    if journal:
        refused = sum(1 for d in journal if d.get("refused_to_start"))
        clear = sum(1 for d in journal if d.get("clear_error"))
        lines.append(f"  truncated journals: {refused} of {len(journal)} refused to start "
                     f"({clear} with the clear error), replaced and caught up")
    skipped = [d for d in report.fault_log if "skipped" in d]
    if skipped:
        lines.append(f"  skipped: {len(skipped)} faults ({skipped[0]['skipped']})")
    for stall in report.stalls:
        lines.append(f"  NO LEADER within 30 s after {stall['fault']}")
    lines.append(f"  verdict: {'PASS' if report.passed else 'FAIL'}")
    return "\n".join(lines)


def to_json(report: Report) -> str:
    return json.dumps({**asdict(report), "passed": report.passed}, indent=1, default=str)
