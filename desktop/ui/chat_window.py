"""The chat window: conversation, input box, Send/Stop/New chat, stats, status bar with progress.

The window only shows things and emits signals; :mod:`specd.desktop.ui.controller` does the work,
so the window never blocks and can be driven (and screenshotted) without a network or models.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QCloseEvent, QIcon, QKeyEvent, QResizeEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from specd.desktop.ui.chat_view import Turn, legend_html, render_conversation


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


class ChatWindow(QMainWindow):
    send_requested = Signal(str)
    stop_requested = Signal()
    new_chat_requested = Signal()
    settings_requested = Signal()
    close_requested = Signal()

    def __init__(self, icon: QIcon | None = None) -> None:
        super().__init__()
        self.setWindowTitle("specd")
        if icon is not None:
            self.setWindowIcon(icon)
        self.turns: list[Turn] = []
        self.highlight = True
        self.hide_on_close = False  # with a tray, closing the window keeps the app running
        self._render_timer = QTimer(self, singleShot=True, interval=30)
        self._render_timer.timeout.connect(self._render)

        self.view = QTextBrowser()
        self.view.setOpenExternalLinks(True)
        self.prompt = PromptBox()
        self.prompt.setPlaceholderText("Message specd — Enter sends, Shift+Enter for a new line")
        self.prompt.setFixedHeight(72)
        self.prompt.submitted.connect(self._submit)
        self.send_button = QPushButton("Send")
        self.send_button.clicked.connect(self._submit)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop_requested.emit)
        self.new_button = QPushButton("New chat")
        self.new_button.clicked.connect(self.new_chat_requested.emit)
        self.settings_button = QPushButton("Settings…")
        self.settings_button.clicked.connect(self.settings_requested.emit)
        self.highlight_box = QCheckBox("Highlight")
        self.highlight_box.setChecked(True)
        self.highlight_box.setToolTip("Tint each token by where it came from")
        self.highlight_box.toggled.connect(self.set_highlight)
        self.legend = QLabel(legend_html())
        self.stats = QLabel("")
        self.stats.setObjectName("stats")
        self.stats.setStyleSheet("color: #555;")

        buttons = QHBoxLayout()
        buttons.addWidget(self.new_button)
        buttons.addWidget(self.settings_button)
        buttons.addWidget(self.highlight_box)
        buttons.addWidget(self.legend)
        buttons.addStretch(1)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.send_button)
        layout = QVBoxLayout()
        layout.addWidget(self.view, 1)
        layout.addWidget(self.stats)
        layout.addWidget(self.prompt)
        layout.addLayout(buttons)
        central = QWidget()
        central.setLayout(layout)
        self.setCentralWidget(central)

        self._status = ("Starting…", "")
        self.status_label = StatusLabel("Starting…")
        self.latency_label = QLabel("")
        self.progress = QProgressBar()
        self.progress.setRange(0, 0)  # busy indicator: preparation steps have no known length
        self.progress.setMaximumWidth(160)
        self.progress.hide()
        self.statusBar().addWidget(self.status_label, 1)
        self.statusBar().addPermanentWidget(self.progress)
        self.statusBar().addPermanentWidget(self.latency_label)
        self.resize(760, 620)
        self._render()

    # -- input ------------------------------------------------------------------------------------
    def _submit(self) -> None:
        text = self.prompt.toPlainText().strip()
        if text and self.send_button.isEnabled():
            self.prompt.clear()
            self.send_requested.emit(text)

    def set_busy(self, busy: bool) -> None:
        """While an answer streams: Stop on, Send off."""
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)

    # -- conversation -----------------------------------------------------------------------------
    def add_turn(self, role: str, text: str = "", *, pending: bool = False) -> Turn:
        turn = Turn(role=role, pending=pending)
        if text:
            turn.append(text, "cloud")
        self.turns.append(turn)
        self.refresh(now=True)
        return turn

    def append_piece(self, text: str, source: str) -> None:
        if self.turns and self.turns[-1].role == "assistant":
            self.turns[-1].append(text, source)
            self.refresh()

    def finish_turn(self, stats: str) -> None:
        if self.turns:
            self.turns[-1].pending = False
            self.turns[-1].stats = stats
            self.stats.setText(stats)
        self.refresh(now=True)

    def clear_conversation(self) -> None:
        self.turns.clear()
        self.stats.setText("")
        self.refresh(now=True)

    def set_highlight(self, on: bool) -> None:
        self.highlight = on
        if self.highlight_box.isChecked() != on:
            self.highlight_box.setChecked(on)
        self.legend.setVisible(on)
        self.refresh(now=True)

    def refresh(self, *, now: bool = False) -> None:
        """Re-render soon (pieces arrive faster than a repaint is worth) or now."""
        if now:
            self._render_timer.stop()
            self._render()
        elif not self._render_timer.isActive():
            self._render_timer.start()

    def _render(self) -> None:
        bar = self.view.verticalScrollBar()
        at_bottom = bar.value() >= bar.maximum() - 4
        self.view.setHtml(render_conversation(self.turns, highlight=self.highlight))
        if at_bottom:
            bar.setValue(bar.maximum())

    def plain_text(self) -> str:
        return self.view.toPlainText()

    # -- status -----------------------------------------------------------------------------------
    def set_status(self, text: str, latency: str = "", detail: str = "") -> None:
        """The one status line; ``detail`` (the whole reason, the device) goes in its tooltip."""
        self._status = (text, detail)
        if self.progress.isHidden():  # a preparation step holds the line until its work ends
            self.status_label.set_line(text, detail)
        self.latency_label.setText(latency)

    def show_progress(self, message: str | None) -> None:
        """A preparation step in the status bar; None hides the bar and gives the line back to the status."""
        if message is None:
            self.progress.hide()
            self.status_label.set_line(*self._status)
            return
        self.progress.show()
        self.status_label.set_line(message)

    def bring_forward(self) -> None:
        self.show()
        self.setWindowState((self.windowState() & ~Qt.WindowState.WindowMinimized) | Qt.WindowState.WindowActive)
        self.raise_()
        self.activateWindow()

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.hide_on_close:
            event.ignore()
            self.hide()
            return
        event.accept()
        self.close_requested.emit()
