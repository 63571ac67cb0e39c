"""The ``kvbridge`` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from kvbridge._version import __version__
from kvbridge.hookspecs import KVBRIDGE_API_VERSION
from kvbridge.plugins import TransportRegistry


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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbridge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kvbridge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True)
    transports = sub.add_parser("transports", help="list installed transports")
    transports.add_argument("--json", action="store_true", help="print a JSON list")
    transports.set_defaults(func=_cmd_transports)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else 10
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
