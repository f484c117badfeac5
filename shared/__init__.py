"""What both sides of specd use: the sampling math, the sans-I/O session protocol, config, models.

Nothing here imports Qt, websockets or a model runtime; ``daemon/`` and ``desktop/`` depend on this
package and never on each other.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("specd")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
