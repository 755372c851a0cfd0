"""Membership change on a live cluster: add a fourth member, it catches up and can be
redirected to; remove it again (the CLI over the authenticated HTTP endpoints)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.integration.test_cluster import write_keys
from veristore_py.localcluster import free_ports

pytestmark = pytest.mark.integration
TOKEN = "members-token-for-tests"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cache_plane", *args], capture_output=True,
                          text=True, timeout=90, env={**os.environ, "CACHE_PLANE_API_TOKEN": TOKEN})


def status(url: str) -> dict:
    request = urllib.request.Request(url + "/v1/status",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=2) as r:
        return json.loads(r.read())


def test_add_then_remove_a_member(cluster_factory, tmp_path):
    cluster = cluster_factory(module="cache_plane", api_token=TOKEN)
    cluster.start()
    leader = cluster.wait_for_leader()
    asyncio.run(write_keys(cluster.urls, [f"k{i}" for i in range(20)], token=TOKEN))
    raft_port, http_port = free_ports(2)
    raft, http = f"127.0.0.1:{raft_port}", f"127.0.0.1:{http_port}"
    config = tmp_path / "new.toml"
    lines = [f'raft_address = "{raft}"', f'http_address = "{http}"',
             f'data_dir = "{tmp_path / "new-data"}"', f'password_file = "{cluster.password_file}"',
             f'api_token_file = "{cluster.token_file}"', 'log_format = "json"']
    for node in cluster.nodes:  # a new member is started with every current member as peer
        lines += ["[[peers]]", f'raft = "{node.raft}"', f'http = "{node.http}"']
    config.write_text("\n".join(lines) + "\n")
    with open(tmp_path / "new.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cache_plane", "serve", "--config",
                                 str(config)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        bad = cli("cluster", "add", "--endpoint", cluster.urls[leader], "--raft", "nonsense",
                  "--http", http)
        assert bad.returncode == 1 and "host:port" in bad.stderr
        follower = (leader + 1) % 3
        cluster.kill(follower)  # with one of three down, a fourth member leaves no majority
        refused = cli("cluster", "add", "--endpoint", cluster.urls[leader], "--raft", raft,
                      "--http", http)
        assert refused.returncode == 1 and "not a majority" in refused.stderr
        cluster.start_node(follower)
        leader = cluster.wait_for_leader()
        deadline = time.monotonic() + 10
        while not all(m["connected"] for m in status(cluster.urls[leader])["members"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        added = cli("cluster", "add", "--endpoint", cluster.urls[(leader + 1) % 3],
                    "--raft", raft, "--http", http)  # a follower: the client follows the 307
        assert added.returncode == 0, added.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            view = status(cluster.urls[leader])
            mine = status(f"http://{http}")
            if (len(view["members"]) == 4 and mine["applied_index"] >= view["commit_index"] - 5
                    and mine["leader_http"] == cluster.nodes[leader].http):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the new member did not join: {view} / {mine}")
        # every member knows the new member's HTTP address (for redirects), from the log
        for url in cluster.urls:
            assert {m["raft"]: m["http"] for m in status(url)["members"]}[raft] == http
        # the new member's links to the other followers come up shortly after it caught up
        deadline = time.monotonic() + 10
        while True:
            members = cli("cluster", "members", "--endpoint", f"http://{http}")
            if members.returncode == 0 and members.stdout.count("connected") == 4:
                break
            assert time.monotonic() < deadline, members.stdout
            time.sleep(0.2)
        again = cli("cluster", "add", "--endpoint", cluster.urls[leader], "--raft", raft,
                    "--http", http)
        assert again.returncode == 1 and "already a member" in again.stderr
        wrong = tmp_path / "wrong-token"
        wrong.write_text("not-the-token\n")
        refused = cli("cluster", "remove", "--endpoint", cluster.urls[leader], "--raft", raft,
                      "--token-file", str(wrong))  # the file wins over the environment
        assert refused.returncode == 1 and len(status(cluster.urls[leader])["members"]) == 4
        removed = cli("cluster", "remove", "--endpoint", cluster.urls[leader], "--raft", raft,
                      "--token-file", str(cluster.token_file))
        assert removed.returncode == 0, removed.stderr
        assert len(status(cluster.urls[leader])["members"]) == 3
        leader_raft = cluster.nodes[leader].raft
        self_remove = cli("cluster", "remove", "--endpoint", cluster.urls[leader],
                          "--raft", leader_raft)
        assert self_remove.returncode == 1 and "this member leads" in self_remove.stderr
        asyncio.run(write_keys(cluster.urls, ["after-removal"], token=TOKEN))  # 3 still commit
    finally:
        proc.kill()
        proc.wait()
