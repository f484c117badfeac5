"""The conversation database's schema, as numbered migrations kept in ``PRAGMA user_version``.

Each step turns version N-1 into N inside one transaction, so a database is always at a version the
code knows. Add a step at the end; never edit one that has shipped (users' files went through it).
Version 1 (the first release of the store) kept plain text per message; version 2 added provenance
segments with token ids, per-message stats and status, and per-conversation system prompt, sampling
settings and soft deletion.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: tuple[str, ...] = (
    # 1: conversations and their messages as plain text.
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        role TEXT NOT NULL,
        text TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, position);
    """,
    # 2: what was shown live (provenance segments with token ids), stats, system prompt, undoable delete.
    """
    ALTER TABLE conversations ADD COLUMN system_prompt TEXT NOT NULL DEFAULT '';
    ALTER TABLE conversations ADD COLUMN sampling TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE conversations ADD COLUMN deleted REAL;
    ALTER TABLE conversations ADD COLUMN forked_from INTEGER;
    ALTER TABLE messages ADD COLUMN status TEXT NOT NULL DEFAULT 'done';
    ALTER TABLE messages ADD COLUMN finish_reason TEXT NOT NULL DEFAULT '';
    ALTER TABLE messages ADD COLUMN stats TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE segments (
        message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        text TEXT NOT NULL,
        source TEXT NOT NULL,
        token_ids TEXT NOT NULL DEFAULT '[]',
        PRIMARY KEY (message_id, seq)
    );
    CREATE INDEX conversations_by_update ON conversations(deleted, updated);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# Full-text search over message text where this sqlite3 has FTS5 (an external-content index kept by
# triggers); without it, search falls back to LIKE. Not a numbered step: it depends on the build.
FTS_SCRIPT = """
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(text, content='messages', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER IF NOT EXISTS messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TRIGGER IF NOT EXISTS messages_fts_update AFTER UPDATE OF text ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text);
END;
"""


def has_fts5(db: sqlite3.Connection) -> bool:
    try:
        db.execute("CREATE VIRTUAL TABLE temp.fts5_probe USING fts5(x)")
        db.execute("DROP TABLE temp.fts5_probe")
        return True
    except sqlite3.OperationalError:
        return False


def migrate(db: sqlite3.Connection) -> int:
    """Bring ``db`` to :data:`SCHEMA_VERSION`; returns the version it had. A newer file than this code
    knows is refused rather than misread."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise ValueError(f"schema version {found} is newer than this specd understands ({SCHEMA_VERSION}); "
                         "update specd")
    for version in range(found + 1, SCHEMA_VERSION + 1):
        _run_script(db, MIGRATIONS[version - 1] + f"\nPRAGMA user_version = {version};")
    if has_fts5(db):
        fresh = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages_fts'").fetchone() is None
        _run_script(db, FTS_SCRIPT + ("\nINSERT INTO messages_fts(messages_fts) VALUES ('rebuild');" if fresh else ""))
    return found


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """One transaction for the whole script (``executescript`` would commit between statements)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _statements(script):
            db.execute(statement)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _statements(script: str) -> list[str]:
    """Split on complete statements (a trigger body holds semicolons of its own)."""
    out, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip():
        out.append(pending.strip())
    return [s for s in out if s.rstrip(";").strip()]
