"""deploy/: the systemd units verify cleanly, members run exactly as the unit runs them
survive a rolling restart under load, a backup seeds a fresh member that catches up, and the
gateway's example config loads."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from cache_plane.cli import build_parser, cmd_gateway
from cache_plane.client import CachePlaneClient
from cache_plane.gateway.settings import load_api_keys, load_gateway_settings
from cache_plane.operations import BackupError, download_backup, restore_backup
from veristore_py.localcluster import free_ports, throwaway_pki
from veristore_py.tls import client_context

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "cache-plane@.service"
GATEWAY_UNIT = ROOT / "deploy" / "systemd" / "cache-plane-gateway.service"
CONFIGS = sorted((ROOT / "deploy" / "config").glob("node*.toml"))
GATEWAY_CONFIG = ROOT / "deploy" / "config" / "gateway.toml"
GATEWAY_KEYS = ROOT / "deploy" / "config" / "gateway-keys.example.toml"
TOKEN = "deploy-test-token"  # admin
ROUTE_TOKEN = "deploy-test-route-token"


def unit_directives(unit: Path = UNIT) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.mark.parametrize(("unit", "name"), [(UNIT, "cache-plane@node1.service"),
                                            (GATEWAY_UNIT, GATEWAY_UNIT.name)])
def test_unit_passes_systemd_analyze_verify_without_warnings(tmp_path, unit, name):
    """Each unit verifies with no output once its binary exists (and the template has an
    instance name)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (deploy/install.sh installs it)")
    binary = unit_directives(unit)["ExecStart"][0].split()[0]
    rendered = tmp_path / name
    rendered.write_text(unit.read_text().replace(binary, "/bin/true"))
    done = subprocess.run([analyze, "verify", str(rendered)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "" and done.stderr.strip() == "", \
        done.stdout + done.stderr


_OPERATIONAL = ("User", "EnvironmentFile", "Restart", "RestartSec", "TimeoutStopSec",
                "KillSignal", "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                "RestrictAddressFamilies", "LimitNOFILE")


def test_unit_has_the_operational_settings():
    d = unit_directives()
    for key in ("StateDirectory", *_OPERATIONAL):
        assert key in d, key
    assert d["Restart"] == ["on-failure"] and d["KillSignal"] == ["SIGTERM"]


def test_gateway_unit_is_hardened_like_the_member_unit_and_runs_the_gateway():
    """Same user, restart policy and every hardening directive as a member; `gateway --config`."""
    member, gateway = unit_directives(), unit_directives(GATEWAY_UNIT)
    for key in _OPERATIONAL:
        assert key in gateway, key
    hardening = UNIT.read_text().partition("# Hardening")[2].partition("[Install]")[0]
    for line in hardening.splitlines():
        if "=" in line and not line.startswith("#"):
            key = line.partition("=")[0]
            assert gateway.get(key) == member[key], key
    for key in ("User", "Group", "Restart", "KillSignal", "UMask"):
        assert gateway[key] == member[key], key
    argv = gateway["ExecStart"][0].split()
    assert argv[0] == member["ExecStart"][0].split()[0]
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_gateway and args.config == "/etc/cache-plane/gateway.toml"


def test_gateway_example_config_loads_with_its_files_in_place(tmp_path):
    """The example config (paths moved under a temp dir, the example keys file as its keys)
    passes `load_gateway_settings`, and names the members the example member configs use."""
    etc = tmp_path / "etc"
    text = GATEWAY_CONFIG.read_text().replace("/etc/cache-plane", str(etc))
    raw = tomllib.loads(text)
    for key, value in raw.items():
        if key.endswith("_file"):
            path = Path(value)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(GATEWAY_KEYS.read_text() if key == "api_keys_file" else "x\n")
            path.chmod(0o400)
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    settings = load_gateway_settings(str(config), env={})
    assert settings.api_keys_file == raw["api_keys_file"] and settings.tls_cert_file
    members = {"https://" + tomllib.loads(p.read_text())["http_address"] for p in CONFIGS}
    assert set(settings.cluster) == members
    assert all(base in settings.tokenizers for base in settings.lora.values())
    keys = load_api_keys(raw["api_keys_file"])
    assert {k.tenant for k in keys.values()} == {"team-a", "team-b"}


def test_install_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "deploy" / "install.sh")], check=True)


def test_example_configs_name_each_member_alike():
    """Three members; each lists the other two under the addresses they use themselves."""
    configs = [tomllib.loads(p.read_text()) for p in CONFIGS]
    assert len(configs) == 3
    own = {(c["raft_address"], c["http_address"]) for c in configs}
    for c in configs:
        peers = {(p["raft"], p["http"]) for p in c["peers"]}
        assert peers == own - {(c["raft_address"], c["http_address"])}


# -- members run exactly as the unit runs them ------------------------------------------------

class UnitMembers:
    """Three members started with the unit's ExecStart, EnvironmentFile and WorkingDirectory,
    with /etc/cache-plane and /var/lib/cache-plane moved under a temp dir and the example
    configs' addresses moved to loopback ports (user-less: the test is not root's business)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.etc, self.var = root / "etc", root / "var"
        (self.etc / "secrets").mkdir(parents=True)
        for name, value in (("raft-password", "pw-" + os.urandom(8).hex()), ("api-token", TOKEN),
                            ("tokens", f"route {ROUTE_TOKEN}")):
            path = self.etc / "secrets" / name
            path.write_text(value + "\n")
            path.chmod(0o400)
        # The CA and certificates an operator puts in /etc/cache-plane/tls (docs/security.md).
        # (ca.crt, member.crt, member.key: the names the example configs use)
        pki = throwaway_pki(str(self.etc / "tls"))
        self.tls = {"ca_file": pki["ca"], "cert_file": pki["client"]}
        ports = free_ports(6)
        self.names = [p.stem for p in CONFIGS]
        self.http: dict[str, str] = {}
        replacements: dict[str, str] = {}
        for i, path in enumerate(CONFIGS):
            c = tomllib.loads(path.read_text())
            replacements[c["raft_address"]] = f"127.0.0.1:{ports[2 * i]}"
            replacements[c["http_address"]] = f"127.0.0.1:{ports[2 * i + 1]}"
            self.http[path.stem] = f"https://127.0.0.1:{ports[2 * i + 1]}"
        replacements.update({"/etc/cache-plane": str(self.etc), "/var/lib/cache-plane": str(self.var)})
        for path in CONFIGS:
            (self.etc / path.name).write_text(_replace(path.read_text(), replacements))
            env = (ROOT / "deploy" / "config" / "cache-plane.env.example").read_text()
            (self.etc / f"{path.stem}.env").write_text(
                env + "CACHE_PLANE_NODE_LEASE_MS=3600000\nCACHE_PLANE_LOG_LEVEL=info\n")
        d = unit_directives()
        self.replacements = {**replacements, "%i": "{member}"}
        exe = shutil.which("cache-plane")
        binary = d["ExecStart"][0].split()[0]
        self.exec_start = _replace(d["ExecStart"][0], self.replacements)
        self.program = [exe] if exe else [sys.executable, "-m", "cache_plane"]
        self.binary = binary
        self.env_file = _replace(d["EnvironmentFile"][0].lstrip("-"), self.replacements)
        self.workdir = _replace(d["WorkingDirectory"][0], self.replacements)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, member: str) -> None:
        argv = self.exec_start.format(member=member).split()
        assert argv[0] == self.binary
        env = {**os.environ, **_read_env_file(self.env_file.format(member=member))}
        workdir = Path(self.workdir.format(member=member))
        workdir.mkdir(parents=True, exist_ok=True)  # systemd's StateDirectory=
        workdir.chmod(0o700)
        with open(self.root / f"{member}.log", "ab") as log:
            self.procs[member] = subprocess.Popen(
                self.program + argv[1:], env=env, cwd=workdir, stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self, member: str, timeout: float = 30.0) -> int:
        """What `systemctl stop` does: SIGTERM, wait up to TimeoutStopSec."""
        proc = self.procs.pop(member)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            views = [_get(url + "/health/ready", self.tls) for url in self.http.values()]
            if all(v is not None and v.get("status") == "ready" for v in views):
                return
            time.sleep(0.1)
        raise AssertionError(f"members not ready; logs under {self.root}")

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait()
        self.procs.clear()


def _replace(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


def _read_env_file(path: str) -> dict[str, str]:
    env = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if m and not line.lstrip().startswith("#"):
            env[m.group(1)] = m.group(2).strip().strip('"')
    return env


def _get(url: str, tls: dict[str, str] | None = None) -> dict | None:
    context = client_context(tls["ca_file"], tls["cert_file"]) if tls else None
    try:
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=1, context=context) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


class RouteLoad:
    """Routes every 20 ms from a thread through the public client until stopped."""

    def __init__(self, urls: list[str], tls: dict[str, str]) -> None:
        self.urls = urls
        self.tls = tls
        self.ok: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with CachePlaneClient(self.urls, token=ROUTE_TOKEN, timeout=20.0, **self.tls) as c:
            n = 0
            while not self._stop.is_set():
                n += 1
                rid = f"req-{n}"
                try:
                    got = await c.route("m", block_hashes=[1, 2, 3, n], request_id=rid)
                    await c.complete(rid, got["node_id"])
                    self.ok.append(rid)
                except Exception as exc:  # noqa: BLE001 (every failure is a test failure)
                    self.errors.append(f"{rid}: {exc!r}")
                await asyncio.sleep(0.02)

    def __enter__(self) -> RouteLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


async def _setup(urls: list[str], **tls: str) -> None:
    async with CachePlaneClient(urls, token=TOKEN, timeout=20.0, **tls) as c:
        await c.register_model("m", block_size=16)
        await c.register_node("gpu-a", "10.9.0.1:8000", ["m"], capacity_blocks=100_000,
                              max_active=10_000)


async def _state(urls: list[str], **tls: str) -> tuple[dict, list, list]:
    async with CachePlaneClient(urls, token=TOKEN, timeout=20.0, **tls) as c:
        models = (await c.request("GET", "/v1/models"))["models"]
        return await c.stats(), await c.nodes(), models


def test_rolling_restart_under_load_as_the_units_run_the_members(tmp_path):
    members = UnitMembers(tmp_path)
    try:
        for name in members.names:
            members.start(name)
        members.wait_ready()
        urls = list(members.http.values())
        asyncio.run(_setup(urls, **members.tls))
        with RouteLoad(urls, members.tls) as load:
            time.sleep(1.0)
            for name in members.names:  # one at a time, as docs/operations.md says
                assert members.stop(name) == 0, f"{name} did not exit cleanly on SIGTERM"
                members.start(name)
                members.wait_ready()
                time.sleep(0.5)
            time.sleep(0.5)
        assert load.errors == [] and len(load.ok) > 20, (load.errors[:5], len(load.ok))
        logs = "".join((tmp_path / f"{name}.log").read_text() for name in members.names)
        assert "leadership_handed_over" in logs  # the stopped leader handed over on SIGTERM
        stats, nodes, models = asyncio.run(_state(urls, **members.tls))
        assert stats["routes_total"] == len(load.ok)  # every acknowledged route, once
        assert [n["node_id"] for n in nodes] == ["gpu-a"] and [m["model_id"] for m in models] == ["m"]
    finally:
        members.close()


def test_backup_of_a_live_member_seeds_a_fresh_member_that_catches_up(cluster_factory, tmp_path):
    cluster = cluster_factory(module="cache_plane", api_token=TOKEN)
    cluster.start()
    cluster.wait_for_leader()
    asyncio.run(_setup(cluster.urls))

    async def routes(prefix: str, count: int) -> None:
        async with CachePlaneClient(cluster.urls, token=TOKEN) as c:
            for i in range(count):
                await c.route("m", block_hashes=[7, i], request_id=f"{prefix}-{i}")

    asyncio.run(routes("before", 30))
    backup = str(tmp_path / "backup.bin")
    with pytest.raises(BackupError, match="401"):  # the token is required
        asyncio.run(download_backup(cluster.urls[1], backup, token=None))
    header = asyncio.run(download_backup(cluster.urls[1], backup, token=TOKEN))
    assert header["applied"] > 0
    asyncio.run(routes("after", 30))  # written after the backup: must come from the leader
    victim = 2
    cluster.kill(victim)
    data_dir = cluster.nodes[victim].data_dir
    with pytest.raises(BackupError, match="not empty"):
        restore_backup(backup, data_dir)
    shutil.rmtree(data_dir)
    restore_backup(backup, data_dir)
    cluster.start_node(victim)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        digests = {(d or {}).get("digest") for d in (_get(u + "/v1/digest") for u in cluster.urls)}
        if len(digests) == 1 and None not in digests:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the restored member did not converge")
    stats = _get(cluster.urls[victim] + "/v1/stats")
    assert stats is not None and stats["routes_total"] == 60
