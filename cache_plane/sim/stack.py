"""A whole local serving stack in real processes: cluster, simulated engines, gateways.

`GatewayStack` starts a 3-member cluster (`LocalCluster`), `engines` sim-nodes serving one
model with the packaged tokenizer (``tiny-chat``), and `gateways` gateway processes in front,
all on free loopback ports, with an API keys file (two tenants) and a cluster token.
Everything is killed and reaped by `close` (or on leaving the ``with`` block). The demo, the
gateway benchmark and the integration tests use it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from veristore_py.localcluster import LocalCluster, _write_private, free_ports

MODEL = "tiny-chat"
KEYS = {"sk-demo-tenant-a-0001": "tenant-a", "sk-demo-tenant-b-0002": "tenant-b"}


@dataclass
class GatewayStack:
    base_dir: str
    engines: int = 2
    gateways: int = 1
    route_ack: str = "committed"
    # sim-node latency model (ms): near zero by default, so the stack measures itself
    engine_args: tuple[str, ...] = ("--prefill-ms-per-token", "0", "--prefill-base-ms", "0",
                                    "--decode-base-ms", "0", "--decode-ms-per-seq", "0")
    gateway_args: tuple[str, ...] = ()
    # engines publish KV events over ZMQ (PUB + replay, their own ports) instead of HTTP
    kv_events_zmq: bool = False
    kv_events_args: tuple[str, ...] = ()  # more --kv-events-* flags (layout, hash form...)
    cluster: LocalCluster | None = None
    engine_ports: list[int] = field(default_factory=list)
    zmq_ports: list[tuple[int, int]] = field(default_factory=list)  # (PUB, replay) per engine
    gateway_ports: list[int] = field(default_factory=list)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def api_key(self) -> str:
        return next(iter(KEYS))

    def gateway_url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.gateway_ports[i]}/v1"

    def engine_url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.engine_ports[i]}"

    def start(self) -> GatewayStack:
        os.makedirs(self.base_dir, exist_ok=True)
        token = secrets.token_hex(16)
        self.cluster = LocalCluster(os.path.join(self.base_dir, "cluster"), size=3,
                                    module="cache_plane", api_token=token)
        self.cluster.start()
        self.cluster.wait_for_leader()
        self.keys_file = os.path.join(self.base_dir, "gateway-keys.toml")
        _write_private(self.keys_file, "".join(
            f'[keys."{key}"]\ntenant = "{tenant}"\n' for key, tenant in KEYS.items()))
        ports = free_ports(self.engines + self.gateways)
        self.engine_ports = ports[:self.engines]
        self.gateway_ports = ports[self.engines:]
        if self.kv_events_zmq:
            zmq_ports = free_ports(2 * self.engines)
            self.zmq_ports = list(zip(zmq_ports[::2], zmq_ports[1::2], strict=True))
        for i in range(self.engines):
            self.start_engine(i)
        for i in range(self.gateways):
            self.start_gateway(i)
        for port in [*self.engine_ports, *self.gateway_ports]:
            _wait_http(f"http://127.0.0.1:{port}/health", 60)
        self.wait_engines_registered()
        return self

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(os.path.join(self.base_dir, f"{name}.log"), "ab")  # noqa: SIM115
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "cache_plane", *args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def start_engine(self, i: int) -> None:
        assert self.cluster is not None and self.cluster.token_file is not None
        port = self.engine_ports[i]
        args = ["sim-node", "--node-id", f"gpu{i}", "--port", str(port), "--model", MODEL,
                "--tokenizer", MODEL, "--api-token-file", self.cluster.token_file,
                *self.engine_args]
        if self.kv_events_zmq:
            pub, replay = self.zmq_ports[i]
            args += ["--kv-events-endpoint", f"tcp://127.0.0.1:{pub}",
                     "--kv-events-replay-endpoint", f"tcp://127.0.0.1:{replay}",
                     "--no-kv-events-http", *self.kv_events_args]
        for url in self.cluster.urls:
            args += ["--cluster", url]
        self._spawn(f"gpu{i}", args)

    def add_gateway(self, *extra_args: str) -> int:
        """Start one more gateway (its flags after the stack's); its index."""
        self.gateway_ports.append(free_ports(1)[0])
        i = len(self.gateway_ports) - 1
        self.start_gateway(i, extra_args)
        _wait_http(f"http://127.0.0.1:{self.gateway_ports[i]}/health", 60)
        return i

    def start_gateway(self, i: int, extra_args: tuple[str, ...] = ()) -> None:
        assert self.cluster is not None and self.cluster.token_file is not None
        args = ["gateway", "--listen", f"127.0.0.1:{self.gateway_ports[i]}",
                "--api-keys-file", self.keys_file,
                "--cluster-token-file", self.cluster.token_file,
                "--tokenizer", f"{MODEL}={MODEL}", "--route-ack", self.route_ack,
                *self.gateway_args, *extra_args]
        for url in self.cluster.urls:
            args += ["--cluster", url]
        self._spawn(f"gateway{i}", args)

    def wait_engines_registered(self, timeout: float = 60) -> None:
        """Until every engine is registered and up in the cluster."""
        assert self.cluster is not None
        deadline = time.monotonic() + timeout
        want = {f"gpu{i}" for i in range(self.engines)
                if self.processes[f"gpu{i}"].poll() is None}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                up = {n["node_id"] for n in self.nodes() if n["state"] == "up"}
                if want <= up:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"engines {sorted(want)} did not register")

    def nodes(self) -> list[dict[str, object]]:
        assert self.cluster is not None
        import json

        leader = self.cluster.nodes[self.cluster.wait_for_leader()]
        req = urllib.request.Request(leader.url + "/v1/nodes",
                                     headers=self.cluster.auth_headers)
        with urllib.request.urlopen(req, timeout=5) as resp:
            nodes: list[dict[str, object]] = json.load(resp)["nodes"]
            return nodes

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.get(name)
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        for name in list(self.processes):
            self.kill(name, signal.SIGTERM)
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self) -> GatewayStack:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer") from None
            time.sleep(0.1)
