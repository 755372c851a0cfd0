"""A three-member cluster serving HTTPS with mTLS and role tokens, driven by the real client
and the real CLI with a throwaway CA (trustme); and what is refused without them."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys

import aiohttp
import pytest

from cache_plane.client import CachePlaneClient
from veristore_py.client import ClientRequestError, TLSVerificationError
from veristore_py.errors import NoLeaderError
from veristore_py.localcluster import throwaway_pki

pytestmark = pytest.mark.integration

ADMIN, ROUTE, READ = ("admin-" + "a" * 24, "route-" + "r" * 24, "read-" + "e" * 24)


@pytest.fixture
def pki(tmp_path):
    """A CA, the members' certificate (127.0.0.1), a client certificate and a role file."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# role token\nroute {ROUTE}\nread {READ}\n")
    return {**throwaway_pki(str(tmp_path)), "tokens": str(tokens)}


def test_https_mtls_and_roles_end_to_end(cluster_factory, pki):
    cluster = cluster_factory(module="cache_plane", api_token=ADMIN, ca_file=pki["ca"],
                              client_cert_file=pki["client"],
                              settings={"tls_cert_file": pki["cert"], "tls_key_file": pki["key"],
                                        "tls_client_ca_file": pki["ca"],
                                        "tokens_file": pki["tokens"]})
    assert all(url.startswith("https://") for url in cluster.urls)
    cluster.start()  # the harness waits for a leader over HTTPS with its client certificate
    tls = {"ca_file": pki["ca"], "cert_file": pki["client"]}

    async def drive() -> None:
        async with CachePlaneClient(cluster.urls, token=ADMIN, timeout=30, **tls) as admin:
            await _until_leader(admin)
            await admin.register_model("m", block_size=4)
            await admin.register_node("n1", "10.0.0.1:8000", ["m"], 100)
        async with CachePlaneClient(cluster.urls, token=ROUTE, **tls) as router:
            routed = await router.route("m", prompt="a b c d e f g h")
            assert routed["node_id"] == "n1"
            with pytest.raises(ClientRequestError) as err:  # a route token cannot add models
                await router.register_model("other")
            assert err.value.status == 403
        async with CachePlaneClient(cluster.urls, token=READ, **tls) as reader:
            assert [n["node_id"] for n in await reader.nodes()] == ["n1"]
            with pytest.raises(ClientRequestError) as err:
                await reader.route("m", prompt="a b c d")
            assert err.value.status == 403
        # No client certificate: the TLS handshake itself is refused (mTLS).
        context = ssl.create_default_context(cafile=pki["ca"])
        async with aiohttp.ClientSession() as bare:
            with pytest.raises(aiohttp.ClientError):
                async with bare.get(cluster.urls[0] + "/health/live", ssl=context) as r:
                    await r.read()
        # No CA: the member's certificate is not trusted (verification is always on).
        async with CachePlaneClient(cluster.urls[:1], token=READ, timeout=2,
                                    cert_file=pki["client"]) as unverified:
            with pytest.raises(TLSVerificationError, match="not trusted"):
                await unverified.nodes()

    asyncio.run(drive())

    # The CLI talks TLS too: CA, client certificate and token from flags and environment.
    env = {**os.environ, "CACHE_PLANE_API_TOKEN": READ, "CACHE_PLANE_CA_FILE": pki["ca"]}
    out = subprocess.run([sys.executable, "-m", "cache_plane", "status", "--endpoint",
                          cluster.urls[0], "--cert-file", pki["client"]],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "n1" in out.stdout and "leader https://" not in out.stderr
    denied = subprocess.run([sys.executable, "-m", "cache_plane", "status", "--endpoint",
                             cluster.urls[0]], capture_output=True, text=True, timeout=60,
                            env=env)
    assert denied.returncode == 1 and "error" in denied.stderr

    # ... and so does the bare engine's CLI (a token file of the read role).
    read_token = os.path.join(os.path.dirname(pki["ca"]), "read-token")
    with open(read_token, "w", encoding="utf-8") as f:
        f.write(READ)
    out = subprocess.run([sys.executable, "-m", "veristore_py", "status", "--endpoint",
                          cluster.urls[0], "--token-file", read_token, "--ca-file", pki["ca"],
                          "--cert-file", pki["client"]],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and '"leader"' in out.stdout, out.stderr

    # Tokens and the Raft password never reach the members' logs.
    for node in cluster.nodes:
        with open(node.log_path, encoding="utf-8") as f:
            text = f.read()
        assert "node_started" in text
        for secret in (ADMIN, ROUTE, READ, cluster.password):
            assert secret not in text


def test_plain_http_and_no_tokens_beyond_loopback_refuse_to_start(tmp_path):
    """A member on a non-loopback address without TLS and tokens exits with a clear message."""
    password = tmp_path / "pw"
    password.write_text("raft-password-for-the-test")
    config = tmp_path / "node.toml"
    config.write_text(f'raft_address = "127.0.0.1:1"\nhttp_address = "192.0.2.10:8000"\n'
                      f'data_dir = "{tmp_path / "data"}"\npassword_file = "{password}"\n')
    out = subprocess.run([sys.executable, "-m", "cache_plane", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "beyond loopback: set tls_cert_file and tls_key_file" in out.stderr
    assert "beyond loopback: set tokens_file" in out.stderr
    assert not os.path.exists(tmp_path / "data")


async def _until_leader(client: CachePlaneClient) -> None:
    for _ in range(200):
        try:
            await client.cluster(client.endpoints[0])
            status = await client.request("GET", "/v1/status")
            if status.get("leader"):
                return
        except NoLeaderError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("no leader over HTTPS")
