"""Each role can do exactly what the table in docs/security.md says: every endpoint, called
with no token and with each role's token, on a real member (real Raft, LMDB, HTTP)."""

from __future__ import annotations

import os
import re

import aiohttp
import pytest

from cache_plane.api import create_app
from cache_plane.api.app import ACCESS_TABLE
from cache_plane.machine import CachePlaneMachine
from tests.members import single_member
from veristore_py.auth import PUBLIC, ROLES, allows
from veristore_py.config import NodeSettings
from veristore_py.localcluster import free_ports

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "security.md")
TOKENS = {role: f"{role}-token-for-the-role-tests" for role in ROLES}
ROW = re.compile(r"^\| `(GET|POST|PUT|DELETE)` \| `([^`]+)` \| (\w+) \|$")
# Path parameters: names of things that do not exist, so an allowed call changes nothing.
SAMPLES = {"{key}": "no-such-key", "{node_id}": "no-such-node", "{model_id}": "no-such-model",
           "{raft}": "127.0.0.1:1"}


def documented_table() -> dict[tuple[str, str], str]:
    with open(DOC, encoding="utf-8") as f:
        rows = [ROW.match(line.strip()) for line in f]
    return {(m.group(1), m.group(2)): m.group(3) for m in rows if m}


def test_the_documented_table_is_the_enforced_one():
    assert documented_table() == ACCESS_TABLE


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    directory = tmp_path_factory.mktemp("roles")
    tokens = directory / "tokens"
    tokens.write_text("".join(f"{role} {token}\n" for role, token in TOKENS.items()))
    raft, http = free_ports(2)
    settings = NodeSettings(raft_address=f"127.0.0.1:{raft}", http_address=f"127.0.0.1:{http}",
                            data_dir=str(directory / "data"), password="roles-test-password",
                            tokens_file=str(tokens)).validate()
    with single_member(settings, CachePlaneMachine()) as n:
        yield n


@pytest.mark.parametrize(("method", "path", "needed"),
                         [(m, p, r) for (m, p), r in sorted(documented_table().items())])
async def test_every_endpoint_with_every_caller(node, aiohttp_client, method, path, needed):
    client = await aiohttp_client(create_app(node, node.settings))
    url = path
    for name, value in SAMPLES.items():
        url = url.replace(name, value)
    for caller in (None, *ROLES):
        headers = {} if caller is None else {"Authorization": f"Bearer {TOKENS[caller]}"}
        body = None if method == "GET" else {}
        async with aiohttp.ClientSession(headers=headers) as session:
            r = await session.request(method, client.make_url(url), json=body)
            await r.read()
        allowed = needed == PUBLIC or (caller is not None and allows(caller, needed))
        if allowed:
            assert r.status not in (401, 403), (caller, r.status)
        else:
            assert r.status == (401 if caller is None else 403), (caller, r.status)
