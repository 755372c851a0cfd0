"""VeristoreClient: a refusal after an attempt that may have been applied is not definite."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from veristore_py.client import ClientRequestError, VeristoreClient
from veristore_py.errors import CommitTimeoutError


async def _run(handler_results: list[str]) -> BaseException | dict:
    calls = iter(handler_results)

    async def handler(request: web.Request) -> web.Response:
        what = next(calls)
        if what == "hang":
            await asyncio.sleep(2)
        if what == "ok":
            return web.json_response({"ok": True})
        return web.json_response({"error": "unknown_model", "detail": "no such model",
                                  "definite": True}, status=404)

    app = web.Application()
    app.router.add_post("/v1/route", handler)
    async with TestServer(app) as server:
        url = str(server.make_url("")).rstrip("/")
        async with VeristoreClient([url], timeout=3.0, attempt_timeout=0.2) as client:
            try:
                return await client.request("POST", "/v1/route", json={})
            except Exception as exc:  # noqa: BLE001 (the test inspects it)
                return exc


def test_refusal_after_a_timed_out_attempt_is_indefinite():
    """Attempt 1 timed out (it may have been applied); attempt 2's 404 cannot undo it."""
    err = asyncio.run(_run(["hang", "refuse"]))
    assert isinstance(err, CommitTimeoutError) and not err.definite
    assert "may have been applied" in str(err)


def test_refusal_on_the_first_attempt_stays_definite():
    err = asyncio.run(_run(["refuse"]))
    assert isinstance(err, ClientRequestError) and err.definite


@pytest.mark.parametrize("script", [["ok"], ["hang", "ok"]])
def test_success_is_returned(script):
    assert asyncio.run(_run(script)) == {"ok": True}


def test_a_token_never_goes_over_plain_http_beyond_loopback():
    """Refused at construction unless the caller opts in; loopback and https are fine."""
    from veristore_py.errors import InvalidCommandError

    with pytest.raises(InvalidCommandError, match="plain HTTP"):
        VeristoreClient(["http://10.0.0.1:8000"], token="t" * 20)
    VeristoreClient(["http://10.0.0.1:8000"], token="t" * 20, allow_plain_http=True)
    VeristoreClient(["http://127.0.0.1:8000", "https://10.0.0.1:8000"], token="t" * 20)
    VeristoreClient(["http://10.0.0.1:8000"])  # no token, nothing to leak


def test_a_redirect_from_https_to_http_is_not_followed():
    """A member that points an HTTPS client at plain HTTP is refused (the token would follow)."""
    import ssl

    import trustme

    from veristore_py.errors import InvalidCommandError

    async def scenario() -> BaseException | None:
        ca = trustme.CA()
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(server_context)

        async def handler(request: web.Request) -> web.Response:
            return web.json_response({"error": "not_leader"}, status=307,
                                     headers={"Location": "http://127.0.0.1:1/v1/status"})

        app = web.Application()
        app.router.add_get("/v1/status", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
        await site.start()
        port = runner.addresses[0][1]
        with ca.cert_pem.tempfile() as ca_file:
            try:
                async with VeristoreClient([f"https://127.0.0.1:{port}"], token="t" * 20,
                                           ca_file=ca_file, timeout=3) as client:
                    await client.request("GET", "/v1/status")
            except InvalidCommandError as exc:
                return exc
            finally:
                await runner.cleanup()
        return None

    err = asyncio.run(scenario())
    assert isinstance(err, InvalidCommandError) and "refusing to leave HTTPS" in str(err)
