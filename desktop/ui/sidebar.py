"""The conversation list: newest first, search (Ctrl+F), New chat, rename, delete with undo, export.

It shows what it is given and emits what the user asked for; the chat session does the store work.
"""

from __future__ import annotations

from PySide6.QtCore import QPoint, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from specd.desktop.conversations import Conversation, SearchHit

UNDO_SECONDS = 8
ID_ROLE = Qt.ItemDataRole.UserRole


class ConversationSidebar(QWidget):
    open_requested = Signal(int)
    new_requested = Signal()
    search_changed = Signal(str)
    rename_requested = Signal(int, str)
    delete_requested = Signal(int)
    undo_requested = Signal(int)
    undo_expired = Signal(int)
    export_requested = Signal(int, str)  # (conversation, "markdown" | "json")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.new_button = QPushButton("New chat")
        self.new_button.setToolTip("Start a new conversation (Ctrl+N)")
        self.new_button.clicked.connect(self.new_requested.emit)
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search conversations (Ctrl+F)")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(self.search_changed.emit)
        self.list = QListWidget()
        self.list.setObjectName("conversations")
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.setTextElideMode(Qt.TextElideMode.ElideRight)  # the whole title is in the tooltip
        self.list.setUniformItemSizes(False)
        self.list.itemActivated.connect(self._activated)
        self.list.itemClicked.connect(self._activated)
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._menu)
        self.undo_label = QLabel()
        self.undo_button = QPushButton("Undo")
        self.undo_button.clicked.connect(self._undo)
        self.undo_bar = QWidget()
        undo_row = QHBoxLayout(self.undo_bar)
        undo_row.setContentsMargins(0, 0, 0, 0)
        undo_row.addWidget(self.undo_label, 1)
        undo_row.addWidget(self.undo_button)
        self.undo_bar.hide()
        self._undo_timer = QTimer(self, singleShot=True, interval=UNDO_SECONDS * 1000)
        self._undo_timer.timeout.connect(self._undo_over)
        self._deleted: int | None = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 4, 0)
        layout.addWidget(self.new_button)
        layout.addWidget(self.search)
        layout.addWidget(self.list, 1)
        layout.addWidget(self.undo_bar)
        self.current: int | None = None

    # -- what it shows ----------------------------------------------------------------------------
    def show_conversations(self, conversations: list[Conversation]) -> None:
        self._fill([(c.id, c.title or "New chat", "") for c in conversations])

    def show_hits(self, hits: list[SearchHit]) -> None:
        self._fill([(h.conversation_id, h.title or "New chat", h.snippet) for h in hits])

    def _fill(self, rows: list[tuple[int, str, str]]) -> None:
        self.list.clear()
        for conversation_id, title, snippet in rows:
            item = QListWidgetItem(title if not snippet or snippet == title else f"{title}\n  {snippet}")
            item.setData(ID_ROLE, conversation_id)
            item.setToolTip(snippet or title)
            self.list.addItem(item)
            if conversation_id == self.current:
                item.setSelected(True)

    def select(self, conversation_id: int | None) -> None:
        self.current = conversation_id
        for row in range(self.list.count()):
            item = self.list.item(row)
            item.setSelected(item.data(ID_ROLE) == conversation_id)

    def titles(self) -> list[str]:
        return [self.list.item(row).text().split("\n")[0] for row in range(self.list.count())]

    def focus_search(self) -> None:
        self.search.setFocus()
        self.search.selectAll()

    # -- delete and undo --------------------------------------------------------------------------
    def offer_undo(self, conversation_id: int, title: str) -> None:
        """After a delete: "Deleted ‘title’ [Undo]" for a few seconds, then the delete is final."""
        if self._deleted is not None and self._deleted != conversation_id:
            self._undo_over()  # only the latest delete can be undone
        self._deleted = conversation_id
        self.undo_label.setText(f"Deleted “{title or 'New chat'}”")
        self.undo_bar.show()
        self._undo_timer.start()

    def _undo(self) -> None:
        if self._deleted is not None:
            deleted, self._deleted = self._deleted, None
            self._undo_timer.stop()
            self.undo_bar.hide()
            self.undo_requested.emit(deleted)

    def _undo_over(self) -> None:
        if self._deleted is not None:
            deleted, self._deleted = self._deleted, None
            self._undo_timer.stop()
            self.undo_bar.hide()
            self.undo_expired.emit(deleted)

    # -- menu -------------------------------------------------------------------------------------
    def _activated(self, item: QListWidgetItem) -> None:
        self.open_requested.emit(int(item.data(ID_ROLE)))

    def _menu(self, where: QPoint) -> None:
        item = self.list.itemAt(where)
        if item is None:
            return
        conversation_id = int(item.data(ID_ROLE))
        menu = QMenu(self)
        menu.addAction("Rename…", lambda: self._rename(conversation_id, item.text().split("\n")[0]))
        menu.addAction("Export as Markdown…", lambda: self.export_requested.emit(conversation_id, "markdown"))
        menu.addAction("Export as JSON…", lambda: self.export_requested.emit(conversation_id, "json"))
        menu.addSeparator()
        menu.addAction("Delete", lambda: self.delete_requested.emit(conversation_id))
        menu.popup(self.list.viewport().mapToGlobal(where))

    def _rename(self, conversation_id: int, title: str) -> QInputDialog:
        dialog = QInputDialog(self)
        dialog.setWindowTitle("Rename conversation")
        dialog.setLabelText("Title:")
        dialog.setTextValue(title)
        dialog.textValueSelected.connect(
            lambda text: self.rename_requested.emit(conversation_id, text.strip()) if text.strip() else None)
        dialog.open()  # not exec(): a nested loop would stall a streaming answer
        return dialog
