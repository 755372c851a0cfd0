"""The cache_plane domain's error and the one table that gives each of its codes an HTTP status.

`CachePlaneError` is a request the domain refused, definitely (nothing changed): the machine's
refusals (`unknown_model`, `node_mismatch`, ...), the service's own checks, and admission
rejections of a route (`no_room`, `all_nodes_busy`, ...; those carry the decision's candidate
breakdown in `extra`). Its status comes from `STATUS`, by code, in this one place.
"""

from __future__ import annotations

from typing import Any

from veristore_py.errors import VeristoreError

# Error code -> HTTP status; a code not listed is a 400.
STATUS: dict[str, int] = {
    # the request names something that does not exist
    "unknown_model": 404,
    "unknown_node": 404,
    "unknown_entry": 404,
    # it conflicts with the replicated state
    "duplicate_request": 409,
    "node_mismatch": 409,
    "node_down": 409,
    # malformed
    "invalid_command": 400,
    "invalid_request": 400,
    # admission: the prompt can never fit, or no node can take it now (retry later)
    "prompt_too_large": 413,
    "entry_too_large": 413,
    "no_node_for_model": 503,
    "no_node_up": 503,
    "all_nodes_busy": 503,
    "no_room": 503,
}


class CachePlaneError(VeristoreError):
    """A request the domain refused (definite); `code` picks its HTTP status from `STATUS`.

    `extra` holds fields added to the error body (a rejected route's `candidates` and
    `request_id`).
    """

    definite = True

    def __init__(self, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.code = code
        self.status = STATUS.get(code, 400)
        self.extra = extra
