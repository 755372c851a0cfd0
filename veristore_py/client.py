"""asyncio client for a veristore cluster: finds the leader, retries safely, times out cleanly.

Retry rules (a timed-out write has an unknown outcome, so retries must be safe):
- every write carries an idempotency key (generated unless given); the cluster stores each
  write's result under it, so a retried put / delete / cas returns the first outcome instead
  of applying twice;
- ``307`` (not the leader) is followed at once; ``503`` (no leader) and connection errors are
  retried against the other endpoints with back-off until `timeout` runs out;
- when time runs out the last error is raised: `definite` tells whether the write certainly
  did not happen.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from typing import Any, Self
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from .config import is_loopback_host
from .errors import (
    CommitTimeoutError,
    InvalidCommandError,
    NoLeaderError,
    VeristoreError,
)
from .tls import client_context


def _dumps(body: Any) -> str:
    """JSON with orjson (several times faster); the json module for what orjson refuses
    (integers beyond 64 bits, non-string keys), so a bad body still reaches the server's
    validation and comes back as its 400."""
    try:
        return orjson.dumps(body).decode()
    except TypeError:
        return json.dumps(body)


class KeyNotFoundError(VeristoreError):
    """The key does not exist."""

    code = "key_not_found"
    definite = True


class ClientRequestError(VeristoreError):
    """The server rejected the request (4xx other than redirects)."""

    definite = True

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status: int | None = status
        self.code = code


class TLSVerificationError(VeristoreError):
    """A member's certificate did not verify (a configuration problem: not retried)."""

    code = "tls_verification_failed"
    definite = True


class VeristoreClient:
    """Talk to any member; requests land on the leader. Use as an async context manager."""

    # Error codes answered with 503 that are the server's final word on this request (an
    # application's admission refusals), not a missing leader: raised at once, not retried.
    final_codes: frozenset[str] = frozenset()

    def __init__(self, endpoints: list[str], *, token: str | None = None, timeout: float = 10.0,
                 attempt_timeout: float = 6.0, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None,
                 allow_plain_http: bool = False) -> None:
        """`endpoints` are URLs (``https://host:port``) or ``host:port`` (https when a CA or
        client certificate is given, else http). HTTPS is always verified: against `ca_file`
        when given, else the system's CAs; `cert_file`/`key_file` present a client
        certificate (mTLS). A token is never sent over plain HTTP beyond loopback (nor after
        a redirect from https to http) unless `allow_plain_http`."""
        if not endpoints:
            raise InvalidCommandError("at least one endpoint is required")
        scheme = "https" if (ca_file or cert_file) else "http"
        self.endpoints = [e.rstrip("/") if "://" in e else f"{scheme}://{e}" for e in endpoints]
        self._allow_plain_http = allow_plain_http or not token
        for url in self.endpoints:
            self._check_plain_http(url)
        self._ssl = client_context(ca_file, cert_file, key_file)
        self.timeout = timeout
        self._attempt_timeout = attempt_timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._leader: str | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(headers=self._headers,
                                              connector=aiohttp.TCPConnector(ssl=self._ssl),
                                              json_serialize=_dumps)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- KV --------------------------------------------------------------------------------

    async def get(self, key: str, consistency: str = "linearizable") -> dict[str, Any] | None:
        """Return ``{"key", "value", "revision"}`` or None if the key does not exist."""
        try:
            return await self.request("GET", f"/v1/kv/{quote(key, safe='')}",
                                      params={"consistency": consistency})
        except KeyNotFoundError:
            return None

    async def put(self, key: str, value: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        body = {"value": value, "idempotency_key": idempotency_key or uuid.uuid4().hex}
        return await self.request("PUT", f"/v1/kv/{quote(key, safe='')}", json=body)

    async def delete(self, key: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        body = {"idempotency_key": idempotency_key or uuid.uuid4().hex}
        return await self.request("DELETE", f"/v1/kv/{quote(key, safe='')}", json=body)

    async def cas(self, key: str, expected: str | None, value: str | None, *,
                  idempotency_key: str | None = None) -> dict[str, Any]:
        """Set `key` to `value` if it holds `expected` (None = absent / delete)."""
        body = {"expected": expected, "value": value,
                "idempotency_key": idempotency_key or uuid.uuid4().hex}
        return await self.request("POST", f"/v1/kv/{quote(key, safe='')}/cas", json=body)

    async def scan(self, prefix: str = "", *, limit: int = 100, after: str | None = None,
                   consistency: str = "linearizable") -> dict[str, Any]:
        params: dict[str, Any] = {"prefix": prefix, "limit": limit, "consistency": consistency}
        if after is not None:
            params["after"] = after
        return await self.request("GET", "/v1/kv", params=params)

    async def status(self, endpoint: str | None = None) -> dict[str, Any]:
        """One member's view of the cluster (no leader needed)."""
        return await self.request("GET", "/v1/status", endpoint=endpoint)

    # -- transport -------------------------------------------------------------------------

    def _check_plain_http(self, url: str) -> None:
        """Refuse to send the token in clear text to a host beyond loopback."""
        parsed = URL(url)
        if (parsed.scheme == "http" and not self._allow_plain_http
                and not is_loopback_host(parsed.host or "")):
            raise InvalidCommandError(
                f"refusing to send a bearer token over plain HTTP to {url}: use https:// "
                "(or allow_plain_http=True)")

    def _order(self) -> list[str]:
        others = [e for e in self.endpoints if e != self._leader]
        random.shuffle(others)
        return ([self._leader] if self._leader else []) + others

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: dict[str, Any] | None = None, endpoint: str | None = None) -> Any:
        """Send one API request, following the leader and retrying until `timeout`."""
        if self._session is None:
            raise InvalidCommandError("use the client as 'async with VeristoreClient(...)'")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        last: VeristoreError = NoLeaderError("no endpoint answered")
        maybe_applied = False  # some attempt of this write may have reached a leader
        delay = 0.05
        while loop.time() < deadline:
            for base in [endpoint] if endpoint else self._order():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                url = base + path
                try:
                    result = await self._send(method, url, json, params,
                                              min(remaining, self._attempt_timeout))
                except _Redirect as redirect:
                    if base.startswith("https://") and not redirect.base.startswith("https://"):
                        raise InvalidCommandError(
                            f"{base} redirected to {redirect.base}: refusing to leave HTTPS"
                        ) from None
                    self._check_plain_http(redirect.base)
                    self._leader = redirect.base
                    if endpoint:
                        endpoint = redirect.base
                    last = NoLeaderError("redirected to the leader")
                    break
                except ClientRequestError as exc:
                    if maybe_applied:  # this answer does not undo an earlier attempt
                        raise CommitTimeoutError(
                            f"an earlier attempt may have been applied; this one was refused: "
                            f"{exc.detail}") from exc
                    raise
                except _Retry as retry:
                    last = retry.error
                    maybe_applied = maybe_applied or (method != "GET" and not last.definite)
                    if retry.forget_leader and self._leader == base:
                        self._leader = None
                    continue
                if method != "GET" or path != "/v1/status":
                    self._leader = base
                return result
            else:
                await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
                delay = min(delay * 2, 0.5)
        if maybe_applied and last.definite:
            raise CommitTimeoutError(f"gave up after {self.timeout}s; an earlier attempt may "
                                     f"have been applied (last error: {last.detail})")
        raise last

    async def _send(self, method: str, url: str, body: Any, params: dict[str, Any] | None,
                    timeout: float) -> Any:
        assert self._session is not None
        try:
            async with self._session.request(
                method, url, json=body, params=params, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                try:
                    payload = await resp.json(content_type=None, loads=orjson.loads)
                except ValueError:
                    payload = {"error": "bad_response", "detail": await resp.text()}
        except TimeoutError as exc:
            raise _Retry(CommitTimeoutError(f"{method} {url} timed out"), True) from exc
        except aiohttp.ClientConnectorCertificateError as exc:  # nothing was sent: definite
            raise TLSVerificationError(
                f"{url}: the member's certificate is not trusted ({exc.certificate_error}); "
                "give the CA that signed it (ca_file, --ca-file or $CACHE_PLANE_CA_FILE)") from exc
        except aiohttp.ClientError as exc:
            # The request may have reached the leader; writes are idempotent, so retry.
            raise _Retry(CommitTimeoutError(f"{method} {url}: {exc}"), True) from exc
        if resp.status < 300:
            return payload
        if resp.status == 307:
            location = resp.headers.get("Location") or (payload or {}).get("leader")
            if location:
                raise _Redirect(str(URL(location).origin()))
        error = payload if isinstance(payload, dict) else {}
        code, detail = str(error.get("error", resp.status)), str(error.get("detail", ""))
        if resp.status == 404 and code == "key_not_found":
            raise KeyNotFoundError(detail)
        if resp.status in (503, 504) and code not in self.final_codes:
            exc_type = NoLeaderError if error.get("definite") else CommitTimeoutError
            raise _Retry(exc_type(f"{code}: {detail}"), resp.status == 503)
        raise ClientRequestError(resp.status, code, detail)


class _Redirect(Exception):
    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")


class _Retry(Exception):
    def __init__(self, error: VeristoreError, forget_leader: bool) -> None:
        self.error = error
        self.forget_leader = forget_leader
