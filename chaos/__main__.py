"""`python -m chaos run --cycles N --seed S [--faults K,K] [--out FILE]`: attack a cluster,
judge the history. `python -m chaos gateway --cycles N`: kill the leader under gateway load,
check the index converges (chaos/gateway.py). `python -m chaos kv-events --cycles N`: faults
on the engines' ZMQ KV-event wire and the leader; the index must equal every engine's cache
(chaos/kv_events.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .nemesis import FAULTS
from .runner import run, summary, to_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="fault cycles against a local 3-member cluster")
    p.add_argument("--cycles", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--clients", type=int, default=4, help="KV register/put clients")
    p.add_argument("--routers", type=int, default=2, help="route/complete clients")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--log-level", default="warning", help="members' log level")
    p.add_argument("--faults", default=",".join(FAULTS),
                   help="comma-separated fault kinds to cycle through (default: all: "
                        f"{','.join(FAULTS)})")
    p.add_argument("--plain-http", action="store_true",
                   help="members serve plain HTTP (default: HTTPS with mTLS and role tokens, "
                        "as in production)")
    g = sub.add_parser("gateway", help="leader kills under gateway load; index convergence")
    g.add_argument("--cycles", type=int, default=6)
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--route-ack", choices=["committed", "decided"], default="decided")
    g.add_argument("--cycle-s", type=float, default=3.0, help="seconds per kill cycle")
    k = sub.add_parser("kv-events", help="KV-event wire faults and leader kills under gateway "
                                          "load; index = engine caches")
    k.add_argument("--cycles", type=int, default=6)
    k.add_argument("--seed", type=int, default=1)
    k.add_argument("--faults", help="comma-separated fault kinds (default: all: drop-live,"
                                    "reorder-live,restart-publisher,kill-leader)")
    k.add_argument("--cycle-s", type=float, default=3.0, help="seconds per fault cycle")
    k.add_argument("--quiesce-s", type=float, default=60.0,
                   help="how long the index may take to converge after the load stops")
    k.add_argument("--capacity-blocks", type=int, default=200_000,
                   help="each engine's KV pool (default: large enough that nothing is evicted)")
    args = parser.parse_args(argv)
    if args.command == "kv-events":
        from .kv_events import FAULTS as KV_FAULTS
        from .kv_events import kv_events_summary, run_kv_events_chaos

        kv_faults = KV_FAULTS if args.faults is None else \
            tuple(f.strip() for f in args.faults.split(",") if f.strip())
        unknown = sorted(set(kv_faults) - set(KV_FAULTS))
        if unknown or not kv_faults:
            parser.error(f"--faults: unknown kinds {unknown}; known: {', '.join(KV_FAULTS)}")
        kv_report = asyncio.run(run_kv_events_chaos(args.cycles, args.seed, kv_faults,
                                                    args.cycle_s, args.quiesce_s,
                                                    args.capacity_blocks))
        print(kv_events_summary(kv_report))
        return 0 if kv_report.passed else 1
    if args.command == "gateway":
        from .gateway import gateway_summary, run_gateway_chaos

        result = asyncio.run(run_gateway_chaos(args.cycles, args.seed, args.route_ack,
                                               args.cycle_s))
        print(gateway_summary(result))
        return 0 if result.passed else 1
    faults = tuple(f.strip() for f in args.faults.split(",") if f.strip())
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown or not faults:
        parser.error(f"--faults: unknown kinds {unknown}; known: {', '.join(FAULTS)}")
    report = asyncio.run(run(args.cycles, args.seed, args.clients, args.routers,
                             log_level=args.log_level, faults=faults,
                             tls_on=not args.plain_http))
    print(summary(report))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(to_json(report))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
