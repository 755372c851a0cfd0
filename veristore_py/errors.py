"""Errors raised by veristore_py.

Every error says whether the operation *definitely* did not happen or *may* have happened::

    VeristoreError                      root; `definite` tells the caller whether a retry is safe
    ├── ConfigError                     bad settings (lists every problem at once)      definite
    ├── InvalidCommandError             malformed command or argument                   definite
    │   ├── CommandRejectedError        the state machine refused it: `reason`, detail   definite
    │   ├── IdempotencyConflictError    the key was used for another write (409)         definite
    │   ├── UnknownMemberError          a membership change names no member (404)        definite
    │   └── MembershipConflictError     the members' state refuses the change now (409)  definite
    ├── NotLeaderError                  this node does not lead; carries a leader hint   definite
    ├── NoLeaderError                   no leader is known (election under way)          definite
    ├── OverloadedError                 proposal queue full                              definite
    ├── StorageError                    LMDB failed underneath us                        indefinite
    ├── CommitTimeoutError              proposed, outcome unknown within the deadline    indefinite
    └── LeadershipLostError             leadership changed while the proposal was open   indefinite

A replicated apply never raises one of these: command errors become result values (see
`state.py`); these errors live at the edges (proposing, reading, configuring). A refused
command's result value becomes a `CommandRejectedError` carrying the machine's code and detail
as fields, so callers never parse them out of a message.

Every error may ask the HTTP layer for a status (`status`, None: the API's table by type
decides) and add fields to the error body (`extra`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

_NO_EXTRA: Mapping[str, Any] = MappingProxyType({})


class VeristoreError(Exception):
    """Root of all veristore_py errors."""

    code = "veristore_error"
    definite = False
    status: int | None = None
    extra: Mapping[str, Any] = _NO_EXTRA

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.code)
        self.detail = detail or self.code


class ConfigError(VeristoreError):
    """Settings are invalid; `problems` lists every one of them."""

    code = "invalid_config"
    definite = True

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class InvalidCommandError(VeristoreError):
    """The command or one of its arguments is malformed; nothing was proposed."""

    code = "invalid_request"
    definite = True


class CommandRejectedError(InvalidCommandError):
    """The state machine refused the command (its result said `ok: false`); nothing changed.

    `reason` and `reason_detail` are the machine's error code and detail. On the wire it stays
    an `invalid_request` whose detail reads "reason: detail"; domains map `reason` to their
    own errors.
    """

    def __init__(self, reason: str, reason_detail: str) -> None:
        super().__init__(f"{reason}: {reason_detail}")
        self.reason = reason
        self.reason_detail = reason_detail


class IdempotencyConflictError(InvalidCommandError):
    """The idempotency key was already used for a write of another op or key; nothing
    changed (the machine's `idempotency_key_reused` refusal)."""

    code = "idempotency_key_reused"
    status = 409


class BodyTimeoutError(InvalidCommandError):
    """The request body did not arrive within the server's body read timeout."""

    code = "body_timeout"
    status = 408


class UnknownMemberError(InvalidCommandError):
    """A membership change names a Raft address that is not a member; nothing changed."""

    code = "unknown_member"
    status = 404


class MembershipConflictError(InvalidCommandError):
    """The current membership refuses a well-formed change (already a member, the leader
    itself, another change pending, no reachable majority after it); nothing changed."""

    code = "membership_conflict"
    status = 409


class NotLeaderError(VeristoreError):
    """This node is not the leader; `leader` is the last known leader's Raft address or None."""

    code = "not_leader"
    definite = True

    def __init__(self, leader: str | None, detail: str = "") -> None:
        super().__init__(detail or f"not the leader (leader: {leader or 'unknown'})")
        self.leader = leader


class NoLeaderError(VeristoreError):
    """No leader is known or this leader lost its quorum; nothing was proposed."""

    code = "no_leader"
    definite = True


class OverloadedError(VeristoreError):
    """The proposal queue is full; nothing was proposed."""

    code = "overloaded"
    definite = True


class StorageError(VeristoreError):
    """The LMDB storage failed; the operation may or may not have taken effect."""

    code = "storage_error"
    definite = False


class CommitTimeoutError(VeristoreError):
    """The proposal was not applied within the deadline; it may still commit later."""

    code = "commit_timeout"
    definite = False


class LeadershipLostError(VeristoreError):
    """Leadership changed while the proposal was in flight; it may still commit."""

    code = "leadership_lost"
    definite = False
