"""Start, fault and stop a cluster of real node processes on loopback (tests, demo, bench).

Each node is a separate ``python -m <module> serve --config node<i>.toml`` process with its own
data dir, free ports picked at run time, and a per-cluster random Raft password in a 0600 file.
`close()` kills and reaps every process it started, whatever state the cluster is in.

With ``proxy_links=True`` every Raft connection goes through an address the harness can
proxy (`links`), so chaos tests can cut and heal single links. PySyncObj opens one TCP
connection per pair of members, from the member whose own address sorts higher to the
other, and the connecting side announces its own address. So member i names a lower member
j by the link's proxy address (which sorts below every member address, so i still dials),
and a higher member by its real address (i only accepts from it). Members then name each
other differently, so such a cluster runs with ``dynamic_membership = false``: with it on,
PySyncObj replaces a member's peer list with the one inside a snapshot it installs, which is
the sender's naming.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from .tls import client_context


def free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


@dataclass
class NodeSpec:
    """One member: its addresses, directories and (while running) its process."""

    index: int
    raft: str
    http: str
    data_dir: str
    config_path: str
    log_path: str
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False
    scheme: str = "http"  # https when the members serve TLS

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.http}"


@dataclass(frozen=True, slots=True)
class Link:
    """The Raft connection member `source` opens to member `target`, via `listen`."""

    source: int
    target: int
    listen: str     # the proxy's address, the name `source` has for `target`
    upstream: str   # `target`'s real Raft address


@dataclass
class LocalCluster:
    """A cluster of `size` node processes under `base_dir` (see module docstring)."""

    base_dir: str
    size: int = 3
    module: str = "veristore_py"
    settings: dict[str, Any] = field(default_factory=dict)
    api_token: str | None = None
    password: str | None = None
    # The CA that signed the members' certificates (`settings` names tls_cert_file and
    # tls_key_file: members serve HTTPS and this harness verifies them with it).
    ca_file: str | None = None
    client_cert_file: str | None = None  # certificate + key (one PEM) when members want mTLS
    env: dict[str, str] = field(default_factory=dict)
    proxy_links: bool = False
    nodes: list[NodeSpec] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)

    def __post_init__(self) -> None:
        os.makedirs(self.base_dir, exist_ok=True)
        self.password = self.password or secrets.token_hex(16)
        self.password_file = os.path.join(self.base_dir, "raft-password")
        _write_private(self.password_file, self.password)
        self.token_file = None
        if self.api_token:
            self.token_file = os.path.join(self.base_dir, "api-token")
            _write_private(self.token_file, self.api_token)
        pairs = [(i, j) for i in range(self.size) for j in range(i)]
        n_proxies = len(pairs) if self.proxy_links else 0
        while True:
            ports = free_ports(2 * self.size + n_proxies)
            if len({len(str(p)) for p in ports}) == 1:
                break  # equal digit counts: addresses sort as their ports do
        ports.sort()
        proxy_ports, raft_ports = ports[:n_proxies], ports[n_proxies:n_proxies + self.size]
        http_ports = ports[n_proxies + self.size:]
        for i in range(self.size):
            node_dir = os.path.join(self.base_dir, f"node{i}")
            os.makedirs(node_dir, exist_ok=True)
            self.nodes.append(NodeSpec(
                index=i, raft=f"127.0.0.1:{raft_ports[i]}", http=f"127.0.0.1:{http_ports[i]}",
                data_dir=os.path.join(node_dir, "data"),
                config_path=os.path.join(node_dir, "node.toml"),
                log_path=os.path.join(node_dir, "node.log"),
                scheme="https" if self.settings.get("tls_cert_file") else "http",
            ))
        for (i, j), port in zip(pairs, proxy_ports, strict=False):
            self.links.append(Link(i, j, f"127.0.0.1:{port}", self.nodes[j].raft))
        for node in self.nodes:
            self._write_config(node)

    def _write_config(self, node: NodeSpec) -> None:
        lines = [
            f"raft_address = {_toml_value(node.raft)}",
            f"http_address = {_toml_value(node.http)}",
            f"data_dir = {_toml_value(node.data_dir)}",
            f"password_file = {_toml_value(self.password_file)}",
            'log_format = "json"',
        ]
        if self.token_file:
            lines.append(f"api_token_file = {_toml_value(self.token_file)}")
        settings = dict(self.settings)
        if self.proxy_links:
            settings["dynamic_membership"] = False  # see the module docstring
        for key, value in settings.items():
            lines.append(f"{key} = {_toml_value(value)}")
        for other in self.nodes:
            if other is not node:
                lines += ["[[peers]]", f"raft = {_toml_value(self.name_of(other.index, node.index))}",
                          f"http = {_toml_value(other.http)}"]
        with open(node.config_path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def name_of(self, j: int, seen_by: int) -> str:
        """The Raft address member `seen_by` knows member `j` by."""
        for link in self.links:
            if (link.source, link.target) == (seen_by, j):
                return link.listen
        return self.nodes[j].raft

    # -- processes -------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> LocalCluster:
        for node in self.nodes:
            self.start_node(node.index)
        return self

    def start_node(self, i: int, extra_args: list[str] | None = None,
                   env: dict[str, str] | None = None) -> None:
        node = self.nodes[i]
        if node.process is not None and node.process.poll() is None:
            return
        log = open(node.log_path, "ab")  # noqa: SIM115 (closed when the child exits)
        node.process = subprocess.Popen(
            [sys.executable, "-m", self.module, "serve", "--config", node.config_path,
             *(extra_args or [])],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env, **(env or {})}, start_new_session=True,
        )
        log.close()
        node.paused = False

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send `sig` (default SIGKILL) to node `i` and reap it."""
        node = self.nodes[i]
        if node.process is None:
            return
        if node.paused:
            self.resume(i)
        with contextlib.suppress(ProcessLookupError):
            node.process.send_signal(sig)
        try:
            node.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()
        node.process = None

    def pause(self, i: int) -> None:
        node = self.nodes[i]
        if node.process is not None:
            node.process.send_signal(signal.SIGSTOP)
            node.paused = True

    def resume(self, i: int) -> None:
        node = self.nodes[i]
        if node.process is not None:
            node.process.send_signal(signal.SIGCONT)
            node.paused = False

    def close(self) -> None:
        """Kill and reap every node process (safe to call twice)."""
        for node in self.nodes:
            self.kill(node.index)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observation -----------------------------------------------------------------------

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        """What clients of this cluster verify its members with (None: plain HTTP)."""
        if self.nodes[0].scheme != "https":
            return None
        return client_context(self.ca_file, self.client_cert_file)

    @property
    def auth_headers(self) -> dict[str, str]:
        """The `Authorization` header of the cluster's (admin) token, if it has one."""
        return {"Authorization": f"Bearer {self.api_token}"} if self.api_token else {}

    def running(self) -> list[int]:
        return [n.index for n in self.nodes
                if n.process is not None and n.process.poll() is None and not n.paused]

    def status(self, i: int, timeout: float = 1.0) -> dict[str, Any] | None:
        """Node `i`'s /v1/status, or None if it does not answer."""
        try:
            request = urllib.request.Request(self.nodes[i].url + "/v1/status",
                                             headers=self.auth_headers)
            with urllib.request.urlopen(request, timeout=timeout, context=self.ssl_context) as r:
                return json.loads(r.read())
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def wait_for_leader(self, timeout: float = 30.0, among: list[int] | None = None) -> int:
        """Wait until one running node leads with a quorum lease and all running nodes agree."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            candidates = among if among is not None else self.running()
            views = {i: self.status(i) for i in candidates}
            leaders = [i for i, v in views.items()
                       if v and v["state"] == "leader" and v["has_quorum"]]
            if len(leaders) == 1:
                leader = leaders[0]
                if all(v and v["leader"] == self.name_of(leader, i) for i, v in views.items()):
                    return leader
            time.sleep(0.05)
        raise TimeoutError(f"no agreed leader within {timeout}s; see logs under {self.base_dir}")

    def check_alive(self) -> None:
        """Raise, with its log tail, if a node we started has exited on its own."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is not None:
                code = node.process.returncode
                node.process = None
                tail = self.log_text(node.index)[-2000:]
                raise RuntimeError(f"node {node.index} exited with {code}:\n{tail}")


    def log_text(self, i: int) -> str:
        with open(self.nodes[i].log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def wait_listening(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections on `host:port`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing listened on {host}:{port}") from None
            time.sleep(0.05)


def _write_private(path: str, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(content + "\n")


def throwaway_pki(directory: str, host: str = "127.0.0.1") -> dict[str, str]:
    """A fresh CA and, signed by it, a certificate for `host` and a client certificate, as
    PEM files in `directory`: paths under ``ca`` (ca.crt), ``cert`` (member.crt), ``key``
    (member.key) and ``client`` (client.pem: certificate and key). For tests, benchmarks and
    the chaos suite; needs trustme (a test dependency)."""
    import trustme

    os.makedirs(directory, exist_ok=True)
    ca = trustme.CA()
    member = ca.issue_cert(host)
    paths = {name: os.path.join(directory, file) for name, file in (
        ("ca", "ca.crt"), ("cert", "member.crt"), ("key", "member.key"), ("client", "client.pem"))}
    ca.cert_pem.write_to_path(paths["ca"])
    member.cert_chain_pems[0].write_to_path(paths["cert"])
    member.private_key_pem.write_to_path(paths["key"])
    ca.issue_cert("client").private_key_and_cert_chain_pem.write_to_path(paths["client"])
    return paths
