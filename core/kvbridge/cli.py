"""The ``kvbridge`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from kvbridge._version import __version__
from kvbridge.transport.hookspecs import KVBRIDGE_API_VERSION
from kvbridge.transport.loading import TransportRegistry


def _cmd_transports(args: argparse.Namespace) -> int:
    records = TransportRegistry.discover().records()
    if args.json:
        json.dump([r.to_json() for r in records], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"kvbridge {__version__}, plugin API {KVBRIDGE_API_VERSION}")
    if not records:
        print("no transports installed (pip install kvbridge-fake, kvbridge-mooncake, ...)")
        return 0
    rows = [("NAME", "DISTRIBUTION", "VERSION", "API", "STATUS", "CAPABILITIES")]
    for r in records:
        status = "loaded" if r.loaded else "NOT LOADED"
        rows.append(
            (
                r.name,
                r.distribution or "-",
                r.version or "-",
                r.api_version or "-",
                status,
                ",".join(sorted(r.capabilities)) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for r in records:
        if r.error:
            print(f"\n{r.name}: {r.error}")
            for fix in r.fixes:
                print(f"  fix: {fix}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvbridge.demo import DemoPlan, main

    try:
        options = json.loads(args.transport_options) if args.transport_options else {}
        plan = DemoPlan(
            transport=args.transport,
            transport_options=options,
            prefill_tp=args.prefill_tp,
            prefill_cp=args.prefill_cp,
            prefill_dp=args.prefill_dp,
            decode_tp=args.decode_tp,
            requests=args.requests,
            max_prompt_tokens=args.max_prompt_tokens,
            seed=args.seed,
            timeout=args.timeout,
            metrics_port=args.metrics_port,
            heartbeat_max_misses=args.heartbeat_max_misses,
        )
    except (ValueError, TypeError) as exc:
        print(f"kvbridge demo: {exc}", file=sys.stderr)
        return 2
    from kvbridge.transport.loading import TransportRegistry

    registry = TransportRegistry.discover()
    try:
        registry.get(plan.transport)
    except LookupError as exc:
        print(f"kvbridge demo: {exc}", file=sys.stderr)
        return 2
    return main(plan, metrics_linger=args.metrics_linger)


def _cmd_bootstrap(args: argparse.Namespace) -> int:
    import time

    from kvbridge.bootstrap.server import BootstrapServer
    from kvbridge.errors import ConfigError
    from kvbridge.secret import Secret

    try:
        secret = Secret.from_file(args.secret_file) if args.secret_file else Secret.from_env()
    except ConfigError as exc:
        print(f"kvbridge bootstrap: {exc}", file=sys.stderr)
        return 2
    token = secret.bootstrap_token if secret is not None else None
    server = BootstrapServer(args.host, args.port, token=token, room_ttl=args.room_ttl)
    try:
        server.start()
    except OSError as exc:
        print(f"kvbridge bootstrap: {exc}", file=sys.stderr)
        return 1
    print(f"kvbridge bootstrap server on http://{server.address} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbridge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kvbridge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True)
    transports = sub.add_parser("transports", help="list installed transports")
    transports.add_argument("--json", action="store_true", help="print a JSON list")
    transports.set_defaults(func=_cmd_transports)

    demo = sub.add_parser("demo", help="run a local prefill+decode session and verify every byte")
    demo.add_argument("--transport", default="fake", help="transport name (default: fake)")
    demo.add_argument("--transport-options", default="", help="JSON object for the transport")
    demo.add_argument("--prefill-tp", type=int, default=2)
    demo.add_argument("--prefill-cp", type=int, default=1)
    demo.add_argument("--prefill-dp", type=int, default=1)
    demo.add_argument("--decode-tp", type=int, default=2)
    demo.add_argument("--requests", type=int, default=64)
    demo.add_argument("--max-prompt-tokens", type=int, default=2048)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    demo.add_argument(
        "--heartbeat-max-misses",
        type=int,
        default=3,
        help="1 s heartbeats a decode rank may miss before failing a prefill's rooms (default 3)",
    )
    demo.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve every demo process's kvbridge metrics (Prometheus) on this port",
    )
    demo.add_argument(
        "--metrics-linger",
        type=float,
        default=0.0,
        help="keep serving metrics this many seconds after the report",
    )
    demo.set_defaults(func=_cmd_demo)

    boot = sub.add_parser("bootstrap", help="run a bootstrap server on its own")
    boot.add_argument("--host", default="127.0.0.1")
    boot.add_argument("--port", type=int, default=8998)
    boot.add_argument(
        "--secret-file",
        default=None,
        help="file holding the shared secret (default: the KVBRIDGE_SECRET or "
        "KVBRIDGE_SECRET_FILE environment variable; never pass the secret itself as an argument)",
    )
    boot.add_argument(
        "--room-ttl", type=float, default=600.0, help="seconds a room's DP-rank entry lives"
    )
    boot.set_defaults(func=_cmd_bootstrap)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else 10
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
