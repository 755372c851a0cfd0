"""Who may call what: roles, bearer tokens and the endpoint table's lookup. PURE.

Three roles, each allowed what the ones before it are:
- ``read``: state views, stats, metrics, the generic KV store's reads, status and digest;
- ``route``: also route, complete, heartbeats and KV events (gateways, routers, engines);
- ``admin``: also models, nodes, invalidation, membership, backup and generic KV writes.
``public`` endpoints (health, the OpenAPI document and its page) need no token.

Tokens come from a tokens file, one ``<role> <token>`` per line (``#`` comments; several
tokens per role, so a new one can be rolled out before the old one is removed). A presented
token is compared with every configured token in constant time (`hmac.compare_digest`, no
early exit), and tokens never appear in `repr`, errors or logs.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

ROLES = ("read", "route", "admin")
PUBLIC = "public"
_RANK = {PUBLIC: -1, **{role: rank for rank, role in enumerate(ROLES)}}
MIN_TOKEN_CHARS = 16


def allows(role: str, needed: str) -> bool:
    """True if a caller with `role` may call an endpoint that needs `needed`."""
    return _RANK[role] >= _RANK[needed]


def required_role(access: Mapping[tuple[str, str], str], method: str, path: str) -> str:
    """The role an endpoint needs (`access` maps (method, path template) to it). HEAD is
    GET's; an endpoint missing from the table needs ``admin`` (deny by default)."""
    method = "GET" if method == "HEAD" else method
    return access.get((method, path), "admin")


def parse_tokens(text: str) -> list[tuple[str, str]]:
    """A tokens file's (role, token) pairs; errors name the line, never the token. A field
    starting with `#` starts a comment (a `#` inside a token is part of it)."""
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        comment = next((i for i, field in enumerate(fields) if field.startswith("#")), None)
        fields = fields[:comment]
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(f"line {number}: expected '<role> <token>'")
        try:
            Tokens([(fields[0], fields[1])])
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        pairs.append((fields[0], fields[1]))
    return pairs


class Tokens:
    """Bearer tokens and their roles; `role_of` compares in constant time."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        entries: list[tuple[bytes, str]] = []
        for role, token in pairs:
            if role not in ROLES:  # (not echoed: a line written backwards holds a token here)
                raise ValueError(f"unknown role (roles: {', '.join(ROLES)})")
            if len(token) < MIN_TOKEN_CHARS:
                raise ValueError(f"a {role} token is shorter than {MIN_TOKEN_CHARS} characters")
            # Compare digests: equal lengths, so compare_digest leaks nothing about length.
            entries.append((hashlib.sha256(token.encode()).digest(), role))
        self._entries = tuple(entries)

    def role_of(self, authorization: str | None) -> str | None:
        """The highest role of the bearer token in an `Authorization` header, or None."""
        scheme, _, token = (authorization or "").partition(" ")
        # (headers are decoded with surrogateescape: undecodable bytes must not raise here)
        digest = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
        found = -1
        for known, role in self._entries:  # every entry, always: no early exit
            if hmac.compare_digest(known, digest) & (scheme.lower() == "bearer"):
                found = max(found, _RANK[role])
        return ROLES[found] if found >= 0 else None

    def roles(self) -> list[str]:
        return sorted({role for _, role in self._entries}, key=_RANK.__getitem__)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __repr__(self) -> str:
        return f"Tokens({len(self._entries)} tokens; roles {self.roles()})"
