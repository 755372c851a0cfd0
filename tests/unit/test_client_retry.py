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
