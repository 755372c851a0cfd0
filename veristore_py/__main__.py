"""`veristore` / `python -m veristore_py`: run a node or ask one for its status."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from .config import load_settings
from .errors import ConfigError, VeristoreError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veristore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run one cluster node (Raft + HTTP API)")
    serve.add_argument("--config", help="TOML settings file (see veristore_py/config.py)")
    serve.add_argument("--raft-address", help="this node's Raft host:port")
    serve.add_argument("--http-address", help="this node's HTTP host:port")
    serve.add_argument("--data-dir", help="directory for the LMDB journal, state and snapshots")
    serve.add_argument("--peer", action="append", metavar="RAFT=HTTP",
                       help="another member, as raft_host:port=http_host:port (repeatable)")
    serve.add_argument("--password-file", help="file holding the Raft peer password")
    serve.add_argument("--api-token-file", help="file holding the HTTP bearer token")
    serve.add_argument("--log-format", choices=["auto", "json", "console"])
    status = sub.add_parser("status", help="print a node's view of the cluster as JSON")
    status.add_argument("--endpoint", default="http://127.0.0.1:8000", help="node HTTP URL")
    status.add_argument("--token-file", help="file holding a bearer token (read role or above)")
    status.add_argument("--ca-file", help="CA certificate that signed the node's (HTTPS)")
    status.add_argument("--cert-file", help="client certificate for mTLS")
    status.add_argument("--key-file", help="its key")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from .server import serve

        overrides: dict[str, Any] = {
            "raft_address": args.raft_address,
            "http_address": args.http_address,
            "data_dir": args.data_dir,
            "peers": args.peer,
            "password_file": args.password_file,
            "api_token_file": args.api_token_file,
            "log_format": args.log_format,
        }
        try:
            settings = load_settings(args.config, overrides=overrides)
        except ConfigError as exc:
            print("invalid configuration:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  - {problem}", file=sys.stderr)
            return 2
        try:
            serve(settings)
        except VeristoreError as exc:  # e.g. a damaged journal: say what to do
            print(f"cannot start: {exc}", file=sys.stderr)
            return 1
        return 0
    from .client import VeristoreClient

    token = None
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip() or None

    async def show() -> dict[str, Any]:
        async with VeristoreClient([args.endpoint], token=token, ca_file=args.ca_file,
                                   cert_file=args.cert_file, key_file=args.key_file) as client:
            return await client.status(args.endpoint)

    try:
        print(json.dumps(asyncio.run(show()), indent=2))
    except VeristoreError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
