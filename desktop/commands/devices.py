"""``specd devices``: the devices of this machine that can run the draft model, best first, with the draft
precision each would load and why (the probing itself is :mod:`specd.desktop.drafters.devices`)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from specd.desktop.drafters.devices import format_table, probe_devices
from specd.desktop.precision.choice import pick_precision
from specd.shared.config import default_config_path, load_config
from specd.shared.errors import SpecdError


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("devices", help="list the devices that can run the draft model",
                            description="List the NPUs, GPUs and CPU backends that can run the draft model, "
                                        "best first, with the reason when one cannot.")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    parser.add_argument("--config", help="config file (default: $SPECD_CONFIG, ./config.toml, the user's)")
    parser.set_defaults(handler=run_devices)


def run_devices(args: Any) -> int:
    config = load_config(args.config or default_config_path())
    rows = probe_devices(config)
    precisions = {}
    for row in rows:
        if row.available:
            with contextlib.suppress(SpecdError):  # a draft model that is not there: `specd chat` says why
                precisions[row.id] = pick_precision(row, config, read_only=True)
    if args.json:
        print(json.dumps([row.to_json() | precision_fields(precisions.get(row.id)) for row in rows], indent=2))
    else:
        print(format_table(rows, precisions))
    return 0


def precision_fields(pick: Any) -> dict[str, Any]:
    """The ``--json`` fields of a row's draft precision (null for a device that cannot run the draft)."""
    return {"draft_precision": pick.precision if pick else None,
            "draft_precision_reason": pick.reason if pick else None,
            "draft_precision_source": pick.source if pick else None}
