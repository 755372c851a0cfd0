"""Operator tasks behind `cache-plane backup` and `cache-plane restore` (docs/operations.md).

- `download_backup`: ask one live member for a fresh snapshot (``POST /v1/backup``: PySyncObj
  log compaction, an fsynced file holding the last applied entry and an LMDB copy of the
  state) and save it atomically.
- `restore_backup`: seed an *empty* data dir with such a file as its ``snapshot.bin``. The
  member then starts from that state and catches up the rest from the leader. It starts
  with no Raft term or vote, like a member whose data dir was emptied, so replace one member
  at a time while the other two are healthy.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
from typing import Any

import aiohttp

from veristore_py.errors import StorageError
from veristore_py.snapshot import read_header
from veristore_py.storage import fsync_dir

SNAPSHOT_FILE = "snapshot.bin"


class BackupError(Exception):
    """A backup could not be taken or restored (the message says why)."""


async def download_backup(endpoint: str, out_path: str, token: str | None = None,
                          timeout_s: float = 300.0,
                          ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """Save member `endpoint`'s fresh snapshot to `out_path`; return the snapshot header.
    HTTPS is verified with `ssl_context` (default: the system's CAs)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    partial = out_path + ".partial"
    connector = aiohttp.TCPConnector(ssl=ssl_context or True)
    try:
        async with aiohttp.ClientSession(connector=connector) as session, session.post(
                endpoint.rstrip("/") + "/v1/backup", headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                raise BackupError(f"{endpoint} answered {resp.status}: {await resp.text()}")
            with open(partial, "wb") as f:
                async for chunk in resp.content.iter_chunked(1 << 20):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        _remove(partial)
        raise BackupError(f"backup from {endpoint} failed: {exc}") from exc
    except BackupError:
        _remove(partial)
        raise
    header = check_backup(partial)
    os.replace(partial, out_path)
    return header


def check_backup(path: str) -> dict[str, Any]:
    """The header of the snapshot file at `path`; BackupError if it is not one."""
    try:
        with open(path, "rb") as f:
            return read_header(f)
    except (OSError, StorageError, ValueError) as exc:
        raise BackupError(f"{path} is not a usable backup: {exc}") from exc


def restore_backup(backup_path: str, data_dir: str) -> dict[str, Any]:
    """Make `backup_path` the snapshot of a fresh member at `data_dir` (which must be empty)."""
    header = check_backup(backup_path)
    if os.path.isdir(data_dir) and os.listdir(data_dir):
        raise BackupError(f"{data_dir} is not empty: restore only into a fresh data dir (move "
                          f"the old one away first)")
    os.makedirs(data_dir, exist_ok=True)
    target = os.path.join(data_dir, SNAPSHOT_FILE)
    with open(backup_path, "rb") as src, open(target + ".partial", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(target + ".partial", target)
    fsync_dir(data_dir)
    return header


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
