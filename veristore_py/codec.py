"""msgpack encoding of replicated entries, stored records and snapshot headers.

A Raft entry carries one *batch*: ``[ENTRY_FORMAT, stamp_ms, [packed_command, ...]]``. The
leader stamps ``stamp_ms`` (its wall clock) when it proposes, so replicas never read their own
clocks while applying. Each command is packed on its own (so the group committer knows its size
and one undecodable command cannot spoil its neighbours) and is a plain map
(``{"op": "put", ...}``) of msgpack-native values; bytes stay bytes, strings stay strings.
Nothing here ever unpickles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import InvalidCommandError

ENTRY_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Batch:
    """A decoded Raft entry: the leader's stamp and the commands proposed together."""

    stamp_ms: int
    commands: list[Any]


def pack(obj: Any) -> bytes:
    """Encode `obj` as msgpack (bytes as bin, str as str)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """Decode msgpack produced by `pack`; raise InvalidCommandError on malformed input."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidCommandError(f"undecodable msgpack: {exc}") from exc


def encode_batch(stamp_ms: int, packed_commands: list[bytes]) -> bytes:
    """Encode one Raft entry from commands already packed with `pack`."""
    return pack([ENTRY_FORMAT, stamp_ms, packed_commands])


def decode_batch(data: bytes) -> Batch:
    """Decode a Raft entry; raise InvalidCommandError if it is not a batch this code knows.

    A command that does not decode becomes None (the machine answers it with an error result).
    """
    obj = unpack(data)
    if (
        not isinstance(obj, list)
        or len(obj) != 3
        or obj[0] != ENTRY_FORMAT
        or not isinstance(obj[1], int)
        or not isinstance(obj[2], list)
    ):
        raise InvalidCommandError("entry is not a version-1 batch")
    commands: list[Any] = []
    for packed in obj[2]:
        try:
            commands.append(unpack(packed) if isinstance(packed, bytes) else None)
        except InvalidCommandError:
            commands.append(None)
    return Batch(stamp_ms=obj[1], commands=commands)
