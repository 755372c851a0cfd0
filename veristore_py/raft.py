"""The one module that touches PySyncObj: what we import from it, patch in it, and read from
its private state. Everything else in the project imports these names from here.

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
- the `pysyncobj.syncobj` logger, which `logs.py` filters.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

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


__all__ = ["FAIL_REASON", "LOGGER_NAME", "SERIALIZER_STATE", "Journal", "SyncObj",
           "SyncObjConf", "TCPNode", "TCPTransport", "journal_factory", "last_response_times",
           "noop_index", "replay_membership_change", "replicated", "set_journal_factory",
           "set_peer_compression"]
