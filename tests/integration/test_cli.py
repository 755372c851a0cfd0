"""The `cache-plane` CLI against real processes: cluster up, status, route, members, backup,
restore, cluster down."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def cli(*args, timeout=90):
    return subprocess.run([sys.executable, "-m", "cache_plane", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_cluster_up_status_route_down_leaves_no_process(tmp_path):
    """A local cluster starts, answers status and route, and stops with nothing left behind."""
    up = cli("cluster", "up", "--dir", str(tmp_path))
    assert up.returncode == 0, up.stderr
    with open(tmp_path / "cluster.json") as f:
        state = json.load(f)
    try:
        status = cli("status", "--endpoint", state["urls"][0])
        assert status.returncode == 0 and "leader http://" not in status.stdout
        assert "term" in status.stdout
        route = cli("route", "--endpoint", state["urls"][1], "--model", "m", "--prompt", "hi")
        assert route.returncode == 1 and "unknown_model" in route.stderr
        members = cli("cluster", "members", "--endpoint", state["urls"][2])
        assert members.returncode == 0 and members.stdout.count("connected") == 3
        assert "leader" in members.stdout
        backup = cli("backup", "--endpoint", state["urls"][1], "--out", str(tmp_path / "b.bin"))
        assert backup.returncode == 0 and "applied index" in backup.stdout, backup.stderr
        fresh = tmp_path / "fresh"
        restore = cli("restore", "--backup", str(tmp_path / "b.bin"), "--data-dir", str(fresh))
        assert restore.returncode == 0 and (fresh / "snapshot.bin").exists(), restore.stderr
        again = cli("restore", "--backup", str(tmp_path / "b.bin"), "--data-dir", str(fresh))
        assert again.returncode == 1 and "not empty" in again.stderr
        bogus = cli("restore", "--backup", str(tmp_path / "cluster.json"), "--data-dir",
                    str(tmp_path / "other"))
        assert bogus.returncode == 1 and "not a usable backup" in bogus.stderr
    finally:
        down = cli("cluster", "down", "--dir", str(tmp_path))
    assert down.returncode == 0
    for pid in state["pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_serve_reports_every_config_problem(tmp_path):
    """`serve` with a bad config exits 2 and lists each problem."""
    out = cli("serve", "--raft-address", "bad", "--data-dir", str(tmp_path))
    assert out.returncode == 2 and "raft_address" in out.stderr and "http_address" in out.stderr


def test_demo_runs_end_to_end_and_reaps_its_cluster(tmp_path):
    """The README's main command: a cluster, a simulated fleet, a leader kill, a table."""
    demo = cli("demo", "--requests", "120", "--dir", str(tmp_path), timeout=180)
    assert demo.returncode == 0, demo.stderr
    assert "prompt tokens reused" in demo.stdout and "leader killed mid-run" in demo.stdout
    assert "all member processes reaped" in demo.stdout
    assert "round robin" in demo.stdout
