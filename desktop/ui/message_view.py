"""The conversation view: one ``QTextBrowser`` (selection and copying run across turns), its ``specd:``
links turned into signals, and a streaming answer updated in place.

A finished conversation is set as a whole. While an answer streams, only its open tail (the last
Markdown blocks, see :class:`IncrementalMarkdown`) is replaced through a ``QTextCursor``; what came
before is never touched, so nothing flickers, the scroll position holds (it follows the answer only
when the reader was already at the bottom), and the cost of a piece does not grow with the answer.
"""

from __future__ import annotations

from PySide6.QtCore import QUrl, Signal
from PySide6.QtGui import QDesktopServices, QGuiApplication, QTextBlockFormat, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import QTextBrowser, QWidget

from specd.desktop.ui.chat_view import ACTION, EMPTY, Turn, render_footer, render_turn
from specd.desktop.ui.markdown_render import COPY_CODE, IncrementalMarkdown


class ConversationView(QTextBrowser):
    action = Signal(str, int)  # ("copy" | "regenerate" | "edit", turn index)
    code_copied = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setOpenLinks(False)
        font = self.font()
        font.setPointSizeF(10.5)
        self.document().setDefaultFont(font)
        self.anchorClicked.connect(self._clicked)
        self.code_blocks: list[str] = []
        self._stream: IncrementalMarkdown | None = None
        self._stream_codes: list[str] = []  # code blocks of the turns before the streaming one
        self._tail_start = 0

    # -- whole renders ----------------------------------------------------------------------------
    def show_turns(self, turns: list[Turn], *, highlight: bool) -> None:
        """Render everything; a pending last answer goes on streaming from here. Turns are appended
        through the same cursor calls streaming uses, so a reopened answer looks as it did live."""
        with self._scroll_kept():
            self._stream = None
            self.clear()
            self.code_blocks = []
            if not turns:
                self.setHtml(EMPTY)
                return
            cursor = QTextCursor(self.document())
            for index, turn in enumerate(turns):
                head, body, foot = render_turn(turns, index, highlight=highlight, code_base=len(self.code_blocks))
                if turn.role != "assistant":  # one fragment: the text keeps its background
                    self._append(cursor, head + body.html)
                    continue
                self._append(cursor, head)
                if turn.pending:
                    self._stream_codes = list(self.code_blocks)
                    self._stream = IncrementalMarkdown()
                    self._tail_start = -1
                    self._replace_tail(turn, highlight)
                    return
                self._append(cursor, body.html)
                self.code_blocks += body.code_blocks
                if foot:
                    self._append(cursor, foot)

    def finish_stream(self, turns: list[Turn], *, highlight: bool) -> None:
        """The streaming answer ended: its tail rendered once more in full, then its footer."""
        if self._stream is None:
            self.show_turns(turns, highlight=highlight)
            return
        with self._scroll_kept():
            self._replace_tail(turns[-1], highlight)
            self._stream = None
            foot = render_footer(turns, len(turns) - 1)
            if foot:
                self._append(QTextCursor(self.document()), foot)

    def _append(self, cursor: QTextCursor, fragment: str) -> int:
        """Put ``fragment`` in blocks of its own at the end; returns where it starts. Qt leaves an empty
        block before a fragment that opens with a list, table or code block: that one is removed, so a
        tail inserted piece by piece lays out exactly like the same HTML inserted at once."""
        cursor.movePosition(QTextCursor.MoveOperation.End)
        end = cursor.position()
        # A table is always followed by an empty block of Qt's own; what comes next starts after it.
        if cursor.block().length() > 1 or (end > 0 and self._in_table(end - 1)):
            cursor.insertBlock(QTextBlockFormat(), QTextCharFormat())
        start = cursor.position()
        if fragment:
            cursor.setBlockFormat(_lead_format())  # the fragment's first block merges into this one
            cursor.insertHtml(fragment)
            probe = QTextCursor(self.document())
            probe.setPosition(start)
            if (start > 0 and probe.block().length() == 1 and probe.block().next().isValid()
                    and not self._in_table(start - 1)):
                probe.deletePreviousChar()
        return start

    def _in_table(self, position: int) -> bool:
        probe = QTextCursor(self.document())
        probe.setPosition(position)
        return probe.currentTable() is not None

    # -- streaming --------------------------------------------------------------------------------
    def update_stream(self, turn: Turn, *, highlight: bool) -> None:
        """The streaming answer grew: re-render its open tail only."""
        if self._stream is None:
            return
        with self._scroll_kept():
            self._replace_tail(turn, highlight)

    def _replace_tail(self, turn: Turn, highlight: bool) -> None:
        assert self._stream is not None
        newly, tail = self._stream.update(turn.text, turn.sources if highlight else [])
        cursor = QTextCursor(self.document())
        cursor.beginEditBlock()
        if self._tail_start > 0:
            # From the end of the block before the tail, so no emptied block is left — unless that block
            # is a table's last cell: a selection reaching into a table takes the whole table.
            after_table = self._in_table(self._tail_start - 1)
            cursor.setPosition(self._tail_start if after_table else self._tail_start - 1)
            cursor.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
            cursor.removeSelectedText()
            if after_table:
                cursor.setBlockFormat(QTextBlockFormat())
                cursor.setBlockCharFormat(QTextCharFormat())
        if newly:
            self._append(cursor, newly)
        body = tail.html if turn.text or not turn.pending else '<p style="color:#888;">…</p>'
        self._tail_start = self._append(cursor, body)
        cursor.endEditBlock()
        self.code_blocks = self._stream_codes + self._stream.code_blocks + tail.code_blocks

    # -- helpers ----------------------------------------------------------------------------------
    def _scroll_kept(self) -> _ScrollKeeper:
        return _ScrollKeeper(self)

    def _clicked(self, url: QUrl) -> None:
        target = url.toString()
        if target.startswith(COPY_CODE):
            index = int(target.removeprefix(COPY_CODE))
            if 0 <= index < len(self.code_blocks):
                QGuiApplication.clipboard().setText(self.code_blocks[index])
                self.code_copied.emit(index)
            return
        if target.startswith(ACTION):
            kind, _, index = target.removeprefix(ACTION).partition("/")
            self.action.emit(kind, int(index or -1))
            return
        QDesktopServices.openUrl(url)


def _lead_format() -> QTextBlockFormat:
    lead = QTextBlockFormat()
    lead.setTopMargin(6)
    return lead


class _ScrollKeeper:
    """At the bottom before a change: stay at the bottom after it. Elsewhere: stay where the reader is."""

    def __init__(self, view: QTextBrowser) -> None:
        self.bar = view.verticalScrollBar()

    def __enter__(self) -> None:
        self.value = self.bar.value()
        self.at_bottom = self.value >= self.bar.maximum() - 4

    def __exit__(self, *_exc: object) -> None:
        self.bar.setValue(self.bar.maximum() if self.at_bottom else self.value)


__all__ = ["ConversationView"]
