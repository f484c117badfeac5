"""The conversation store on real SQLite files: streaming saves, a writer killed mid-answer, an older
schema migrated, search, delete and undo, forks, and exports that round-trip."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from specd.desktop.conversations import ConversationStore, Segment, StoreError
from specd.desktop.conversations.export import export_json, export_json_text, export_markdown, import_json
from specd.desktop.conversations.schema import MIGRATIONS, SCHEMA_VERSION
from specd.desktop.conversations.store import title_from
from tests.conversation_writer import piece


@pytest.fixture
def store(tmp_path):
    with ConversationStore(tmp_path / "conversations.db") as opened:
        yield opened


def answered(store: ConversationStore, question: str, answer: str, *, system: str = "") -> int:
    conversation = store.create(system_prompt=system)
    store.add_message(conversation, "user", question)
    message = store.begin_answer(conversation)
    for word in answer.split(" "):
        store.append_piece(message, word + " ", "draft", [len(word)])
    store.finish_answer(message, finish_reason="eos", stats={"generated": len(answer.split())})
    return conversation


def test_the_file_is_wal_and_versioned(store):
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.fts  # this sqlite3 has FTS5; search falls back to LIKE where it has not


def test_each_piece_is_saved_as_it_streams(store, tmp_path):
    conversation = store.create()
    store.add_message(conversation, "user", "How do I reverse a list in Python?\nPlease explain.")
    answer = store.begin_answer(conversation)
    with ConversationStore(tmp_path / "conversations.db") as reader:  # another connection sees each commit
        for i in range(5):
            text, source, ids = piece(i)
            store.append_piece(answer, text, source, ids)
            seen = reader.messages(conversation)[-1]
            assert seen.status == "streaming" and len(seen.segments) == i + 1
            assert seen.text == "".join(piece(j)[0] for j in range(i + 1))
    store.finish_answer(answer, finish_reason="eos", stats={"acceptance_rate": 0.8})
    message = store.messages(conversation)[-1]
    assert message.status == "done" and message.stats == {"acceptance_rate": 0.8}
    assert message.segments[2] == Segment("word2 ", "target", (2, 3))
    assert store.conversation(conversation).title == "How do I reverse a list in Python?"


def test_a_writer_killed_mid_answer_loses_at_most_the_piece_in_flight(tmp_path):
    path = tmp_path / "conversations.db"
    writer = subprocess.Popen([sys.executable, "-m", "tests.conversation_writer", str(path)],
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    line = ""
    try:
        for line in writer.stdout:
            if line.startswith("committed") and int(line.split()[1]) >= 200:
                break
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    # What it printed before it died (buffered lines first); a line cut off by the kill does not count.
    printed = [line.strip(), *writer.stdout.read().split("\n")[:-1]]
    committed = int([p for p in printed if p.startswith("committed ")][-1].split()[1])
    assert writer.returncode == -signal.SIGKILL and committed >= 200
    with ConversationStore(path) as reopened:
        assert reopened.integrity() == "ok"
        assert reopened.messages(1)[-1].status == "streaming"  # opening to read changes nothing
        assert reopened.recover_interrupted() == 1
        [conversation] = reopened.conversations()
        answer = reopened.messages(conversation.id)[-1]
        assert answer.status == "stopped" and answer.finish_reason == "interrupted"
        saved = len(answer.segments)
        assert committed <= saved <= committed + 1  # all it said it committed, and at most the piece in flight
        assert answer.segments == [Segment(*piece(i)[:2], tuple(piece(i)[2])) for i in range(saved)]
        assert answer.text == "".join(s.text for s in answer.segments)
        assert conversation.system_prompt == "Be brief."


def test_an_older_schema_is_migrated_keeping_its_conversations(tmp_path):
    path = tmp_path / "conversations.db"
    old = sqlite3.connect(path)
    old.executescript(MIGRATIONS[0] + "\nPRAGMA user_version = 1;")
    old.execute("INSERT INTO conversations (title, created, updated) VALUES ('Old chat', 1.0, 2.0)")
    old.execute("INSERT INTO messages (conversation_id, position, role, text, created) VALUES (1, 0, 'user', "
                "'what is a monad', 1.0)")
    old.execute("INSERT INTO messages (conversation_id, position, role, text, created) VALUES (1, 1, 'assistant', "
                "'a monoid in the category of endofunctors', 1.5)")
    old.commit()
    old.close()
    with ConversationStore(path) as store:
        assert store.migrated_from == 1 and store.integrity() == "ok"
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        [conversation] = store.conversations()
        assert conversation.title == "Old chat" and conversation.system_prompt == ""
        messages = store.messages(conversation.id)
        assert [m.text for m in messages] == ["what is a monad", "a monoid in the category of endofunctors"]
        assert all(m.status == "done" and m.segments == [] for m in messages)
        assert [h.conversation_id for h in store.search("endofunctor")] == [1]  # indexed on migration


def test_a_newer_schema_is_refused_with_the_file_named(tmp_path):
    path = tmp_path / "conversations.db"
    newer = sqlite3.connect(path)
    newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.close()
    with pytest.raises(StoreError, match=r"conversations\.db.*newer than this specd"):
        ConversationStore(path)


def test_search_finds_titles_and_text_newest_first(store):
    first = answered(store, "Reverse a list", "Use slicing with numbers[::-1]")
    second = answered(store, "Sort a dict", "sorted(d.items()) gives the pairs in order of keys")
    third = answered(store, "Something else", "nothing to see")
    store.rename(third, "Slicing notes")
    assert [h.conversation_id for h in store.search("slic")] == [third, first]  # prefix match, newest first
    assert [h.conversation_id for h in store.search("pairs order")] == [second]  # every word
    assert "pairs" in store.search("pairs")[0].snippet
    assert store.search("") == [] and store.search("zebra") == []
    assert store.search('"; DROP TABLE x; --') == []  # quotes and operators are only words


def test_delete_hides_and_undo_brings_back_until_purged(store):
    kept, dropped = answered(store, "keep me", "yes"), answered(store, "drop me", "ok")
    store.delete(dropped)
    assert [c.id for c in store.conversations()] == [kept] and store.search("drop") == []
    store.undo_delete(dropped)
    assert [c.id for c in store.conversations()] == [dropped, kept]
    store.delete(dropped)
    assert store.purge_deleted() == 1
    assert store.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2  # only the kept one's
    assert store.db.execute("SELECT COUNT(*) FROM segments").fetchone()[0] == 1
    with pytest.raises(StoreError, match="no conversation"):
        store.conversation(dropped)


def test_fork_copies_what_came_before_and_leaves_the_original(store):
    conversation = answered(store, "first question", "first answer", system="Answer in French.")
    store.add_message(conversation, "user", "second question")
    store.add_message(conversation, "assistant", "second answer", segments=[Segment("second answer", "target", (7,))])
    fork = store.fork(conversation, 2)
    assert [m.text for m in store.messages(fork)] == ["first question", "first answer "]
    assert store.messages(fork)[1].segments == store.messages(conversation)[1].segments
    assert store.conversation(fork).forked_from == conversation
    assert store.conversation(fork).system_prompt == "Answer in French."
    assert len(store.messages(conversation)) == 4
    assert store.remove_messages_from(conversation, 3) == 1  # regenerate drops the last answer
    assert [m.role for m in store.messages(conversation)] == ["user", "assistant", "user"]


def test_exports_round_trip(store, tmp_path):
    conversation = answered(store, "Reverse a list", "Use `numbers[::-1]`", system="Be brief.")
    store.set_sampling(conversation, {"temperature": 0.7, "top_p": 0.95})
    data = export_json(store, conversation)
    assert data["messages"][1]["segments"][0] == {"text": "Use ", "source": "draft", "token_ids": [3]}
    path = tmp_path / "export.json"
    path.write_text(export_json_text(store, conversation), encoding="utf-8")
    again = import_json(store, json.loads(path.read_text(encoding="utf-8")))
    strip = {"id", "created", "updated", "messages"}
    redone = export_json(store, again)
    assert {k: v for k, v in redone.items() if k not in strip} == {k: v for k, v in data.items() if k not in strip}
    assert [{k: v for k, v in m.items() if k != "created"} for m in redone["messages"]] == \
        [{k: v for k, v in m.items() if k != "created"} for m in data["messages"]]
    markdown = export_markdown(store, conversation)
    assert markdown.startswith("# Reverse a list\n") and "**System prompt:** Be brief." in markdown
    assert "## You\n\nReverse a list\n" in markdown and "## specd\n\nUse `numbers[::-1]`" in markdown
    with pytest.raises(StoreError, match="not a specd conversation export"):
        import_json(store, {"messages": []})


def test_titles_come_from_the_first_line_cut_at_a_word():
    assert title_from("  Hello\nworld") == "Hello"
    long = "word " * 30
    assert title_from(long).endswith("…") and len(title_from(long)) <= 61
