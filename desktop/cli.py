"""``specd``: the user's command line (chat, serve, devices, bench, demo, convert)."""

from __future__ import annotations

import argparse
import sys

from specd.shared import __version__
from specd.shared.errors import SpecdError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specd", description="specd: edge–cloud speculative decoding")
    parser.add_argument("--version", action="version", version=f"specd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from specd.desktop.bench import cli as bench
    from specd.desktop.commands import chat, convert, demo, devices, serve

    chat.add_parser(sub)
    serve.add_parser(sub)
    bench.add_parser(sub)
    demo.add_parser(sub)
    devices.add_parser(sub)
    convert.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except SpecdError as exc:
        print(f"specd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
