"""Network partitions through the chaos harness's per-link proxies (real processes)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from chaos.network import Network
from tests.integration.test_cluster import read_keys, wait_converged, write_keys

pytestmark = pytest.mark.integration


def put_status(url: str, key: str) -> int | str:
    """HTTP status of one PUT sent straight to `url` (no redirects followed)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return None

    req = urllib.request.Request(f"{url}/v1/kv/{key}", method="PUT",
                                 data=json.dumps({"value": "x"}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=3) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return "timeout"


def test_leader_in_minority_stops_deciding_and_majority_takes_over(cluster_factory):
    """Isolate the leader: it stops acknowledging, the other two elect a leader and keep
    every acknowledged write; after healing the old leader follows and all converge."""
    cluster = cluster_factory(proxy_links=True)
    with Network(cluster.links) as net:
        cluster.start()
        leader = cluster.wait_for_leader()
        before = [f"before-{i}" for i in range(20)]
        asyncio.run(write_keys(cluster.urls, before))
        net.isolate(leader)
        majority = [i for i in range(3) if i != leader]
        new_leader = cluster.wait_for_leader(among=majority)
        assert new_leader != leader
        # the isolated member refuses: no quorum lease, and it no longer claims to lead
        assert put_status(cluster.nodes[leader].url, "from-minority") in (307, 503, "timeout")
        during = [f"during-{i}" for i in range(20)]
        asyncio.run(write_keys([cluster.nodes[i].url for i in majority], during))
        net.heal()
        cluster.wait_for_leader()
        wait_converged(cluster, [0, 1, 2])
        values = asyncio.run(read_keys(cluster.urls, before + during + ["from-minority"]))
        assert all(values[k] == f"v-{k}" for k in before + during)
        assert values["from-minority"] is None
