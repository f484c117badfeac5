"""The conversation store: SQLite in WAL mode, one file per user (``conversations.db`` in the data folder).

Every streamed piece of an answer is written in its own short transaction as it arrives, so a crash or
a kill loses at most the piece in flight; an answer that was still streaming when its writer died
reopens marked ``stopped``. WAL with ``synchronous=NORMAL`` makes each such commit an append to the
log without an fsync (safe against a killed process; a power cut may lose the last pieces), which keeps
saving far below the cost of showing a piece. One connection per store object, used from one thread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specd.desktop.conversations.schema import has_fts5, migrate
from specd.shared.errors import SpecdError
from specd.shared.paths import data_dir

STORE_FILE = "conversations.db"
TITLE_LENGTH = 60
ROLES = ("user", "assistant", "error")
STATUSES = ("done", "streaming", "stopped", "error")


class StoreError(SpecdError):
    """The conversation database cannot be opened or used; the message names the file."""


def default_store_path() -> Path:
    """``%LOCALAPPDATA%\\specd\\conversations.db`` on Windows, ``~/.local/share/specd/conversations.db``
    (``$SPECD_DATA_DIR/conversations.db`` where that is set)."""
    return data_dir() / STORE_FILE


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of an answer as it streamed: its text, where it came from, and its token ids."""

    text: str
    source: str  # draft | target | local | cloud (see specd.desktop.client.answer.Piece)
    token_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class Message:
    id: int
    conversation_id: int
    position: int
    role: str  # user | assistant | error
    text: str
    status: str = "done"  # done | streaming | stopped | error
    finish_reason: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)
    created: float = 0.0


@dataclass(frozen=True, slots=True)
class Conversation:
    id: int
    title: str
    system_prompt: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)  # the settings its answers were asked with
    created: float = 0.0
    updated: float = 0.0
    deleted: float | None = None
    forked_from: int | None = None


@dataclass(frozen=True, slots=True)
class SearchHit:
    conversation_id: int
    title: str
    snippet: str  # where the words were found (the title, or a stretch of a message)


def title_from(text: str) -> str:
    """A title from the first question: its first line, cut at a word near :data:`TITLE_LENGTH`."""
    line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else ""
    if len(line) <= TITLE_LENGTH:
        return line
    cut = line[:TITLE_LENGTH].rsplit(" ", 1)[0]
    return (cut if len(cut) > TITLE_LENGTH // 2 else line[:TITLE_LENGTH]) + "…"


class ConversationStore:
    """Open (creating or migrating) the database at ``path``; :meth:`close` when done."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else default_store_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.migrated_from = migrate(self.db)
        except (OSError, sqlite3.Error, ValueError) as exc:
            raise StoreError(f"cannot open the conversation store {self.path}: {exc}") from None
        self.fts = has_fts5(self.db) and self._exists("messages_fts")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- conversations ----------------------------------------------------------------------------
    def create(self, *, title: str = "", system_prompt: str = "", sampling: dict[str, Any] | None = None,
               forked_from: int | None = None) -> int:
        now = time.time()
        with self._transaction():
            cursor = self.db.execute(
                "INSERT INTO conversations (title, system_prompt, sampling, created, updated, forked_from) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (title, system_prompt, json.dumps(sampling or {}), now, now, forked_from))
        return int(cursor.lastrowid)

    def conversations(self, *, include_deleted: bool = False) -> list[Conversation]:
        """Newest first (by last change)."""
        where = "" if include_deleted else "WHERE deleted IS NULL"
        rows = self.db.execute(f"SELECT * FROM conversations {where} ORDER BY updated DESC, id DESC")
        return [self._conversation(row) for row in _dicts(rows)]

    def conversation(self, conversation_id: int) -> Conversation:
        rows = list(_dicts(self.db.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,))))
        if not rows:
            raise StoreError(f"{self.path}: there is no conversation {conversation_id}")
        return self._conversation(rows[0])

    def rename(self, conversation_id: int, title: str) -> None:
        with self._transaction():
            self.db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title.strip(), conversation_id))

    def set_system_prompt(self, conversation_id: int, text: str) -> None:
        with self._transaction():
            self.db.execute("UPDATE conversations SET system_prompt = ? WHERE id = ?", (text, conversation_id))

    def set_sampling(self, conversation_id: int, sampling: dict[str, Any]) -> None:
        with self._transaction():
            self.db.execute("UPDATE conversations SET sampling = ? WHERE id = ?",
                            (json.dumps(sampling), conversation_id))

    def delete(self, conversation_id: int) -> None:
        """Hide it (undoable with :meth:`undo_delete` until :meth:`purge_deleted` removes it)."""
        with self._transaction():
            self.db.execute("UPDATE conversations SET deleted = ? WHERE id = ?", (time.time(), conversation_id))

    def undo_delete(self, conversation_id: int) -> None:
        with self._transaction():
            self.db.execute("UPDATE conversations SET deleted = NULL WHERE id = ?", (conversation_id,))

    def purge_deleted(self, before: float | None = None) -> int:
        """Remove for good what was deleted before ``before`` (default: now); returns how many."""
        with self._transaction():
            cursor = self.db.execute("DELETE FROM conversations WHERE deleted IS NOT NULL AND deleted <= ?",
                                     (time.time() if before is None else before,))
        return cursor.rowcount

    # -- messages ---------------------------------------------------------------------------------
    def messages(self, conversation_id: int) -> list[Message]:
        rows = list(_dicts(self.db.execute(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY position", (conversation_id,))))
        segments: dict[int, list[Segment]] = {}
        for row in _dicts(self.db.execute(
                "SELECT s.* FROM segments s JOIN messages m ON m.id = s.message_id "
                "WHERE m.conversation_id = ? ORDER BY s.message_id, s.seq", (conversation_id,))):
            segments.setdefault(row["message_id"], []).append(
                Segment(row["text"], row["source"], tuple(json.loads(row["token_ids"]))))
        return [Message(id=row["id"], conversation_id=conversation_id, position=row["position"], role=row["role"],
                        text=row["text"], status=row["status"], finish_reason=row["finish_reason"],
                        stats=json.loads(row["stats"]), segments=segments.get(row["id"], []),
                        created=row["created"]) for row in rows]

    def add_message(self, conversation_id: int, role: str, text: str = "", *, status: str = "done",
                    segments: Iterable[Segment] = (), stats: dict[str, Any] | None = None,
                    finish_reason: str = "") -> int:
        """Append a message; the first question also names an untitled conversation."""
        if role not in ROLES or status not in STATUSES:
            raise StoreError(f"unknown message role {role!r} or status {status!r}")
        now = time.time()
        with self._transaction():
            position = self.db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation_id = ?",
                                       (conversation_id,)).fetchone()[0]
            cursor = self.db.execute(
                "INSERT INTO messages (conversation_id, position, role, text, status, finish_reason, stats, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, position, role, text, status, finish_reason, json.dumps(stats or {}), now))
            message_id = int(cursor.lastrowid)
            for seq, segment in enumerate(segments):
                self._insert_segment(message_id, seq, segment)
            self.db.execute("UPDATE conversations SET updated = ?, title = CASE WHEN title = '' AND ? = 'user' "
                            "THEN ? ELSE title END WHERE id = ?", (now, role, title_from(text), conversation_id))
        return message_id

    def begin_answer(self, conversation_id: int) -> int:
        """An empty assistant message marked ``streaming``; pieces go in with :meth:`append_piece`."""
        return self.add_message(conversation_id, "assistant", status="streaming")

    def append_piece(self, message_id: int, text: str, source: str, token_ids: Iterable[int] = ()) -> None:
        """One committed piece, in one transaction: its segment and the message's text together."""
        with self._transaction():
            seq = self.db.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM segments WHERE message_id = ?",
                                  (message_id,)).fetchone()[0]
            self._insert_segment(message_id, seq, Segment(text, source, tuple(token_ids)))
            self.db.execute("UPDATE messages SET text = text || ? WHERE id = ?", (text, message_id))

    def finish_answer(self, message_id: int, *, status: str = "done", finish_reason: str = "",
                      stats: dict[str, Any] | None = None) -> None:
        if status not in STATUSES:
            raise StoreError(f"unknown message status {status!r}")
        with self._transaction():
            self.db.execute("UPDATE messages SET status = ?, finish_reason = ?, stats = ? WHERE id = ?",
                            (status, finish_reason, json.dumps(stats or {}), message_id))
            self.db.execute("UPDATE conversations SET updated = ? WHERE id = "
                            "(SELECT conversation_id FROM messages WHERE id = ?)", (time.time(), message_id))

    def remove_messages_from(self, conversation_id: int, position: int) -> int:
        """Drop the messages at ``position`` and after (regenerate drops the last answer); returns how many."""
        with self._transaction():
            cursor = self.db.execute("DELETE FROM messages WHERE conversation_id = ? AND position >= ?",
                                     (conversation_id, position))
        return cursor.rowcount

    def fork(self, conversation_id: int, position: int, *, title: str = "") -> int:
        """A new conversation with this one's messages before ``position`` (edit and resend starts one);
        the original stays as it was."""
        source = self.conversation(conversation_id)
        new = self.create(title=title or source.title, system_prompt=source.system_prompt,
                          sampling=source.sampling, forked_from=conversation_id)
        for message in self.messages(conversation_id):
            if message.position >= position:
                break
            self.add_message(new, message.role, message.text, status=message.status, segments=message.segments,
                             stats=message.stats, finish_reason=message.finish_reason)
        return new

    # -- search -----------------------------------------------------------------------------------
    def search(self, query: str, *, limit: int = 50) -> list[SearchHit]:
        """Conversations whose title or text has every word of ``query`` (as word prefixes with FTS5,
        substrings without), newest first."""
        words = query.split()
        if not words:
            return []
        hits: dict[int, SearchHit] = {}
        title_like = " AND ".join("title LIKE ? ESCAPE '\\'" for _ in words)
        for row in _dicts(self.db.execute(
                f"SELECT id, title FROM conversations WHERE deleted IS NULL AND {title_like} "
                "ORDER BY updated DESC LIMIT ?", (*(_like(w) for w in words), limit))):
            hits[row["id"]] = SearchHit(row["id"], row["title"], row["title"])
        if self.fts:
            match = " ".join('"' + w.replace('"', '""') + '"*' for w in words)
            rows = self.db.execute(
                "SELECT c.id, c.title, snippet(messages_fts, 0, '', '', '…', 12) AS snippet "
                "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid "
                "JOIN conversations c ON c.id = m.conversation_id "
                "WHERE messages_fts MATCH ? AND c.deleted IS NULL ORDER BY c.updated DESC LIMIT ?", (match, limit))
        else:
            text_like = " AND ".join("m.text LIKE ? ESCAPE '\\'" for _ in words)
            rows = self.db.execute(
                "SELECT c.id, c.title, substr(m.text, 1, 80) AS snippet FROM messages m "
                f"JOIN conversations c ON c.id = m.conversation_id WHERE c.deleted IS NULL AND {text_like} "
                "ORDER BY c.updated DESC LIMIT ?", (*(_like(w) for w in words), limit))
        for row in _dicts(rows):
            hits.setdefault(row["id"], SearchHit(row["id"], row["title"], " ".join(row["snippet"].split())))
        order = {c.id: i for i, c in enumerate(self.conversations())}
        return sorted(hits.values(), key=lambda hit: order.get(hit.conversation_id, len(order)))

    def integrity(self) -> str:
        return str(self.db.execute("PRAGMA integrity_check").fetchone()[0])

    def recover_interrupted(self) -> int:
        """Mark answers left ``streaming`` by a writer that died as ``stopped`` (what was saved is kept);
        returns how many. The app calls it once at start: it is the one writer per user (one instance),
        so nothing else can be streaming then. A reader that merely opens the file changes nothing."""
        with self._transaction():
            cursor = self.db.execute("UPDATE messages SET status = 'stopped', finish_reason = "
                                     "CASE WHEN finish_reason = '' THEN 'interrupted' ELSE finish_reason END "
                                     "WHERE status = 'streaming'")
        return cursor.rowcount

    # -- internals --------------------------------------------------------------------------------
    def _insert_segment(self, message_id: int, seq: int, segment: Segment) -> None:
        self.db.execute("INSERT INTO segments (message_id, seq, text, source, token_ids) VALUES (?, ?, ?, ?, ?)",
                        (message_id, seq, segment.text, segment.source, json.dumps(list(segment.token_ids))))

    def _exists(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is not None

    def _conversation(self, row: dict[str, Any]) -> Conversation:
        return Conversation(id=row["id"], title=row["title"], system_prompt=row["system_prompt"],
                            sampling=json.loads(row["sampling"]), created=row["created"], updated=row["updated"],
                            deleted=row["deleted"], forked_from=row["forked_from"])

    def _transaction(self) -> _Transaction:
        return _Transaction(self)


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error); sqlite errors become a StoreError naming the file."""

    def __init__(self, store: ConversationStore) -> None:
        self.store = store

    def __enter__(self) -> None:
        self.store.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        if kind is None:
            self.store.db.execute("COMMIT")
            return
        self.store.db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"cannot write the conversation store {self.store.path}: {exc}") from exc


def _dicts(cursor: sqlite3.Cursor) -> Iterable[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    for row in cursor:
        yield dict(zip(names, row, strict=True))


def _like(word: str) -> str:
    return "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
