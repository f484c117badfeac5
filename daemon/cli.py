"""``specd-verifier``: the verifier daemon."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("specd-verifier: not available yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
