"""The chat window: the conversation list, the conversation with its system prompt and sampling
settings, the input box with Send/Stop, stats, and a status bar with progress.

The window only shows things and emits signals; :mod:`specd.desktop.ui.controller` and
:mod:`specd.desktop.ui.chat_session` do the work, so the window never blocks and can be driven (and
screenshotted) without a network or models. Keys: Ctrl+N new chat, Ctrl+F search, Esc stops,
Ctrl+Shift+C copies the last answer, Enter sends.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QCloseEvent, QGuiApplication, QIcon, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMainWindow,
    QProgressBar,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from specd.desktop.ui.chat_view import Turn, legend_html
from specd.desktop.ui.chat_widgets import PromptBox, StatusLabel
from specd.desktop.ui.message_view import ConversationView
from specd.desktop.ui.sidebar import ConversationSidebar

DEFAULT_SIZE, DEFAULT_SIDEBAR = (980, 660), 230


class ChatWindow(QMainWindow):
    send_requested = Signal(str)
    edit_sent = Signal(int, str)  # (the edited question's turn, its new text): the conversation forks there
    regenerate_requested = Signal()
    stop_requested = Signal()
    new_chat_requested = Signal()
    settings_requested = Signal()
    close_requested = Signal()
    closing = Signal()  # closed or hidden: a moment to remember its size
    system_prompt_changed = Signal(str)

    def __init__(self, icon: QIcon | None = None) -> None:
        super().__init__()
        self.setWindowTitle("specd")
        if icon is not None:
            self.setWindowIcon(icon)
        self.turns: list[Turn] = []
        self.highlight = True
        self.hide_on_close = False  # with a tray, closing the window keeps the app running
        self.editing: int | None = None  # the question being edited (its turn), until sent or cancelled
        self._full_render = True
        self._render_timer = QTimer(self, singleShot=True, interval=30)
        self._render_timer.timeout.connect(self._render)

        self.sidebar = ConversationSidebar()
        self.view = ConversationView()
        self.view.action.connect(self._view_action)
        self.view.code_copied.connect(lambda _i: self.statusBar().showMessage("Code copied", 2000))
        self.system_prompt = QLineEdit()
        self.system_prompt.setObjectName("system_prompt")
        self.system_prompt.setPlaceholderText("System prompt of this conversation (none)")
        self.system_prompt.editingFinished.connect(lambda: self.system_prompt_changed.emit(self.system_prompt.text()))
        self.sampling = QLabel("")
        self.sampling.setObjectName("sampling")
        self.sampling.setStyleSheet("color: #555;")
        self.prompt = PromptBox()
        self.prompt.setPlaceholderText("Message specd — Enter sends, Shift+Enter for a new line")
        self.prompt.setFixedHeight(72)
        self.prompt.submitted.connect(self._submit)
        self.editing_label = QLabel("")
        self.editing_label.setStyleSheet("color: #1d4e89;")
        self.editing_label.hide()
        self.send_button = QPushButton("Send")
        self.send_button.clicked.connect(self._submit)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop the answer, keeping what it has written (Esc)")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop_requested.emit)
        self.new_button = self.sidebar.new_button
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
        self._build_layout()
        self._build_status_bar()
        self._build_shortcuts()
        self.resize(*DEFAULT_SIZE)
        self._render()

    def _build_layout(self) -> None:
        top = QHBoxLayout()
        top.addWidget(QLabel("System:"))
        top.addWidget(self.system_prompt, 1)
        buttons = QHBoxLayout()
        buttons.addWidget(self.settings_button)
        buttons.addWidget(self.highlight_box)
        buttons.addWidget(self.legend)
        buttons.addStretch(1)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.send_button)
        layout = QVBoxLayout()
        layout.setContentsMargins(4, 0, 0, 0)
        layout.addLayout(top)
        layout.addWidget(self.sampling)
        layout.addWidget(self.view, 1)
        layout.addWidget(self.stats)
        layout.addWidget(self.editing_label)
        layout.addWidget(self.prompt)
        layout.addLayout(buttons)
        pane = QWidget()
        pane.setLayout(layout)
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(self.sidebar)
        self.splitter.addWidget(pane)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setSizes([DEFAULT_SIDEBAR, DEFAULT_SIZE[0] - DEFAULT_SIDEBAR])
        self.setCentralWidget(self.splitter)

    def _build_status_bar(self) -> None:
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

    def _build_shortcuts(self) -> None:
        for keys, slot in (("Ctrl+N", self.new_chat_requested.emit), ("Ctrl+F", self.sidebar.focus_search),
                           ("Esc", self._escape), ("Ctrl+Shift+C", self.copy_last_answer)):
            shortcut = QShortcut(QKeySequence(keys), self)
            shortcut.setContext(Qt.ShortcutContext.WindowShortcut)
            shortcut.activated.connect(slot)

    # -- input ------------------------------------------------------------------------------------
    def _submit(self) -> None:
        text = self.prompt.toPlainText().strip()
        if text and self.send_button.isEnabled():
            self.prompt.clear()
            editing, self.editing = self.editing, None
            self.editing_label.hide()
            if editing is not None:
                self.edit_sent.emit(editing, text)
            else:
                self.send_requested.emit(text)

    def _escape(self) -> None:
        if self.stop_button.isEnabled():
            self.stop_requested.emit()
        elif self.editing is not None:
            self.cancel_edit()

    def start_edit(self, index: int) -> None:
        """Edit and resend: the question goes back into the box; sending forks the conversation there."""
        self.editing = index
        self.prompt.setPlainText(self.turns[index].text)
        self.editing_label.setText("Editing an earlier question: sending starts a new conversation from there "
                                   "(Esc cancels)")
        self.editing_label.show()
        self.prompt.setFocus()

    def cancel_edit(self) -> None:
        self.editing = None
        self.editing_label.hide()
        self.prompt.clear()

    def set_busy(self, busy: bool) -> None:
        """While an answer streams: Stop on, Send off."""
        self.send_button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)

    def _view_action(self, kind: str, index: int) -> None:
        if kind == "copy" and 0 <= index < len(self.turns):
            QGuiApplication.clipboard().setText(self.turns[index].text)
            self.statusBar().showMessage("Answer copied", 2000)
        elif kind == "regenerate" and self.send_button.isEnabled():
            self.regenerate_requested.emit()
        elif kind == "edit" and 0 <= index < len(self.turns) and self.send_button.isEnabled():
            self.start_edit(index)

    def copy_last_answer(self) -> str:
        answers = [turn for turn in self.turns if turn.role == "assistant" and turn.text]
        if answers:
            QGuiApplication.clipboard().setText(answers[-1].text)
            self.statusBar().showMessage("Last answer copied", 2000)
        return answers[-1].text if answers else ""

    # -- conversation -----------------------------------------------------------------------------
    def show_conversation(self, turns: list[Turn], *, system_prompt: str = "", sampling: str = "") -> None:
        """Another conversation (or a new, empty one) fills the view."""
        self.turns = list(turns)
        self.cancel_edit()
        self.system_prompt.setText(system_prompt)
        self.sampling.setText(sampling)
        last = next((t for t in reversed(self.turns) if t.role == "assistant"), None)
        self.stats.setText(last.stats if last is not None else "")
        self.refresh(now=True)

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
            self.refresh(full=False)

    def finish_turn(self, stats: str, *, status: str = "done") -> None:
        if self.turns:
            self.turns[-1].pending = False
            self.turns[-1].stats = stats
            self.turns[-1].status = status
            self.stats.setText(stats)
        self._render_timer.stop()
        if self._full_render:
            self._render()
        else:
            self.view.finish_stream(self.turns, highlight=self.highlight)

    def drop_last_turn(self) -> None:
        if self.turns:
            self.turns.pop()
            self.refresh(now=True)

    def clear_conversation(self) -> None:
        self.show_conversation([], system_prompt=self.system_prompt.text(), sampling=self.sampling.text())
        self.stats.setText("")

    def set_highlight(self, on: bool) -> None:
        self.highlight = on
        if self.highlight_box.isChecked() != on:
            self.highlight_box.setChecked(on)
        self.legend.setVisible(on)
        self.refresh(now=True)

    def refresh(self, *, now: bool = False, full: bool = True) -> None:
        """Re-render soon (pieces arrive faster than a repaint is worth) or now; ``full=False``: only the
        streaming answer grew."""
        self._full_render = self._full_render or full
        if now:
            self._render_timer.stop()
            self._render()
        elif not self._render_timer.isActive():
            self._render_timer.start()

    def _render(self) -> None:
        if self._full_render:
            self.view.show_turns(self.turns, highlight=self.highlight)
        elif self.turns:
            self.view.update_stream(self.turns[-1], highlight=self.highlight)
        self._full_render = False

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

    # -- the window itself ------------------------------------------------------------------------
    def restore_geometry(self, width: int, height: int, sidebar: int) -> None:
        if width > 0 and height > 0:
            self.resize(width, height)
        if sidebar > 0:
            self.splitter.setSizes([sidebar, max(self.width() - sidebar, 200)])

    def geometry_to_remember(self) -> tuple[int, int, int]:
        return self.width(), self.height(), self.splitter.sizes()[0]

    def bring_forward(self) -> None:
        self.show()
        self.setWindowState((self.windowState() & ~Qt.WindowState.WindowMinimized) | Qt.WindowState.WindowActive)
        self.raise_()
        self.activateWindow()

    def closeEvent(self, event: QCloseEvent) -> None:
        self.closing.emit()
        if self.hide_on_close:
            event.ignore()
            self.hide()
            return
        event.accept()
        self.close_requested.emit()
