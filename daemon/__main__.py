"""``python -m specd.daemon`` is ``specd-verifier``."""

import sys

from specd.daemon.cli import main

sys.exit(main())
