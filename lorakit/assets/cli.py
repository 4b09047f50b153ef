"""``python -m lorakit.assets fetch|status``: errors as one line (exit code 2), ``--debug`` for the traceback."""

from __future__ import annotations

import argparse
import sys

from lorakit.assets.cache import status
from lorakit.assets.fetching import fetch
from lorakit.assets.registry import ASSETS, AssetError, cache_dir


def main(argv: list[str] | None = None, prog: str = "python -m lorakit.assets") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="The offline assets: fetch them once, then check them.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="fetch and convert the assets (all, or the one named)")
    f.add_argument("name", nargs="?", choices=list(ASSETS))
    f.add_argument("--force", action="store_true", help="fetch again even when cached")
    sub.add_parser("status", help="show what is cached (checks every SHA-256)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            fetch(args.name, force=args.force)
            return 0
        print(f"cache: {cache_dir()}")
        for n, state in status().items():
            print(f"  {n:24s} {state}")
        return 0
    except AssetError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
