"""The Raft node: PySyncObj's Raft (held, not inherited) with an LMDB journal, LMDB state and
group commit.

Thin glue. Everything a command does is decided by the pure machine (`state.py`) and written
by `storage.py`; this module wires the Raft member (`raft.RaftMember`, the one place that
touches PySyncObj) to them:

- every entry is a msgpack batch (`codec.py`) proposed through `RaftMember.propose`;
  PySyncObj frames it in its own (password-authenticated) protocol;
- the member fsyncs the journal (through `sync_journal` here) before any message leaves the
  node (`raft.DurableTransport`, `journal.py`);
- `store_peer_messages()` stops PySyncObj from zlib-compressing peer messages (see there);
- `SnapshotManager` compacts the log without fork or pickle (see `snapshot.py`);
- `GroupCommitter` turns concurrent `submit()` calls into few entries (see `group_commit.py`);
- leader-only operations check a quorum lease: a leader that has not heard from a majority
  within `leader_lease_s` refuses to decide (`NoLeaderError`), and PySyncObj demotes it after
  `leader_fallback_s` (its own default is 30 s).

A failing LMDB write inside `apply` (disk gone, not map full) is re-raised on purpose:
PySyncObj then retries the same entry on the next tick and the node stops applying (and stops
being ready) instead of skipping an entry and diverging from its peers. A failing journal sync
(a full disk) likewise stops the tick before anything is sent. Both resume once the disk has
room again; if LMDB panicked instead, the process exits for its supervisor to restart it.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import lmdb
import structlog

from .codec import decode_batch
from .config import NodeSettings
from .errors import (
    CommitTimeoutError,
    ConfigError,
    InvalidCommandError,
    LeadershipLostError,
    MembershipConflictError,
    NoLeaderError,
    NotLeaderError,
    StorageError,
    UnknownMemberError,
)
from .group_commit import GroupCommitter, failure
from .journal import LmdbJournal, install_journal_factory
from .raft import FAIL_REASON, ROLES, Peer, RaftMember, SyncObjConf, set_peer_compression
from .snapshot import SnapshotManager, prepare_journal, read_header
from .state import KVMachine, Machine, Result
from .storage import StateStore

log = structlog.get_logger(__name__)
MEMBER_HTTP_PREFIX = "sys/member-http/"  # replicated KV records of members added at run time


def _stored(data: bytes, level: int = -1) -> bytes:
    return zlib.compress(data, 0)


def store_peer_messages() -> None:
    """Frame PySyncObj's peer messages as stored (level 0) zlib streams instead of level 3.

    PySyncObj 0.3.17 compresses every message it sends with ``zlib.compress(pickle, 3)``
    (`tcp_connection.TcpConnection.send`). Our entries are msgpack batches dominated by random
    64-bit block hashes, which do not compress (measured ratio 0.93) and cost the leader about
    26 µs per KB per follower: more than deciding a route. A stored stream is still a valid
    zlib stream, so peers decode it unchanged (mixed versions interoperate); authentication and
    encryption with the cluster password are untouched. Idempotent; PySyncObj is pinned to
    0.3.17, whose module this patches.
    """
    set_peer_compression(_stored, zlib.decompress)


def _exit_if_panicked(exc: StorageError, logger: Any) -> None:
    """Stop the process if LMDB has panicked (e.g. a failed meta-page write on a full disk).

    Other write failures (ENOSPC on data pages) leave the environment usable: PySyncObj
    retries the tick and the node resumes once space is back. After MDB_PANIC every later
    transaction fails until the environment is reopened, so the node would be stuck for good;
    exiting lets the supervisor (systemd) restart it, and a restart is always safe.
    """
    if isinstance(exc.__cause__, lmdb.PanicError):
        logger.critical("storage_panic_exiting", error=str(exc))
        os._exit(70)  # EX_SOFTWARE; skip cleanup that would touch the broken environment


class VeristoreNode:
    """One member of a veristore cluster (its Raft member runs a tick thread in the background).

    It is the member's `RaftHost`: the member calls `apply`, `sync_journal`, `settle_journal`
    and `role_changed` back.
    """

    def __init__(self, settings: NodeSettings, machine: Machine | None = None) -> None:
        install_journal_factory()
        store_peer_messages()
        self.settings = settings
        os.makedirs(settings.data_dir, exist_ok=True)
        self._journal = LmdbJournal(os.path.join(settings.data_dir, "journal"),
                                    settings.map_size_bytes)
        self.store = StateStore(os.path.join(settings.data_dir, "state"), machine or KVMachine(),
                                settings.map_size_bytes)
        self.snapshots = SnapshotManager(self.store)
        dump_path = os.path.join(settings.data_dir, "snapshot.bin")
        try:
            prepare_journal(self._journal, dump_path)
        except Exception:
            self._journal.close()
            self.store.close()
            raise
        self.committer: GroupCommitter | None = None
        self._log = log.bind(node=settings.raft_address)
        self._stopped = False
        self._membership_lock = threading.Lock()
        self._membership_pending: Future[int] | None = None
        password = settings.resolved_password()
        if not password:  # (validate() refuses this; never run Raft unencrypted)
            raise ConfigError(["the Raft password is empty"])
        conf = SyncObjConf(
            password=password,
            bindAddress=settings.raft_bind_address or settings.raft_address,
            journalFile=self._journal,
            fullDumpFile=dump_path,
            serializer=self.snapshots.serialize,
            deserializer=self.snapshots.deserialize,
            serializeChecker=self.snapshots.check,
            appendEntriesUseBatch=False,
            # Larger than any entry the committer builds. PySyncObj sends an entry at or
            # above this size (default 64 KiB) as chunks, each answered by the follower
            # before the entry is whole; with ~100 KiB route batches that cut committed
            # routes/s by 4x (docs/benchmarks.md). Whole entries go in one message.
            appendEntriesBatchSizeBytes=max(1 << 16, 4 * settings.max_batch_bytes),
            sendBufferSize=1 << 20,
            recvBufferSize=1 << 20,
            appendEntriesPeriod=settings.heartbeat_s,
            raftMinTimeout=settings.election_min_s,
            raftMaxTimeout=settings.election_max_s,
            leaderFallbackTimeout=settings.leader_fallback_s,
            connectionTimeout=settings.connection_timeout_s,
            connectionRetryTime=settings.connection_retry_s,
            logCompactionMinEntries=settings.compaction_min_entries,
            logCompactionMinTime=settings.compaction_min_time_s,
            dynamicMembershipChange=settings.dynamic_membership,
            commandsWaitLeader=False,
        )
        self.committer = GroupCommitter(
            self._propose,
            max_commands=settings.max_batch_commands,
            max_bytes=settings.max_batch_bytes,
            max_inflight=settings.max_inflight_entries,
            max_queue=settings.max_queued_commands,
            window_s=settings.batch_window_ms / 1000.0,
            commit_timeout_s=settings.commit_timeout_s,
        )
        self._raft = RaftMember(self, settings.raft_address, [p.raft for p in settings.peers],
                                conf)
        self._wake = threading.Event()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="housekeeping",
                                             daemon=True)
        self._housekeeper.start()

    def settle_journal(self) -> None:
        """After each received message: let the journal finish a rewind (`LmdbJournal.settle`)."""
        self._journal.settle()

    def _housekeeping(self) -> None:
        """On the leader, periodically propose pruning of expired idempotency records.

        The cut-off is the leader's clock, carried inside the command (replicas read no clock).
        """
        while not self._wake.wait(self.settings.idempotency_prune_interval_s):
            if not (self.is_leader() and self.has_quorum_lease()):
                continue
            cutoff_ms = time.time_ns() // 1_000_000 - int(self.settings.idempotency_retention_s * 1000)
            try:
                self.submit({"op": "prune_idem", "before_ms": cutoff_ms}).result(
                    self.settings.commit_timeout_s + 1)
            except Exception as exc:  # retried next round; leadership may have moved
                self._log.warning("idempotency_prune_failed", error=repr(exc))

    # -- replication -----------------------------------------------------------------------

    def apply(self, index: int, entry: bytes) -> list[Result] | None:
        """Apply the batch entry at log `index` (every replica, in log order). Never raises for
        input."""
        try:
            batch = decode_batch(entry)
        except InvalidCommandError as exc:
            self._log.error("entry_undecodable", index=index, error=str(exc))
            return None
        try:
            return self.store.apply_entry(index, batch.stamp_ms, batch.commands)
        except StorageError as exc:
            _exit_if_panicked(exc, self._log)
            raise

    def _propose(self, entry: bytes, callback: Any) -> None:
        self._raft.propose(entry, callback)

    def sync_journal(self) -> None:
        """fsync the journal if anything was written since the last sync (tick thread)."""
        try:
            self._journal.sync()
        except StorageError as exc:
            _exit_if_panicked(exc, self._log)
            raise

    def submit(self, command: Any, linger_s: float = 0.0) -> Future[Any]:
        """Propose `command` on this leader; the future resolves to its apply result.

        `linger_s`: a command in no hurry may wait that long for company (`GroupCommitter`).
        Raises NotLeaderError / NoLeaderError (definite) when this node may not decide.
        """
        self.require_leader()
        assert self.committer is not None
        return self.committer.submit(command, linger_s)

    # -- leadership ------------------------------------------------------------------------

    def role_changed(self, old: str, new: str, term: int) -> None:
        self._log.info("raft_state_changed", old=old, new=new, term=term)
        if new == "leader":
            self._log.info("leader_elected", term=term)
        if old == "leader" and new != "leader" and self.committer is not None:
            self.committer.fail_all(LeadershipLostError("leadership lost with the command in flight"))

    def leader_address(self) -> str | None:
        """Raft address of the last known leader (may be stale), or None."""
        return self._raft.leader_address()

    def is_leader(self) -> bool:
        return self._raft.is_leader()

    # -- the narrow facade other modules use ------------------------------------------------

    @property
    def term(self) -> int:
        """The current Raft term."""
        return self._raft.term

    @property
    def commit_index(self) -> int:
        """The highest log index this member knows to be committed."""
        return self._raft.commit_index

    @property
    def last_applied(self) -> int:
        """The highest log index this member has applied."""
        return self._raft.last_applied

    def peers(self) -> list[Peer]:
        """The other members: address, connected, match index (on the leader)."""
        return self._raft.peers()

    def peers_connected(self) -> bool:
        """True if this member has a live connection to at least one other member."""
        return any(peer.connected for peer in self._raft.peers())

    def transfer_leadership(self) -> None:
        """Ask Raft to hand leadership to another member (call on the tick thread)."""
        self._raft.transfer_leadership()

    def request_compaction(self) -> None:
        """Ask for a snapshot (log compaction) at the next tick; see `fresh_snapshot`."""
        self._raft.request_compaction()

    def add_tick_callback(self, callback: Callable[[], None]) -> None:
        """Run `callback()` on every tick of the Raft thread until removed (see `tick.py`)."""
        self._raft.add_tick_callback(callback)

    def remove_tick_callback(self, callback: Callable[[], None]) -> None:
        self._raft.remove_tick_callback(callback)

    def has_quorum_lease(self) -> bool:
        """True if this leader heard from a majority within `leader_lease_s`."""
        return self._raft.heard_from_majority(self.settings.leader_lease_s, time.monotonic())

    def require_leader(self) -> None:
        """Raise unless this node leads and holds a quorum lease."""
        if self._stopped:
            raise NoLeaderError("node is stopping")
        if not self._raft.is_leader():
            leader = self.leader_address()
            if leader is None:
                raise NoLeaderError("no leader is known (election in progress?)")
            raise NotLeaderError(leader)
        if not self.has_quorum_lease():
            raise NoLeaderError("this leader has not heard from a majority recently")

    def require_current_leader(self) -> None:
        """`require_leader`, and this leader has applied every entry committed before its
        term (its own no-op entry), so its local state holds everything acknowledged so far:
        it acknowledges only what it has applied. Decisions made from local state need this.
        """
        self.require_leader()
        if not self.leader_caught_up():
            raise NoLeaderError("new leader is still applying the previous term's entries")

    def leader_caught_up(self) -> bool:
        """True once this leader has applied an entry of its own term (lease reads are safe)."""
        return self._raft.applied_own_term()

    # -- reads and introspection -----------------------------------------------------------

    def read_local(self, command: Any) -> Result:
        """Answer a read-only command from local state (stale on followers)."""
        return self.store.read(command)

    def status(self) -> dict[str, Any]:
        """Who leads, term, commit/applied indexes, members and their connectivity."""
        raw = self._raft.raw_status()
        leader = self.leader_address()
        members = [{"raft": self.settings.raft_address, "http": self.settings.http_address,
                    "self": True, "connected": True}]
        for peer in self._raft.peers():
            members.append({
                "raft": peer.address,
                "http": self.peer_http(peer.address),
                "self": False,
                "connected": peer.connected,
                "match_index": peer.match_index,
            })
        committer = self.committer
        return {
            "raft_address": self.settings.raft_address,
            "http_address": self.settings.http_address,
            "state": ROLES.get(raw.get("state", -1), "unknown"),
            "leader": leader,
            "leader_http": self.peer_http(leader) if leader else None,
            "term": self.term,
            "commit_index": self.commit_index,
            "applied_index": self.last_applied,
            "store_applied_index": self.store.applied_index,
            "has_quorum": (self.has_quorum_lease() if self._raft.is_leader()
                           else bool(raw.get("has_quorum"))),
            "ready": self.is_ready(),
            "log_len": raw.get("log_len"),
            "journal_syncs": self._journal.syncs,
            "snapshots_built": self.snapshots.built,
            "snapshots_installed": self.snapshots.installed,
            "members": members,
            "group_commit": None if committer is None else {
                "entries": committer.stats.entries,
                "commands": committer.stats.commands,
                "largest_batch": committer.stats.largest_batch,
                "batch_counts": list(committer.stats.batch_counts),
                "timeouts": committer.stats.timeouts,
                "pending": committer.pending,
            },
        }

    def is_ready(self) -> bool:
        """Member of a cluster with a known leader, and caught up with what it has committed."""
        return (not self._stopped and self.leader_address() is not None
                and self.last_applied >= self.commit_index and self._raft.in_cluster())

    # -- membership ------------------------------------------------------------------------

    def peer_http(self, raft_address: str | None) -> str | None:
        """The HTTP address of member `raft_address`: from the config file, else from the
        replicated record `add_member` wrote for a member added at run time."""
        known = self.settings.peer_http(raft_address)
        if known is not None or raft_address is None:
            return known
        got = self.store.read({"op": "get", "key": (MEMBER_HTTP_PREFIX + raft_address).encode()})
        value = got.get("value") if got.get("found") else None
        return None if value is None else bytes(value).decode("utf-8", "replace")

    def change_membership(self, action: str, raft_address: str, http_address: str | None = None,
                          timeout_s: float = 30.0) -> None:
        """Add or remove one member through the Raft log (PySyncObj's single-server change).

        The new member's HTTP address is committed first (a replicated KV record) so every
        member can redirect clients to it once it leads. One uncommitted change at a time;
        refused if the new member set would have no reachable majority (remove dead members
        before adding); the leader cannot remove itself (stop it: another member takes over,
        then remove it there).
        Raises UnknownMemberError to remove a non-member, MembershipConflictError for a change
        the current members refuse, InvalidCommandError for one that makes no sense,
        NoLeaderError / LeadershipLostError / CommitTimeoutError as for any write.
        """
        self.require_current_leader()
        peers = self._raft.peers()
        members = {peer.address for peer in peers} | {self.settings.raft_address}
        reachable = {self.settings.raft_address} | {peer.address for peer in peers
                                                     if peer.connected}
        after = members | {raft_address} if action == "add" else members - {raft_address}
        if len(reachable & after) <= len(after) // 2:
            # e.g. adding a fourth member while one of three is down: nothing could commit
            # until the new one caught up. Remove dead members first, then add.
            raise MembershipConflictError(
                f"after this change only {len(reachable & after)} of {len(after)} members "
                f"would be reachable, not a majority: remove unreachable members first")
        with self._membership_lock:  # PySyncObj's own one-change-at-a-time guard is dead code
            pending = self._membership_pending
            if pending is not None and not pending.done():
                raise MembershipConflictError("another membership change is not committed yet")
            done: Future[int] = Future()
            self._membership_pending = done
        try:
            change = self._membership_change(action, raft_address, members, http_address,
                                             timeout_s)
        except BaseException:
            done.set_result(FAIL_REASON.DISCARDED)  # nothing proposed: free the slot
            raise
        change(raft_address, lambda _result, error: done.set_result(error))
        try:
            error = done.result(timeout_s)
        except TimeoutError as exc:
            raise CommitTimeoutError(f"membership change not committed in {timeout_s}s") from exc
        if error != FAIL_REASON.SUCCESS:
            raise failure(error)
        self._log.info("membership_changed", action=action, member=raft_address)

    def _membership_change(self, action: str, raft_address: str, members: set[str],
                           http_address: str | None, timeout_s: float) -> Any:
        """Check `action` and return the PySyncObj method that makes it (see above)."""
        if action == "add":
            if raft_address in members:
                raise MembershipConflictError(f"{raft_address} is already a member")
            if not http_address:
                raise InvalidCommandError("adding a member needs its http address")
            key = (MEMBER_HTTP_PREFIX + raft_address).encode()
            self.submit({"op": "put", "key": key, "value": http_address.encode()}).result(
                timeout_s)
            change = self._raft.add_member
        elif action == "remove":
            if raft_address == self.settings.raft_address:
                raise MembershipConflictError(
                    "this member leads: stop it (another member takes over), then remove it "
                    "through the new leader")
            if raft_address not in members:
                raise UnknownMemberError(f"{raft_address} is not a member")
            change = self._raft.remove_member
        else:
            raise InvalidCommandError("action must be add or remove")
        return change

    # -- backups ---------------------------------------------------------------------------

    def fresh_snapshot(self, timeout_s: float = 60.0) -> str:
        """Take a snapshot now (PySyncObj log compaction) and return the snapshot file's path;
        if nothing was applied since the last one, that one is current and no new one is made.

        The file (`snapshot.bin`: header with the last applied entry + an LMDB copy of the
        state) is fsynced and renamed into place before this returns; a later snapshot
        replaces it by rename, so a reader that opened it keeps a consistent copy.
        Raises CommitTimeoutError if no snapshot completes within `timeout_s`.
        """
        path = os.path.join(self.settings.data_dir, "snapshot.bin")
        if self._snapshot_is_current(path):  # PySyncObj would build none: nothing to add
            return path
        built = self.snapshots.built
        self._raft.request_compaction()
        deadline = time.monotonic() + timeout_s
        while self.snapshots.built == built:
            if time.monotonic() > deadline:
                raise CommitTimeoutError(f"no snapshot completed within {timeout_s}s")
            if self._stopped:
                raise NoLeaderError("node is stopping")
            time.sleep(0.02)
        return path

    def _snapshot_is_current(self, path: str) -> bool:
        """True if the snapshot at `path` holds the state as applied now."""
        try:
            with open(path, "rb") as f:
                return bool(read_header(f)["applied"] == self.store.applied_index)
        except (OSError, StorageError):  # none yet, or unreadable: build one
            return False

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop proposing, stop Raft, wait for snapshots and close LMDB (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._wake.set()
        if self.committer is not None:
            self.committer.close()
        self._raft.shut_down()  # PySyncObj closes the journal (`_destroy`) on the way out
        self.snapshots.wait()
        self.store.close()
