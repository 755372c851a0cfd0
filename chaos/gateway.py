"""`python -m chaos gateway`: kill the cluster leader under gateway load, then check the index.

A `GatewayStack` (3 members, 2 sim-nodes, 2 gateways, routes answered as `route_ack` says:
``decided`` by default, the mode whose answers may be forgotten) serves a steady load from
concurrent `openai` clients while the nemesis kills the leader every cycle (SIGKILL) and
restarts it. The checker, at quiescence:

- **answers**: every request got an answer; a failure is a 429/502/503/504 (counted), never a
  500, a hang or a broken connection;
- **index converges**: for every node, the blocks the cluster's index holds equal the blocks
  the engine reports holding (its KV events fill in what forgotten decisions left out);
- **replicas converge**: every member's state digest is the same at one applied index.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import openai

from cache_plane.sim.stack import MODEL, GatewayStack


@dataclass
class GatewayReport:
    cycles: int
    route_ack: str
    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    digests: list[Any] = field(default_factory=list)
    decided: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations


async def _clients(stack: GatewayStack, stop: asyncio.Event, report: GatewayReport,
                   seed: int, concurrency: int = 6) -> None:
    rng = random.Random(seed)

    async def worker(w: int) -> None:
        async with openai.AsyncOpenAI(base_url=stack.gateway_url(w % 2), api_key=stack.api_key,
                                      max_retries=0, timeout=30) as client:
            n = 0
            while not stop.is_set():
                n += 1
                system = f"Shared system prompt number {rng.randrange(6)}. " * 50
                try:
                    await client.chat.completions.create(
                        model=MODEL, max_tokens=3, messages=[
                            {"role": "system", "content": system},
                            {"role": "user", "content": f"worker {w} question {n}"}])
                    report.ok += 1
                except openai.APIStatusError as exc:
                    key = str(exc.status_code)
                    report.failed[key] = report.failed.get(key, 0) + 1
                    if exc.status_code not in (429, 502, 503, 504):
                        report.bad.append(f"{exc.status_code}: {str(exc)[:200]}")
                except openai.APIError as exc:  # no answer at all: a hang or a reset
                    report.bad.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    await asyncio.gather(*(worker(w) for w in range(concurrency)))


def _get(stack: GatewayStack, url: str) -> Any:
    assert stack.cluster is not None
    req = urllib.request.Request(url, headers=stack.cluster.auth_headers)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.load(resp)


async def run_gateway_chaos(cycles: int, seed: int, route_ack: str = "decided",
                            cycle_s: float = 3.0) -> GatewayReport:
    report = GatewayReport(cycles, route_ack)
    with tempfile.TemporaryDirectory(prefix="chaos-gateway-") as base, \
            GatewayStack(base, engines=2, gateways=2, route_ack=route_ack) as stack:
        assert stack.cluster is not None
        cluster = stack.cluster
        stop = asyncio.Event()
        load = asyncio.create_task(_clients(stack, stop, report, seed))
        loop = asyncio.get_running_loop()
        for _ in range(cycles):
            await asyncio.sleep(cycle_s / 2)
            leader = await loop.run_in_executor(None, cluster.wait_for_leader)
            await loop.run_in_executor(None, cluster.kill, leader)
            await asyncio.sleep(cycle_s / 2)
            await loop.run_in_executor(None, cluster.start_node, leader)
        stop.set()
        await load
        # quiescence: the restarted member catches up, every report and KV event lands
        leader = await loop.run_in_executor(None, cluster.wait_for_leader)
        deadline = time.monotonic() + 20
        while True:
            await asyncio.sleep(1.0)
            report.nodes = _get(stack, cluster.nodes[leader].url + "/v1/nodes")["nodes"]
            diverged = [n for n in report.nodes
                        if n["used_blocks"] != n.get("reported_used_blocks")]
            if not diverged or time.monotonic() > deadline:
                break
        for n in diverged:
            report.violations.append(
                f"index diverged on {n['node_id']}: the cluster indexes {n['used_blocks']} "
                f"blocks, the engine holds {n.get('reported_used_blocks')}")
        report.decided = _get(stack, cluster.nodes[leader].url + "/v1/stats")["decided_routes"]
        for _ in range(40):
            report.digests = [_get(stack, node.url + "/v1/digest") for node in cluster.nodes]
            if len({(d["applied_index"], d["digest"]) for d in report.digests}) == 1:
                break
            await asyncio.sleep(0.25)
        else:
            report.violations.append(f"replicas differ: {report.digests}")
    if report.bad:
        report.violations.append(f"{len(report.bad)} requests got no proper answer: "
                                 f"{report.bad[:3]}")
    if report.ok == 0:
        report.violations.append("no request succeeded")
    return report


def gateway_summary(report: GatewayReport) -> str:
    nodes = ", ".join(f"{n['node_id']} {n['used_blocks']}/{n.get('reported_used_blocks')}"
                      for n in report.nodes)
    lines = [
        f"gateway chaos: {report.cycles} leader kills under load, route_ack={report.route_ack}",
        f"  requests ok {report.ok}, failed by status {report.failed or 'none'}",
        f"  blocks indexed/engine-held per node: {nodes}",
        f"  decided routes on the last leader: {report.decided}",
        "  PASS" if report.passed else "  FAIL: " + "; ".join(report.violations),
    ]
    return "\n".join(lines)
