"""`python -m thaw.blobstore migrate ROOT [--workers N]`: move a disk tier written before
BLAKE3 onto BLAKE3 addresses in place (blobstore/migrate.py); prints a JSON report."""

from __future__ import annotations

import argparse
import json
import sys

from thaw.core.errors import ThawError

from .migrate import migrate_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thaw.blobstore")
    commands = parser.add_subparsers(dest="command", required=True)
    migrate = commands.add_parser("migrate", help="give SHA-256 chunks BLAKE3 names")
    migrate.add_argument("root", help="the disk tier's folder (<home>/agent/<node>/chunks)")
    migrate.add_argument("--workers", type=int, default=None, help="threads (default: cores)")
    args = parser.parse_args(argv)
    try:
        report = migrate_root(args.root, args.workers)
    except ThawError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict()))
    return 1 if report.corrupt else 0


if __name__ == "__main__":
    sys.exit(main())
