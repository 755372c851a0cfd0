"""Replication benchmark: raw PySyncObj vs veristore_py, three local node processes each.

For each system the script spawns three node processes (multiprocessing, `spawn`), waits for a
leader, and runs the same load generator inside the leader process (so no HTTP or client code
is measured, only replication + storage):

- sequential: one client, one put at a time; p50/p99 latency;
- pipelined: `--concurrency` puts outstanding at all times for `--seconds`; committed ops/s.

Systems:
- raw-pysyncobj          `@replicated` put into a dict, PySyncObj's own mmap journal, defaults
                         (appendEntriesUseBatch=True); journal never fsynced.
- raw-pysyncobj-nobatch  the same with appendEntriesUseBatch=False (PySyncObj's low-latency mode).
- veristore              durable puts: LMDB journal fsynced before any ack, LMDB state, group
                         commit (`GroupCommitter`).

Usage: python benchmarks/replication.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


PASSWORD = "replication-benchmark"  # both sides authenticate and encrypt, as in production


def _raw_node(address: str, peers: list[str], data_dir: str, batch: bool) -> Any:
    from pysyncobj import SyncObj, SyncObjConf, replicated

    class RawKV(SyncObj):
        def __init__(self) -> None:
            conf = SyncObjConf(journalFile=os.path.join(data_dir, "journal"),
                               appendEntriesUseBatch=batch, password=PASSWORD)
            super().__init__(address, peers, conf)
            self._data: dict[bytes, bytes] = {}

        @replicated
        def put(self, key: bytes, value: bytes) -> bool:
            self._data[key] = value
            return True

    node = RawKV()

    def is_leader() -> bool:
        return bool(node._isLeader())

    def submit(i: int, done: Any) -> None:
        node.put(b"k%d" % i, b"v" * 64, callback=lambda res, err: done(err == 0))

    return node, is_leader, submit, node.destroy_synchronous


def _veristore_node(address: str, peers: list[str], data_dir: str) -> Any:
    from veristore_py.config import NodeSettings, Peer
    from veristore_py.node import VeristoreNode

    settings = NodeSettings(raft_address=address, http_address="127.0.0.1:1", data_dir=data_dir,
                            peers=tuple(Peer(p, "127.0.0.1:1") for p in peers),
                            password=PASSWORD).validate()
    node = VeristoreNode(settings)

    def is_leader() -> bool:
        return node.is_leader() and node.has_quorum_lease() and node.leader_caught_up()

    def submit(i: int, done: Any) -> None:
        future = node.submit({"op": "put", "key": b"k%d" % i, "value": b"v" * 64})
        future.add_done_callback(lambda f: done(f.exception() is None and f.result()["ok"]))

    return node, is_leader, submit, node.stop


def _worker(system: str, address: str, peers: list[str], data_dir: str, conn: Any) -> None:
    import logging

    import structlog

    logging.disable(logging.CRITICAL)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    if system == "veristore":
        node, is_leader, submit, stop = _veristore_node(address, peers, data_dir)
    else:
        node, is_leader, submit, stop = _raw_node(address, peers, data_dir,
                                                  batch=system == "raw-pysyncobj")
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "leader?":
                conn.send(is_leader())
            elif msg[0] == "run":
                conn.send(_load(submit, **msg[1]))
            elif msg[0] == "stats":
                conn.send(node.status().get("group_commit") if system == "veristore" else None)
            elif msg[0] == "stop":
                break
    finally:
        stop()
        conn.send("stopped")


def _load(submit: Any, sequential: int, seconds: float, concurrency: int) -> dict[str, Any]:
    """Run the sequential then the pipelined phase; return latencies and throughput."""
    latencies = []
    failures = 0
    for i in range(sequential):
        event = threading.Event()
        outcome: list[bool] = []
        started = time.perf_counter()
        submit(i, lambda ok, e=event, o=outcome: (o.append(ok), e.set()))
        event.wait(5)
        latencies.append(time.perf_counter() - started)
        failures += 0 if outcome and outcome[0] else 1
        if failures >= 5:  # the cluster is not committing: report it rather than hang
            break
    window = threading.Semaphore(concurrency)
    lock = threading.Lock()
    counts = {"ok": 0, "failed": 0}

    def done(ok: bool) -> None:
        with lock:
            counts["ok" if ok else "failed"] += 1
        window.release()

    started = time.perf_counter()
    deadline = started + seconds
    i = sequential
    while time.perf_counter() < deadline:
        if window.acquire(timeout=0.1):
            submit(i, done)
            i += 1
    for _ in range(concurrency):  # drain what is still in flight
        window.acquire(timeout=10)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "sequential_ops": sequential,
        "sequential_failed": failures,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "mean_ms": 1000 * statistics.fmean(latencies),
        "pipelined_ok": counts["ok"],
        "pipelined_failed": counts["failed"],
        "ops_per_s": counts["ok"] / elapsed,
    }


def run_system(system: str, args: argparse.Namespace) -> dict[str, Any]:
    from veristore_py.localcluster import free_ports

    ctx = mp.get_context("spawn")
    base = tempfile.mkdtemp(prefix=f"bench-{system}-")
    addresses = [f"127.0.0.1:{p}" for p in free_ports(3)]
    procs, conns = [], []
    for i, address in enumerate(addresses):
        parent, child = ctx.Pipe()
        data_dir = os.path.join(base, f"node{i}")
        os.makedirs(data_dir)
        proc = ctx.Process(target=_worker, daemon=True,
                           args=(system, address, [a for a in addresses if a != address],
                                 data_dir, child))
        proc.start()
        procs.append(proc)
        conns.append(parent)
    try:
        deadline = time.monotonic() + 30
        leader = None
        while leader is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{system}: no leader within 30 s")
            for i, conn in enumerate(conns):
                conn.send(("leader?",))
                if conn.recv():
                    leader = i
                    break
            time.sleep(0.1)
        time.sleep(0.5)
        conns[leader].send(("run", {"sequential": args.sequential, "seconds": args.seconds,
                                    "concurrency": args.concurrency}))
        result = conns[leader].recv()
        conns[leader].send(("stats",))
        result["group_commit"] = conns[leader].recv()
        return result
    finally:
        for conn in conns:
            try:
                conn.send(("stop",))
                conn.recv()
            except (OSError, EOFError):
                pass
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        shutil.rmtree(base, ignore_errors=True)


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run for CI")
    parser.add_argument("--sequential", type=int, default=1000, help="sequential puts (default 1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="pipelined phase length")
    parser.add_argument("--concurrency", type=int, default=512, help="outstanding puts when pipelined")
    parser.add_argument("--systems", default="raw-pysyncobj,raw-pysyncobj-nobatch,veristore")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.sequential, args.seconds = 100, 2.0
    print(f"machine: {machine()}")
    print(f"load: {args.sequential} sequential puts, then {args.seconds:.0f} s with "
          f"{args.concurrency} outstanding; 64-byte values; 3 node processes on loopback\n")
    results = {}
    for system in args.systems.split(","):
        results[system] = run_system(system, args)
    header = f"{'system':<24}{'durable':>8}{'ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}"
    print(header)
    print("-" * len(header))
    for system, r in results.items():
        print(f"{system:<24}{'yes' if system == 'veristore' else 'no':>8}{r['ops_per_s']:>10.0f}"
              f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{r['sequential_failed'] + r['pipelined_failed']:>8}")
    gc = results.get("veristore", {}).get("group_commit")
    if gc:
        print(f"\nveristore group commit: {gc['commands']} commands in {gc['entries']} entries "
              f"(mean {gc['commands'] / max(gc['entries'], 1):.1f}/entry, largest {gc['largest_batch']})")
    if "veristore" in results and "raw-pysyncobj" in results:
        ratio = results["veristore"]["ops_per_s"] / max(results["raw-pysyncobj"]["ops_per_s"], 1e-9)
        print(f"veristore / raw-pysyncobj throughput: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
