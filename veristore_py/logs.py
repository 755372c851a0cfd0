"""structlog set-up: JSON lines in production, a console renderer on a TTY.

PySyncObj logs through the standard library; its records are rendered by the same processors
so one process writes one format.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from .raft import LOGGER_NAME


class _RewindIsNotDivergence(logging.Filter):
    """Downgrade PySyncObj's "truncating already-applied log entries" from critical to info.

    PySyncObj 0.3.17 logs it whenever a follower whose next index the leader rewound holds
    entries past the resend point, and warns that the state machine "may have diverged".
    Here it has not: `LmdbJournal.deleteEntriesFrom` keeps those entries and truncates only
    from the first conflicting one, so votes and the disk see the whole log, Raft's election
    rule holds, and an applied (committed) entry never conflicts.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.CRITICAL and str(record.msg).startswith(
                "truncating already-applied"):
            record.msg = "follower_log_rewound: " + record.getMessage().split(" - ")[0]
            record.args = ()
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger().isEnabledFor(logging.INFO)
        return True


class _SnapshotFailureIsLoggedOnce(logging.Filter):
    """Downgrade PySyncObj's "Failed to store full dump" warning to debug.

    `SnapshotManager` logs each failed build (`snapshot_failed`, with its cause) and then
    refuses new attempts for a while; PySyncObj would still warn on every refused attempt,
    every other tick (a full disk filled the log with it).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and record.msg == "Failed to store full dump":
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def configure_logging(fmt: str = "auto", level: str = "info", **bind: Any) -> None:
    """Configure structlog and stdlib logging for this process; bind `bind` to every event."""
    if fmt == "auto":
        fmt = "console" if sys.stdout.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    pysyncobj_log = logging.getLogger(LOGGER_NAME)
    for kind in (_RewindIsNotDivergence, _SnapshotFailureIsLoggedOnce):
        if not any(isinstance(f, kind) for f in pysyncobj_log.filters):
            pysyncobj_log.addFilter(kind())
    structlog.contextvars.bind_contextvars(**bind)
