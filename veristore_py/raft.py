"""The one module that touches PySyncObj: what we import from it, subclass, patch in it and
read from its private state. Everything else goes through `RaftMember`'s narrow facade.

`RaftMember` is our `SyncObj` subclass (the way Patroni's `Raft` holds a `_sync_obj`): the
node (`node.py`) holds one and never touches PySyncObj's attributes. The member calls back
into its host (`RaftHost`) for what the node owns: applying an entry, syncing the journal,
reacting to a change of role.

PySyncObj is pinned to 0.3.17 (`setup.cfg`): the LMDB journal, the snapshot hooks and the
quorum-lease check rely on its internals. This module checks the installed version and the
private methods it calls at import, so a different PySyncObj fails loudly at start-up, not
as a member that silently "never has a quorum". The private attributes it reads are
instance attributes (set in `SyncObj.__init__`): reading one that is missing raises a clear
`RuntimeError`, never a default.

What it reaches into, and why (details in docs/veristore.md):
- `pysyncobj.syncobj.createJournal`: replaced so `SyncObjConf(journalFile=LmdbJournal(...))`
  uses our fsynced LMDB journal (`set_journal_factory`);
- `pysyncobj.tcp_connection.zlib`: peer messages framed as stored zlib streams
  (`set_peer_compression`);
- `SyncObj.__lastResponseTime`: when each peer last answered (the leader's quorum lease);
- `SyncObj.__noopIDx`: the leader's own no-op entry (has it applied its term's first entry);
- `SyncObj.__parseChangeClusterRequest` / `__doChangeCluster`: membership changes replayed
  from a kept journal tail;
- `SyncObj._onTick`, `SyncObj._setCodeVersion`, `SyncObj._poller` and
  `TCPTransport._syncObj` / `_onMessageReceived`: the journal is made durable before a tick
  commits and before any message but the leader's `append_entries` leaves (`DurableTransport`);
- the `pysyncobj.syncobj` logger, which `logs.py` filters.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pysyncobj.syncobj as _syncobj_module
from pysyncobj import FAIL_REASON, SERIALIZER_STATE, SyncObj, SyncObjConf, replicated
from pysyncobj import tcp_connection as _tcp_connection
from pysyncobj.journal import Journal
from pysyncobj.node import TCPNode
from pysyncobj.transport import TCPTransport

PINNED_VERSION = "0.3.17"
LOGGER_NAME = "pysyncobj.syncobj"

_PRIVATE_METHODS = ("_SyncObj__parseChangeClusterRequest", "_SyncObj__doChangeCluster")


def _check_installed() -> None:
    version = importlib.metadata.version("pysyncobj")
    if version != PINNED_VERSION:
        raise ImportError(f"veristore_py needs pysyncobj=={PINNED_VERSION} (it relies on its "
                          f"internals: veristore_py/raft.py); {version} is installed")
    missing = [name for name in _PRIVATE_METHODS if not callable(getattr(SyncObj, name, None))]
    if missing:
        raise ImportError(f"pysyncobj {version} lacks the private methods {missing} that "
                          "veristore_py/raft.py calls")


_check_installed()


def _private(sync_obj: SyncObj, name: str) -> Any:
    try:
        return getattr(sync_obj, f"_SyncObj__{name}")
    except AttributeError:
        raise RuntimeError(f"PySyncObj's private attribute __{name} is gone: "
                           "veristore_py/raft.py must follow the installed version") from None


def last_response_times(sync_obj: SyncObj) -> dict[Any, float]:
    """Peer node -> the monotonic time it last answered this leader."""
    times: dict[Any, float] = _private(sync_obj, "lastResponseTime")
    return times


def noop_index(sync_obj: SyncObj) -> int | None:
    """The log index of this leader's no-op entry of its term (None before it has one)."""
    index: int | None = _private(sync_obj, "noopIDx")
    return index


def replay_membership_change(sync_obj: SyncObj, command: Any) -> None:
    """Apply a journal entry's membership change again, if it is one, as PySyncObj would."""
    request = _private(sync_obj, "parseChangeClusterRequest")(command)
    if request is not None:
        _private(sync_obj, "doChangeCluster")(request)


def journal_factory() -> Callable[..., Journal]:
    """The function PySyncObj builds its journal with (`createJournal`)."""
    factory: Callable[..., Journal] = _syncobj_module.createJournal
    return factory


def set_journal_factory(factory: Callable[..., Journal]) -> None:
    """Replace the function PySyncObj builds its journal with."""
    _syncobj_module.createJournal = factory


def set_peer_compression(compress: Callable[..., bytes], decompress: Callable[..., bytes]) -> None:
    """Replace the zlib functions PySyncObj frames its peer messages with."""
    _tcp_connection.zlib = type("zlib", (), {"compress": staticmethod(compress),
                                             "decompress": staticmethod(decompress)})


ROLES = {0: "follower", 1: "candidate", 2: "leader"}
ACK_TERM = "veristore_term"


def stale_ack(message: Any, term: int) -> bool:
    """True for an acknowledgement stamped with a term other than `term` (Raft drops it)."""
    return (isinstance(message, dict) and message.get("type") == "next_node_idx"
            and message.get(ACK_TERM, term) != term)


class RaftHost(Protocol):
    """What a `RaftMember` calls back into (the node that holds it)."""

    def apply(self, index: int, entry: bytes) -> Any:
        """Apply the committed entry at log `index` (every replica, in log order)."""

    def sync_journal(self) -> None:
        """fsync the journal if anything was written since the last sync."""

    def settle_journal(self) -> None:
        """After each received message: let the journal finish a rewind."""

    def role_changed(self, old: str, new: str, term: int) -> None:
        """This member's role went from `old` to `new` (follower, candidate, leader)."""


@dataclass(frozen=True)
class Peer:
    """Another member as this one sees it."""

    address: str
    connected: bool
    match_index: int | None  # the leader's view of its log (None on a follower)


class DurableTransport(TCPTransport):
    """TCP transport that makes the journal durable before a message leaves the node.

    Except the leader's `append_entries`: the leader writes its own copy in parallel with
    replicating it (Raft dissertation, section 10.2.1), which is safe because the leader
    counts itself toward a commit only once its copy is durable: `RaftMember._onTick` syncs
    before PySyncObj's commit computation at the start of every tick, and the poll wrapper
    syncs before the tick thread waits for (and handles) the followers' answers. Everything
    else, in particular a follower's acknowledgement and a vote, is sent only after a sync.

    It also gives PySyncObj's acknowledgements (`next_node_idx`) the term Raft's responses
    carry: the sender's current term goes out in `ACK_TERM`, and a leader drops an
    acknowledgement from another term instead of letting a badly delayed one from its own
    earlier leadership raise a `matchIndex`. (An acknowledgement without it, from an older
    version of this code, is taken as before.)
    """

    def send(self, node: Any, message: Any) -> bool:
        if isinstance(message, dict) and message.get("type") == "next_node_idx":
            message = {**message, ACK_TERM: self._syncObj.raftCurrentTerm}
        if not (isinstance(message, dict) and message.get("type") == "append_entries"):
            self._syncObj.host.sync_journal()
        return bool(super().send(node, message))

    def _onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        if stale_ack(message, self._syncObj.raftCurrentTerm):
            return
        try:
            super()._onMessageReceived(node, message)
        finally:
            self._syncObj.host.settle_journal()


class RaftMember(SyncObj):
    """PySyncObj's Raft for one node, behind the facade the node uses (runs the tick thread).

    One ``@replicated`` method, `apply_entry(entry)`, carries every command batch; its log
    index is handed to the host with the entry.
    """

    def __init__(self, host: RaftHost, address: str, peers: list[str], conf: SyncObjConf) -> None:
        self.host = host
        conf.onStateChanged = self._role_changed
        if conf.dynamicMembershipChange:
            # A journal that keeps a truncated tail (`LmdbJournal.deleteEntriesFrom`) hands its
            # membership changes back to be applied again; hooked before the tick thread runs.
            conf.journalFile.on_membership = self.replay_membership
        super().__init__(address, peers, conf, transportClass=DurableTransport)
        # Sync while the followers work on what was just sent (see DurableTransport).
        wait_for_events = self._poller.poll

        def sync_then_poll(timeout: float) -> None:
            host.sync_journal()
            wait_for_events(timeout)

        self._poller.poll = sync_then_poll

    # -- PySyncObj's hooks -----------------------------------------------------------------

    @replicated
    def apply_entry(self, entry: bytes) -> Any:
        # PySyncObj bumps raftLastApplied after this returns.
        return self.host.apply(self.raftLastApplied + 1, entry)

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N803 (PySyncObj's name)
        """One PySyncObj tick, after making the journal durable.

        The leader computes its commit index first thing in a tick, counting its own log as
        a replica; since the leader sends entries before syncing them (DurableTransport), this
        sync is what makes that count true. A sync that fails aborts the tick before any
        commit (PySyncObj logs it and retries the tick).
        """
        self.host.sync_journal()
        super()._onTick(timeToWait)

    def _setCodeVersion(self, args: Any, callback: Any) -> None:  # noqa: N802 (PySyncObj's name)
        """Refuse PySyncObj's `set_version` admin command.

        A VERSION entry this code cannot run makes PySyncObj skip bumping its applied counter,
        which would shift the log index `apply_entry` derives; versioning is done with command
        ops inside our msgpack batches instead.
        """
        callback(None, "set_version is not supported by veristore")

    def _role_changed(self, old: int, new: int) -> None:
        self.host.role_changed(ROLES.get(old, "unknown"), ROLES.get(new, "unknown"),
                               int(self.raftCurrentTerm))

    # -- the facade ------------------------------------------------------------------------

    def propose(self, entry: bytes, callback: Callable[[Any, Any], None]) -> None:
        """Append `entry` on this leader; `callback(result, error)` runs once it is applied."""
        self.apply_entry(entry, callback=callback)

    @property
    def term(self) -> int:
        return int(self.raftCurrentTerm)

    @property
    def commit_index(self) -> int:
        return int(self.raftCommitIndex)

    @property
    def last_applied(self) -> int:
        return int(self.raftLastApplied)

    def is_leader(self) -> bool:
        return bool(self._isLeader())

    def leader_address(self) -> str | None:
        """Raft address of the last known leader (may be stale), or None."""
        leader = self._getLeader()
        return None if leader is None else str(leader.address)

    def in_cluster(self) -> bool:
        """PySyncObj's readiness: it has joined the cluster and loaded its log."""
        return bool(self.isReady())

    def peers(self) -> list[Peer]:
        """The other members, ordered by address, with connectivity and match index."""
        raw = self.raw_status()
        return [Peer(str(node.address), bool(self.isNodeConnected(node)),
                     raw.get("match_idx_server_" + node.id))
                for node in sorted(self.otherNodes, key=lambda n: n.id)]

    def raw_status(self) -> dict[str, Any]:
        """PySyncObj's status dict (`getStatus`), {} if the tick thread kept changing it."""
        for _ in range(5):
            try:
                return dict(self.getStatus())
            except RuntimeError:  # a dict changed size under us (tick thread); try again
                continue
        return {}

    def heard_from_majority(self, within_s: float, now: float) -> bool:
        """True if this leader heard from a majority (itself included) since `now - within_s`
        (monotonic seconds)."""
        if not self._isLeader():
            return False
        responses = last_response_times(self)
        horizon = now - within_s
        others = self.otherNodes
        fresh = sum(1 for node in others if responses.get(node, 0.0) > horizon)
        return fresh + 1 > (len(others) + 1) / 2

    def applied_own_term(self) -> bool:
        """True once this leader has applied an entry of its own term (its no-op)."""
        noop = noop_index(self)
        return noop is not None and self.raftLastApplied >= noop

    def replay_membership(self, commands: list[bytes]) -> None:
        """Apply membership-change entries again, in order, as PySyncObj does for new ones."""
        for command in commands:
            replay_membership_change(self, command)

    def add_member(self, address: str, callback: Callable[[Any, Any], None]) -> None:
        self.addNodeToCluster(address, callback=callback)

    def remove_member(self, address: str, callback: Callable[[Any, Any], None]) -> None:
        self.removeNodeFromCluster(address, callback=callback)

    def transfer_leadership(self) -> None:
        """Ask PySyncObj to hand leadership to another member (call on the tick thread)."""
        self.transferLeadership(None)

    def request_compaction(self) -> None:
        """Ask for a snapshot (log compaction) at the next tick."""
        self.forceLogCompaction()

    def add_tick_callback(self, callback: Callable[[], None]) -> None:
        self.addOnTickCallback(callback)

    def remove_tick_callback(self, callback: Callable[[], None]) -> None:
        self.removeOnTickCallback(callback)

    def shut_down(self) -> None:
        """Stop the tick thread and close the journal (`_destroy`), waiting for both."""
        self.destroy_synchronous()


__all__ = ["ACK_TERM", "FAIL_REASON", "LOGGER_NAME", "ROLES", "SERIALIZER_STATE", "Journal",
           "Peer", "RaftHost", "RaftMember", "SyncObjConf", "TCPNode", "journal_factory",
           "set_journal_factory", "set_peer_compression", "stale_ack"]
