"""Render the app icon ``desktop/ui/icon.svg`` to ``specd.ico`` (Windows: executables, installer,
shortcuts) and ``icon.png`` (256 px) beside it. Run after changing the SVG, and commit all three:

    QT_QPA_PLATFORM=offscreen .venv/bin/python packaging/make_icon.py

The output depends only on the SVG and the Qt version (PNG-compressed ICO entries, no timestamps).
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

UI = Path(__file__).resolve().parents[1] / "desktop" / "ui"
ICO_SIZES = (16, 20, 24, 32, 40, 48, 64, 128, 256)


def render_png(svg: Path, size: int) -> bytes:
    """``svg`` rendered as a ``size``×``size`` RGBA PNG."""
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtGui import QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise ValueError(f"{svg} is not a valid SVG")
    image = QImage(size, size, QImage.Format.Format_ARGB32)
    image.fill(0)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter)
    painter.end()
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buffer, "PNG")
    return bytes(data.data())


def ico_bytes(pngs: dict[int, bytes]) -> bytes:
    """An ICO file holding one PNG-compressed image per size (Windows Vista and later read these)."""
    header = struct.pack("<HHH", 0, 1, len(pngs))
    offset = len(header) + 16 * len(pngs)
    entries, images = b"", b""
    for size, png in sorted(pngs.items()):
        side = 0 if size >= 256 else size  # 0 means 256 in an ICO directory entry
        entries += struct.pack("<BBBBHHII", side, side, 0, 0, 1, 32, len(png), offset + len(images))
        images += png
    return header + entries + images


def main(out: Path = UI) -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtGui import QGuiApplication

    _app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])
    svg = UI / "icon.svg"
    pngs = {size: render_png(svg, size) for size in ICO_SIZES}
    out.mkdir(parents=True, exist_ok=True)
    (out / "specd.ico").write_bytes(ico_bytes(pngs))
    (out / "icon.png").write_bytes(pngs[256])
    print(f"Wrote {out / 'specd.ico'} ({len(pngs)} sizes) and {out / 'icon.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else UI))
