"""View logs, where the desktop has no file manager to open the log folder with: a dialog with the
log file's path and its last lines, and a button that copies both."""

from __future__ import annotations

import html
from collections import deque
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QFontDatabase, QGuiApplication
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

LAST_LINES = 200


def last_lines(path: Path, count: int = LAST_LINES) -> list[str]:
    """The last ``count`` lines of ``path``, or one line saying why there are none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [line.rstrip("\n") for line in deque(fh, maxlen=count)]
    except FileNotFoundError:
        return [f"(no log yet: {path} does not exist)"]
    except OSError as exc:
        return [f"(cannot read {path}: {exc.strerror or exc})"]


class LogDialog(QDialog):
    def __init__(self, log_file: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("specd logs")
        self.log_file = log_file
        self.where = where = QLabel(f"The log is kept in <b>{html.escape(str(log_file))}</b> (no file manager "
                                    "was found to open its folder). Its last lines:")
        where.setTextFormat(Qt.TextFormat.RichText)
        where.setWordWrap(True)
        where.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.text = QPlainTextEdit("\n".join(last_lines(log_file)))
        self.text.setReadOnly(True)
        self.text.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.text.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        self.copy_button = QPushButton("Copy path and lines")
        buttons.addButton(self.copy_button, QDialogButtonBox.ButtonRole.ActionRole)
        self.copy_button.clicked.connect(self.copy)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(where)
        layout.addWidget(self.text, 1)
        layout.addWidget(buttons)
        self.resize(820, 480)
        bar = self.text.verticalScrollBar()
        bar.setValue(bar.maximum())

    def copy(self) -> None:
        QGuiApplication.clipboard().setText(f"{self.log_file}\n{self.text.toPlainText()}\n")
