"""PySyncObj's log lines that our code makes misleading or noisy are rewritten."""

from __future__ import annotations

import logging

from veristore_py.logs import _RewindIsNotDivergence, _SnapshotFailureIsLoggedOnce


def record(level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("pysyncobj.syncobj", level, __file__, 1, msg, args, None)


def test_pysyncobj_rewind_and_snapshot_failure_lines_are_downgraded(monkeypatch):
    monkeypatch.setattr(logging.getLogger(), "level", logging.INFO)
    rewind = record(logging.CRITICAL, "truncating already-applied log entries from index %d "
                    "(last applied: %d) - state machine may have diverged", 5, 7)
    assert _RewindIsNotDivergence().filter(rewind)
    assert rewind.levelname == "INFO" and "diverged" not in rewind.getMessage()
    assert rewind.getMessage().startswith("follower_log_rewound: truncating")
    failed = record(logging.WARNING, "Failed to store full dump")
    assert not _SnapshotFailureIsLoggedOnce().filter(failed)  # debug, and we log at info
    assert failed.levelname == "DEBUG"
    other = record(logging.WARNING, "some other warning")
    assert _SnapshotFailureIsLoggedOnce().filter(other) and _RewindIsNotDivergence().filter(other)
    assert other.levelname == "WARNING"
