"""Two small widgets of the chat window: the prompt box and the one-line status label."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeyEvent, QResizeEvent
from PySide6.QtWidgets import QLabel, QPlainTextEdit, QSizePolicy


class PromptBox(QPlainTextEdit):
    """Enter sends; Shift+Enter inserts a new line."""

    submitted = Signal()

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and not (
                event.modifiers() & Qt.KeyboardModifier.ShiftModifier):
            self.submitted.emit()
            return
        super().keyPressEvent(event)


class StatusLabel(QLabel):
    """One line, elided to the width it has; the whole text (and any detail) is in its tooltip. A long
    error never wraps the status bar onto several lines or widens the window."""

    def __init__(self, text: str = "") -> None:
        super().__init__()
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setMinimumWidth(40)
        self.full_text = ""
        self.set_line(text)

    def set_line(self, text: str, detail: str = "") -> None:
        self.full_text = " ".join(text.split())  # newlines and runs of spaces would break the one line
        self.setToolTip(detail or self.full_text)
        self._elide()

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self._elide()

    def _elide(self) -> None:
        width = max(self.width(), self.minimumWidth())
        self.setText(self.fontMetrics().elidedText(self.full_text, Qt.TextElideMode.ElideRight, width))
