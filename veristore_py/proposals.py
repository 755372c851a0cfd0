"""Propose commands and read state from asyncio code, at a chosen consistency (no HTTP here).

`propose` submits a command through the node's group committer and waits for its apply
result; `read` runs a read-only command linearizably (through the log), under the leader's
lease, or from this replica's state (stale). A command the machine refuses raises
`CommandRejectedError` with its code and detail as fields.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .errors import CommandRejectedError, CommitTimeoutError, InvalidCommandError
from .node import VeristoreNode

CONSISTENCY = ("linearizable", "lease", "stale")


def check(result: dict[str, Any]) -> dict[str, Any]:
    """`result` if the machine applied the command, else its refusal as an error."""
    if not result.get("ok"):
        raise CommandRejectedError(str(result.get("error")), str(result.get("detail")))
    return result


async def propose(node: VeristoreNode, command: dict[str, Any],
                  linger_s: float = 0.0) -> dict[str, Any]:
    """Submit `command` on the leader and await its apply result (errors raise).

    `linger_s`: see `GroupCommitter.submit`."""
    return check(await asyncio.wrap_future(node.submit(command, linger_s)))


async def read(node: VeristoreNode, command: dict[str, Any],
               consistency: str = "linearizable") -> dict[str, Any]:
    """Run a read-only command at `consistency` (one of `CONSISTENCY`)."""
    if consistency == "linearizable":
        return await propose(node, command)
    if consistency == "lease":
        node.require_current_leader()
        target = node.commit_index
        for _ in range(200):
            if node.last_applied >= target:
                break
            await asyncio.sleep(0.005)
        else:
            raise CommitTimeoutError("leader did not apply its commit index in time")
        return check(node.read_local(command))
    if consistency == "stale":
        return check(node.read_local(command))
    raise InvalidCommandError("query 'consistency' must be linearizable, lease or stale")
