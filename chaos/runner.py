"""Attack a real 3-member cluster under load and judge the recorded history (Jepsen-style).

Clients (asyncio, through the public HTTP API with the same client routers use) run a mix of
linearizable reads and compare-and-set writes on a few register keys, plus puts of unique
keys, recording every operation's invocation, completion and outcome: `ok`, `fail` (a
definite error: it did not happen) or `info` (unknown: it may have happened). A probe writes
every 50 ms to time failovers. Between healthy periods a nemesis injects one fault, holds it,
heals it; then the clients pause while every replica must reach the same state digest.

Faults in this version: kill -9 of the leader and of a follower (then restart), SIGSTOP of the
leader for longer than an election timeout (then SIGCONT), and kill -9 of every member at
once (then restart). Network partitions, unsynced-write loss, a full disk and a corrupted
journal tail are not implemented yet.

At the end: every acknowledged put is read back; each register's history must be
linearizable (`checker.check_register`); convergence must have held after every fault.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from veristore_py.client import KeyNotFoundError, VeristoreClient
from veristore_py.errors import VeristoreError
from veristore_py.localcluster import LocalCluster

from .checker import INF, Op, check_acked_writes, check_register, failover_stats

FAULTS = ("kill-leader", "kill-follower", "pause-leader", "restart-all")
REGISTERS = 4
TOKEN = "chaos-token"


@dataclass
class Report:
    seed: int
    cycles: int
    faults: dict[str, int] = field(default_factory=dict)
    operations: dict[str, int] = field(default_factory=dict)
    lost_writes: list[str] = field(default_factory=list)
    registers: dict[str, str] = field(default_factory=dict)
    convergence: list[dict[str, Any]] = field(default_factory=list)
    failover: dict[str, Any] = field(default_factory=dict)
    failover_by_fault: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def passed(self) -> bool:
        return (not self.lost_writes and "violation" not in self.registers.values()
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
        op = Op(pid, kind, key, args, t0, history.now() if outcome == "fail" else INF, outcome)
    history.ops.append(op)
    return op


async def _client(pid: int, urls: list[str], history: History, stop: asyncio.Event,
                  paused: asyncio.Event, rng: random.Random) -> None:
    seen: dict[str, Any] = {}
    n = 0
    async with VeristoreClient(urls, token=TOKEN, timeout=4.0, attempt_timeout=1.0) as client:
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


async def _probe(urls: list[str], history: History, stop: asyncio.Event,
                 successes: list[float]) -> None:
    n = 0
    # Short attempts, as a router would use: a paused leader must not hold the probe for long.
    async with VeristoreClient(urls, token=TOKEN, timeout=1.0, attempt_timeout=0.25) as client:
        while not stop.is_set():
            n += 1
            op = await _run_op(client, history, 99, "put", f"probe-{n}", (str(n),))
            if op.outcome == "ok":
                successes.append(op.complete)
            await asyncio.sleep(0.05)


async def _converge(cluster: LocalCluster, timeout: float = 5.0) -> tuple[bool, float]:
    """Wait until every member reports the same applied index and state digest."""
    import aiohttp

    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
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


async def _fault(cluster: LocalCluster, kind: str, rng: random.Random) -> None:
    leader = await asyncio.to_thread(cluster.wait_for_leader, 30.0)
    if kind == "kill-leader":
        cluster.kill(leader)
        await asyncio.sleep(rng.uniform(1.0, 2.0))
        cluster.start_node(leader)
    elif kind == "kill-follower":
        victim = rng.choice([i for i in range(cluster.size) if i != leader])
        cluster.kill(victim)
        await asyncio.sleep(rng.uniform(1.0, 2.0))
        cluster.start_node(victim)
    elif kind == "pause-leader":
        cluster.pause(leader)
        await asyncio.sleep(rng.uniform(2.5, 3.5))  # longer than an election timeout
        cluster.resume(leader)
    else:  # restart-all
        for i in range(cluster.size):
            cluster.kill(i)
        await asyncio.sleep(rng.uniform(0.2, 0.5))
        cluster.start()


async def run(cycles: int, seed: int, clients: int = 4, base_dir: str | None = None) -> Report:
    rng = random.Random(seed)
    schedule = [FAULTS[i % len(FAULTS)] for i in range(cycles)]
    rng.shuffle(schedule)
    report = Report(seed, cycles)
    cluster = LocalCluster(base_dir or tempfile.mkdtemp(prefix="chaos-"), module="cache_plane",
                           api_token=TOKEN, settings={"log_level": "warning"})
    history = History()
    stop, running = asyncio.Event(), asyncio.Event()
    running.set()
    probe_ok: list[float] = []
    failovers: list[tuple[str, float]] = []
    started = time.monotonic()
    try:
        cluster.start()
        await asyncio.to_thread(cluster.wait_for_leader, 30.0)
        tasks = [asyncio.create_task(_client(p, cluster.urls, history, stop, running,
                                             random.Random(seed * 100 + p)))
                 for p in range(clients)]
        tasks.append(asyncio.create_task(_probe(cluster.urls, history, stop, probe_ok)))
        for kind in schedule:
            await asyncio.sleep(rng.uniform(1.0, 2.0))  # healthy period
            report.faults[kind] = report.faults.get(kind, 0) + 1
            t_fault = history.now()
            await _fault(cluster, kind, rng)
            await asyncio.to_thread(cluster.wait_for_leader, 30.0)
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
            running.set()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(cluster.wait_for_leader, 30.0)
        await _final_checks(cluster, history, report)
    finally:
        cluster.close()
    report.operations = {o: sum(1 for op in history.ops if op.outcome == o)
                         for o in ("ok", "fail", "info")}
    report.failover = failover_stats([s for _, s in failovers])
    report.failover_by_fault = {k: failover_stats([s for f, s in failovers if f == k])
                                for k in FAULTS}
    report.elapsed_s = round(time.monotonic() - started, 1)
    return report


async def _final_checks(cluster: LocalCluster, history: History, report: Report) -> None:
    final: dict[str, Any] = {}
    async with VeristoreClient(cluster.urls, token=TOKEN, timeout=10.0) as client:
        for key in sorted({op.key for op in history.ops if op.kind == "put"}):
            try:
                got = await client.get(key)
                final[key] = None if got is None else got["value"]
            except KeyNotFoundError:
                final[key] = None
        for r in range(REGISTERS):  # a final read joins each register's history
            await _run_op(client, history, 100, "read", f"reg-{r}", ())
    report.lost_writes = [op.key for op in check_acked_writes(history.ops, final)]
    for r in range(REGISTERS):
        key = f"reg-{r}"
        report.registers[key] = check_register([op for op in history.ops if op.key == key])


def summary(report: Report) -> str:
    f = report.failover
    lines = [
        f"chaos run: seed {report.seed}, {report.cycles} fault cycles in {report.elapsed_s} s",
        f"  faults: {', '.join(f'{k} {v}' for k, v in sorted(report.faults.items()))}",
        f"  operations: {report.operations}",
        f"  lost acknowledged writes: {len(report.lost_writes)}",
        f"  registers: {report.registers}",
        f"  converged after every fault: "
        f"{all(c['converged'] for c in report.convergence)} "
        f"(slowest {max((c['seconds'] for c in report.convergence), default=0):.2f} s)",
        f"  failover (fault -> first acknowledged write): p50 {f['p50_s']:.2f} s, "
        f"p99 {f['p99_s']:.2f} s, max {f['max_s']:.2f} s over {f['count']} faults",
        f"  verdict: {'PASS' if report.passed else 'FAIL'}",
    ]
    return "\n".join(lines)


def to_json(report: Report) -> str:
    return json.dumps({**asdict(report), "passed": report.passed}, indent=1, default=str)
