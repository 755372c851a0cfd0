"""Faults the chaos runner injects into a live `LocalCluster`, one at a time.

Each fault is injected, held, and healed before `inject` returns; it returns what it did.

- ``kill-leader`` / ``kill-follower``: SIGKILL, restart after 1-2 s.
- ``pause-leader``: SIGSTOP for 2.5-3.5 s (longer than an election timeout), then SIGCONT.
- ``partition-leader``: cut every Raft link of the leader (`network.Network`: it keeps its
  clients, loses its peers) for 2.5-3.5 s, then heal.
- ``restart-all``: SIGKILL every member at once, restart.
- ``power-loss``: a member loses what it had not synced. The journal commits only synced
  transactions (`journal.py`), so after SIGKILL its file is exactly what a power loss leaves;
  the state store is not synced, so it is rolled back to a consistent copy taken 0.3-1 s
  before the kill and marked as left open by an earlier boot, as a machine restart would
  leave it. The member must discard it and rebuild from snapshot + journal.
- ``disk-full``: a member's data dir (a small tmpfs) is filled for 2-3 s, then freed; the
  member must stop acknowledging while it cannot persist, and recover after. Needs root to
  mount; without it the fault is skipped and the report says so.
- ``corrupt-journal``: SIGKILL a member and cut its journal file in half. It must refuse to
  start with a clear error; the harness then replaces it as docs/operations.md says (empty
  data dir, start; the other two are healthy) and it catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import lmdb

from veristore_py.codec import pack
from veristore_py.localcluster import LocalCluster

from .network import Network

FAULTS = ("kill-leader", "kill-follower", "pause-leader", "partition-leader", "restart-all",
          "power-loss", "disk-full", "corrupt-journal")
BALLOON = "chaos-balloon"


class Disks:
    """A small tmpfs under each member's data dir, so one member's disk can fill up."""

    def __init__(self, cluster: LocalCluster, size_mb: int = 256) -> None:
        self.cluster = cluster
        self.size_mb = size_mb
        self.mounted: list[str] = []

    def mount(self) -> bool:
        """Mount one tmpfs per member (before they start); False if this needs root."""
        for node in self.cluster.nodes:
            os.makedirs(node.data_dir, exist_ok=True)
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m",
                                   "tmpfs", node.data_dir], capture_output=True)
            if done.returncode != 0:
                self.unmount()
                return False
            self.mounted.append(node.data_dir)
        return True

    def fill(self, i: int) -> int:
        """Take every free byte of member i's disk; return how many."""
        path = os.path.join(self.cluster.nodes[i].data_dir, BALLOON)
        st = os.statvfs(self.cluster.nodes[i].data_dir)
        free = st.f_bavail * st.f_frsize
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:  # unbuffered: nothing left to flush (and fail) on close
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, 0, free)
            with contextlib.suppress(OSError):  # whatever fallocate left, in 64 KiB steps
                while True:
                    os.write(fd, b"\0" * 65536)
        finally:
            os.close(fd)
        return free

    def drain(self, i: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.cluster.nodes[i].data_dir, BALLOON))

    def unmount(self) -> None:
        for path in self.mounted:
            subprocess.run(["umount", "-l", path], capture_output=True)
        self.mounted = []


class Nemesis:
    """Injects one fault at a time into `cluster` (see module docstring)."""

    def __init__(self, cluster: LocalCluster, network: Network, disks: Disks,
                 rng: random.Random) -> None:
        self.cluster = cluster
        self.network = network
        self.disks = disks
        self.rng = rng
        self._now: Callable[[], float] = time.monotonic
        self._at = 0.0

    async def inject(self, kind: str, now: Callable[[], float]) -> dict[str, Any]:
        """Inject, hold and heal one fault; details include ``at_s``: `now()` as it struck."""
        self._now, self._at = now, 0.0
        details = await self._inject(kind)
        return {"at_s": round(self._at, 3), **details}

    def _strike(self) -> None:
        self._at = self._now()

    async def _inject(self, kind: str) -> dict[str, Any]:
        cluster, rng = self.cluster, self.rng
        leader = await asyncio.to_thread(cluster.wait_for_leader, 30.0)
        if kind == "kill-leader":
            await self._kill_restart(leader, rng.uniform(1.0, 2.0))
            return {"victim": leader}
        if kind == "kill-follower":
            victim = rng.choice([i for i in range(cluster.size) if i != leader])
            await self._kill_restart(victim, rng.uniform(1.0, 2.0))
            return {"victim": victim}
        if kind == "pause-leader":
            self._strike()
            cluster.pause(leader)
            await asyncio.sleep(rng.uniform(2.5, 3.5))
            cluster.resume(leader)
            return {"victim": leader}
        if kind == "partition-leader":
            self._strike()
            cut = self.network.isolate(leader)
            await asyncio.sleep(rng.uniform(2.5, 3.5))
            self.network.heal()
            return {"victim": leader, "links_cut": len(cut)}
        if kind == "restart-all":
            self._strike()
            for i in range(cluster.size):
                cluster.kill(i)
            await asyncio.sleep(rng.uniform(0.2, 0.5))
            cluster.start()
            return {}
        victim = rng.randrange(cluster.size)
        if kind == "power-loss":
            return {"victim": victim, **await self._power_loss(victim)}
        if kind == "disk-full":
            return {"victim": victim, **await self._disk_full(victim)}
        return {"victim": victim, **await self._corrupt_journal(victim)}

    async def _kill_restart(self, i: int, down_s: float) -> None:
        self._strike()
        self.cluster.kill(i)
        await asyncio.sleep(down_s)
        self.cluster.start_node(i)

    async def _power_loss(self, i: int) -> dict[str, Any]:
        state = os.path.join(self.cluster.nodes[i].data_dir, "state")
        copy = state + ".chaos-copy"
        shutil.rmtree(copy, ignore_errors=True)
        await asyncio.to_thread(_copy_lmdb, state, copy)
        await asyncio.sleep(self.rng.uniform(0.3, 1.0))
        self._strike()
        self.cluster.kill(i)
        shutil.rmtree(state)
        os.rename(copy, state)
        _mark_open_in_earlier_boot(state)
        self.cluster.start_node(i)
        return {}

    async def _disk_full(self, i: int) -> dict[str, Any]:
        if not self.disks.mounted:
            return {"skipped": "cannot mount a tmpfs (needs root)"}
        self._strike()
        filled = await asyncio.to_thread(self.disks.fill, i)
        await asyncio.sleep(self.rng.uniform(2.0, 3.0))
        self.disks.drain(i)
        process = self.cluster.nodes[i].process
        died = process is None or process.poll() is not None
        if died:
            self.cluster.nodes[i].process = None
            self.cluster.start_node(i)
        return {"filled_bytes": filled, "member_exited": died}

    async def _corrupt_journal(self, i: int) -> dict[str, Any]:
        node = self.cluster.nodes[i]
        self._strike()
        self.cluster.kill(i)
        data = os.path.join(node.data_dir, "journal", "data.mdb")
        size = os.path.getsize(data)
        os.truncate(data, max(8192, size // 2))
        self.cluster.start_node(i)
        deadline = time.monotonic() + 15
        refused = False
        while time.monotonic() < deadline:
            process = node.process
            if process is not None and process.poll() is not None:
                refused = True
                break
            if self.cluster.status(i, timeout=0.5) is not None:
                break  # it started: the cut only took free pages
            await asyncio.sleep(0.1)
        clear_message = refused and "journal at" in self.cluster.log_text(i)[-4000:]
        if refused:  # replace the member: empty data dir, start, catch up from the leader
            node.process = None
            for entry in os.listdir(node.data_dir):
                path = os.path.join(node.data_dir, entry)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
            self.cluster.start_node(i)
        return {"truncated_from": size, "refused_to_start": refused,
                "clear_error": clear_message}


def _copy_lmdb(src: str, dst: str) -> None:
    """A consistent copy of a live LMDB environment (one read transaction)."""
    os.makedirs(dst)
    env = lmdb.open(src, readonly=True, max_dbs=4)
    try:
        env.copy(dst)
    finally:
        env.close()


def _mark_open_in_earlier_boot(path: str) -> None:
    """Write the store's boot record as a machine that lost power would have left it."""
    env = lmdb.open(path, max_dbs=4)
    try:
        meta = env.open_db(b"meta")
        with env.begin(write=True, db=meta) as txn:
            txn.put(b"boot", pack(["chaos-earlier-boot", False]), db=meta)
    finally:
        env.close()
