"""``specd-verifier keys add|list|revoke|set-limits``: the named client keys of a verifier.

Edits the keys file (daemon/client_keys.py) atomically; a running verifier re-reads it within a second
(and on SIGHUP: ``systemctl reload specd-verifier`` for the packaged service). ``add`` prints the new key
once, alone on stdout, so a script can capture it; everything else goes to stderr. Exit status 2 for a
usage or file error.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from specd.daemon.client_keys import (
    DEFAULT_NAME,
    KeyRecord,
    add_record,
    change_record,
    keys_file_path,
    new_key,
    now_rfc3339,
    read_keys_file,
    read_usage,
    render_keys_file,
    usage_path,
    write_private,
)
from specd.shared.config import default_config_path, load_config
from specd.shared.errors import ConfigError

PROG = "specd-verifier keys"
APPLY = ("a running verifier reads the file again within a second (the packaged service: "
         "sudo systemctl reload specd-verifier)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Named client keys: one per laptop, with its own limits and usage. Only a "
        "SHA-256 hash of each key is stored, in the keys file ([server] keys_file; default keys.toml beside the "
        "config file, /etc/specd/keys.toml for the packaged service).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="config file (default: as specd-verifier finds it)")
    common.add_argument("--keys-file", metavar="PATH", help="the keys file (default: [server] keys_file)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def limits(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-sessions", type=_count, metavar="N", help="sessions open at once (0: no limit)")
        p.add_argument("--tokens-per-minute", type=_count, metavar="N",
                       help="prompt + generated tokens per minute over all its sessions (0: no limit)")

    add = sub.add_parser("add", parents=[common], help="create a key and print it (once)")
    add.add_argument("name", help="who holds it, e.g. alice-laptop (letters, digits, . _ -)")
    limits(add)
    sub.add_parser("list", parents=[common], help="names, created, last used, tokens used, limits (never the keys)")
    revoke = sub.add_parser("revoke", parents=[common], help="refuse the key from now on and end its sessions")
    revoke.add_argument("name")
    change = sub.add_parser("set-limits", parents=[common], help="change a key's limits")
    change.add_argument("name")
    limits(change)
    return parser


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (no limit) or more")
    return value


def keys_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        path = _keys_path(args)
        return _run(args, path)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{PROG}: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def _keys_path(args: argparse.Namespace) -> Path:
    if args.keys_file:
        return Path(args.keys_file).expanduser()
    config_path = args.config or default_config_path()
    path = keys_file_path(load_config(config_path), config_path)
    if path is None:
        raise ConfigError("no keys file: pass --keys-file PATH, or set [server] keys_file in the config file")
    return path


def _run(args: argparse.Namespace, path: Path) -> int:
    records = read_keys_file(path)
    if args.command == "list":
        _list(records, path)
        return 0
    if args.command == "add":
        key = new_key()
        records = add_record(records, args.name, key, max_sessions=args.max_sessions or 0,
                             tokens_per_minute=args.tokens_per_minute or 0)
        write_private(path, render_keys_file(records))
        print(key)
        print(f"Added the key {args.name!r} to {path}; {APPLY}. This is the only time it is shown: give it to that "
              "client as SPECD_API_KEY (or its [client] api_key_file, or the tray app's settings).", file=sys.stderr)
        return 0
    if args.command == "revoke":
        record = _record(records, args.name, path)
        if record.revoked:
            print(f"The key {args.name!r} was already revoked on {record.revoked}.", file=sys.stderr)
            return 0
        write_private(path, render_keys_file(change_record(records, args.name, path, revoked=now_rfc3339())))
        print(f"Revoked {args.name!r} in {path}; {APPLY}: new connections with it get 401 and its open sessions "
              "are closed (key_revoked, close 1008).", file=sys.stderr)
        return 0
    changes = {k: v for k, v in (("max_sessions", args.max_sessions), ("tokens_per_minute", args.tokens_per_minute))
               if v is not None}
    if not changes:
        raise ConfigError("set-limits: give --max-sessions N and/or --tokens-per-minute N (0: no limit)")
    _record(records, args.name, path)
    records = change_record(records, args.name, path, **changes)
    write_private(path, render_keys_file(records))
    print(f"Limits of {args.name!r}: {records[args.name].limits_text()}; {APPLY}.", file=sys.stderr)
    return 0


def _record(records: dict[str, KeyRecord], name: str, path: Path) -> KeyRecord:
    if name not in records:
        raise ConfigError(f"no key named {name!r} in {path} (keys: {', '.join(records) or 'none'})")
    return records[name]


def _list(records: dict[str, KeyRecord], path: Path) -> None:
    usage = read_usage(usage_path(path))
    rows = [("NAME", "STATUS", "CREATED", "LAST USED", "TOKENS", "SESSIONS", "LIMITS")]
    names = list(records) + ([DEFAULT_NAME] if DEFAULT_NAME in usage else [])
    for name in names:
        record = records.get(name)
        used = usage.get(name, {})
        status = "revoked" if record is not None and record.revoked else "active"
        rows.append((name if record is not None else f"{name} (SPECD_API_KEY)", status,
                     record.created if record is not None else "-", _when(used.get("last_used_unix")),
                     str(used.get("tokens", 0)), str(used.get("sessions_total", 0)),
                     record.limits_text() if record is not None else "none"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if not records:
        print(f"No keys in {path} yet: specd-verifier keys add NAME", file=sys.stderr)
    elif not usage:
        print(f"No usage recorded yet beside {path} (the verifier writes {usage_path(path).name} every 10 s "
              "while keys are used).", file=sys.stderr)


def _when(unix: object) -> str:
    if not isinstance(unix, (int, float)) or unix <= 0:
        return "never"
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
