"""Conversations in the real app against a real verifier on 127.0.0.1 (tiny models), on real SQLite
files: saved piece by piece while streaming, reopened as they were shown, continued, regenerated,
forked by edit-and-resend; and the sidebar's search, rename, delete with undo, export and keys."""

from __future__ import annotations

import asyncio
import json

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication

from specd.daemon.server import Verifier
from specd.desktop.conversations import ConversationStore
from specd.desktop.ui.controller import DesktopApp
from specd.desktop.ui.user_settings import SecretStore, read_settings
from specd.shared.config import load_config
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.timeout(180)
PROMPT = "w5 w9 w12 w30"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"target": save_tiny_model(root / "target", seed=1), "draft": save_tiny_model(root / "draft", seed=2)}


def make_app(tmp_path, qtbot, folders, url="ws://127.0.0.1:9", *, temperature=0.0, system_prompt="",
             seed=-1) -> DesktopApp:
    config = tmp_path / "config.toml"
    config.write_text(f'[client]\nserver_url = "{url}"\nconnect_timeout_s = 3.0\nreconnect_max_s = 0.5\n'
                      f'[models]\ndraft = "{folders["draft"]}"\ndraft_backend = "torch"\n'
                      f"[sampling]\ntemperature = {temperature}\nmax_new_tokens = 16\nseed = {seed}\n"
                      f'[chat]\nsystem_prompt = "{system_prompt}"\n')
    app = DesktopApp(config_path=config, settings_folder=tmp_path / "user", data_folder=tmp_path / "data",
                     secrets=SecretStore(tmp_path / "user", use_keyring=False), use_tray=False, on_quit=lambda: None)
    qtbot.addWidget(app.window)
    app.window.show()
    return app


def verifier_config(target):
    return load_config(None, overrides={"models": {"target": str(target)}, "server": {"port": 0}})


def test_answers_are_saved_as_they_stream_and_reopen_as_shown(qtbot, qloop, tmp_path, folders):
    saved_while_streaming: list[tuple[str, str]] = []  # (text shown, text in the file) after each piece

    async def first_session():
        async with Verifier(verifier_config(folders["target"])) as verifier:
            app = make_app(tmp_path, qtbot, folders, verifier.url)
            await app.start()
            reader = ConversationStore(tmp_path / "data" / "conversations.db")
            original = app.chat.on_piece

            def on_piece(piece):
                original(piece)
                saved_while_streaming.append((app.window.turns[-1].text, reader.messages(1)[-1].text))

            app.chat.on_piece = on_piece
            await app.send(PROMPT)
            await app.send("w1 w2 w3")
            cached = app.chat.store.messages(1)[-1].stats["cached_prompt_tokens"]
            turns = [(t.role, t.text, list(t.sources), t.stats) for t in app.window.turns]
            reader.close()
            await app.shutdown()
            return turns, cached

    turns, cached = qloop.run_until_complete(asyncio.wait_for(first_session(), 120))
    assert len(saved_while_streaming) >= 4
    assert all(shown == in_file for shown, in_file in saved_while_streaming)  # nothing shown is unsaved
    assert cached > 0  # the second question reused the first exchange's prompt on the verifier

    async def second_session():  # the app again, later: the conversation is listed and reopens as it was
        async with Verifier(verifier_config(folders["target"])) as verifier:
            app = make_app(tmp_path, qtbot, folders, verifier.url)
            assert app.window.sidebar.titles() == [PROMPT]
            app.window.sidebar.list.item(0).setSelected(True)
            app.window.sidebar.list.itemClicked.emit(app.window.sidebar.list.item(0))
            reopened = [(t.role, t.text, list(t.sources), t.stats) for t in app.window.turns]
            await app.start()
            await app.send("w4")  # asking again continues it
            sent = app.conversation
            await app.shutdown()
            return reopened, sent

    reopened, sent = qloop.run_until_complete(asyncio.wait_for(second_session(), 120))
    assert reopened == turns  # text, provenance runs and stats line, as shown live
    assert [m["content"] for m in sent[:4]] == [PROMPT, turns[1][1], "w1 w2 w3", turns[3][1]]
    assert sent[4] == {"role": "user", "content": "w4"} and sent[5]["role"] == "assistant"


def test_regenerate_replaces_the_answer_and_edit_forks(qtbot, qloop, tmp_path, folders):
    async def scenario():
        async with Verifier(verifier_config(folders["target"])) as verifier:
            # Seeded (Regenerate still draws a new seed): an unseeded sample of the tiny model can end at once,
            # and the fork's answer would be empty by chance.
            app = make_app(tmp_path, qtbot, folders, verifier.url, temperature=1.0, system_prompt="Be brief.",
                           seed=11)
            await app.start()
            await app.send(PROMPT)
            first = app.window.turns[-1].text
            app.window.view.action.emit("regenerate", 1)  # the answer's Regenerate link
            while app._answer_task is None:
                await asyncio.sleep(0.01)
            while app._answer_task is not None:
                await asyncio.sleep(0.02)
            store = app.chat.store
            after_regenerate = [(m.role, m.text, m.status) for m in store.messages(1)]
            app.window.view.action.emit("edit", 0)  # the question's Edit and resend link
            assert app.window.prompt.toPlainText() == PROMPT and app.window.editing == 0
            app.window.prompt.setPlainText("w7 w8")
            app.window.send_button.click()
            while app._answer_task is None:
                await asyncio.sleep(0.01)
            while app._answer_task is not None:
                await asyncio.sleep(0.02)
            result = (first, after_regenerate, [c.id for c in store.conversations()],
                      [(m.role, m.text) for m in store.messages(1)], [(m.role, m.text) for m in store.messages(2)],
                      store.conversation(2), app.window.sidebar.titles(), app.conversation)
            await app.shutdown()
            return result

    first, regenerated, ids, original, fork, forked, titles, sent = qloop.run_until_complete(
        asyncio.wait_for(scenario(), 120))
    assert [r[0] for r in regenerated] == ["user", "assistant"] and regenerated[1][2] == "done"
    assert regenerated[1][1] != first  # a new seed: another answer (temperature 1)
    assert original == [("user", PROMPT), ("assistant", regenerated[1][1])]  # the original is kept
    assert fork[0] == ("user", "w7 w8") and fork[1][0] == "assistant" and fork[1][1]
    assert forked.forked_from == 1 and forked.system_prompt == "Be brief." and ids == [2, 1]
    assert titles == [f"{PROMPT} (edited)", PROMPT]
    assert sent[0] == {"role": "system", "content": "Be brief."}


def test_stop_keeps_what_was_written_and_a_new_chat_leaves_the_answer_alone(qtbot, qloop, tmp_path, folders):
    async def scenario():
        async with Verifier(verifier_config(folders["target"])) as verifier:
            app = make_app(tmp_path, qtbot, folders, verifier.url)
            await app.start()
            shown = []
            original = app.chat.on_piece

            def on_piece(piece):
                original(piece)
                if not shown:
                    shown.append(app.window.turns[-1].text)
                    app.window.new_chat_requested.emit()  # Ctrl+N mid-answer: stops it, opens a new chat

            app.chat.on_piece = on_piece
            await app.send(PROMPT)
            stored = app.chat.store.messages(1)
            result = shown, stored, app.window.turns, app.chat.conversation_id, app.window.sidebar.titles()
            app.chat.open(1)
            reopened = [(t.text, t.status, t.pending) for t in app.window.turns]
            await app.shutdown()
            return (*result, reopened)

    shown, stored, turns, current, titles, reopened = qloop.run_until_complete(asyncio.wait_for(scenario(), 120))
    assert [m.role for m in stored] == ["user", "assistant"]
    answer = stored[1]
    assert answer.status == "stopped" and answer.finish_reason == "cancelled"
    assert answer.text.startswith(shown[0]) and answer.text == "".join(s.text for s in answer.segments)
    assert turns == [] and current is None and titles == [PROMPT]  # the new chat was left alone
    assert reopened[1] == (answer.text, "stopped", False)


def test_deleting_the_conversation_of_a_streaming_answer_stops_it(qtbot, qloop, tmp_path, folders):
    async def scenario():
        async with Verifier(verifier_config(folders["target"])) as verifier:
            app = make_app(tmp_path, qtbot, folders, verifier.url)
            await app.start()
            original = app.chat.on_piece
            deleted = []

            def on_piece(piece):
                original(piece)
                if not deleted:
                    deleted.append(1)
                    app.window.sidebar.delete_requested.emit(1)

            app.chat.on_piece = on_piece
            finished = []
            finish = app.chat.finish
            app.chat.finish = lambda answer: (finished.append(answer.finish_reason), finish(answer))
            await app.send(PROMPT)
            assert finished == ["cancelled"]
            app.window.sidebar._undo_over()  # the undo time ends
            errors = [t.text for t in app.window.turns if t.role == "error"]
            rows = app.chat.store.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
            await app.shutdown()
            return errors, rows

    errors, rows = qloop.run_until_complete(asyncio.wait_for(scenario(), 120))
    assert errors == [] and rows == 0  # stopped, removed, and nothing said about saving


def fill(store: ConversationStore) -> list[int]:
    ids = []
    for question, answer in [("Reverse a list", "Use `numbers[::-1]`."), ("Sort a dict", "sorted(d.items())"),
                             ("Boil an egg", "Nine minutes.")]:
        conversation = store.create()
        store.add_message(conversation, "user", question)
        message = store.begin_answer(conversation)
        store.append_piece(message, answer, "draft", [1, 2])
        store.finish_answer(message, finish_reason="eos", stats={"generated": 2, "mode": "speculative"})
        ids.append(conversation)
    return ids


def test_sidebar_search_rename_delete_undo_and_export(qtbot, tmp_path, folders):
    app = make_app(tmp_path, qtbot, folders)
    store, bar = app.chat.store, app.window.sidebar
    ids = fill(store)
    app.chat.refresh_list()
    assert bar.titles() == ["Boil an egg", "Sort a dict", "Reverse a list"]  # newest first
    bar.search.setText("items")  # searches the text too
    assert bar.titles() == ["Sort a dict"]
    bar.search.setText("")
    dialog = bar._rename(ids[0], "Reverse a list")  # what the menu's Rename… opens
    dialog.setTextValue("Lists")
    dialog.accept()
    assert "Lists" in bar.titles() and store.conversation(ids[0]).title == "Lists"
    app.chat.open(ids[1])
    bar.delete_requested.emit(ids[1])
    assert bar.titles() == ["Boil an egg", "Lists"] and bar.undo_bar.isVisibleTo(bar)
    assert app.window.turns == [] and app.chat.conversation_id is None  # the open one was deleted
    bar.undo_button.click()
    assert bar.titles() == ["Boil an egg", "Sort a dict", "Lists"] and not bar.undo_bar.isVisibleTo(bar)
    bar._undo_timer.setInterval(50)
    bar.delete_requested.emit(ids[2])
    qtbot.waitUntil(lambda: not bar.undo_bar.isVisibleTo(bar), timeout=3000)
    assert [c.id for c in store.conversations(include_deleted=True)] == [ids[1], ids[0]]  # purged for good
    app.chat.export(ids[0], "markdown", tmp_path / "lists.md")
    app.chat.export(ids[0], "json", tmp_path / "lists.json")
    assert (tmp_path / "lists.md").read_text(encoding="utf-8").startswith("# Lists\n")
    data = json.loads((tmp_path / "lists.json").read_text(encoding="utf-8"))
    assert data["messages"][1]["segments"] == [{"text": "Use `numbers[::-1]`.", "source": "draft", "token_ids": [1, 2]}]
    qtbot.wait(10)


def test_keys_and_the_remembered_window(qtbot, qapp, qloop, tmp_path, folders):
    qapp.setQuitOnLastWindowClosed(False)  # as run_app sets it
    app = make_app(tmp_path, qtbot, folders)
    fill(app.chat.store)
    app.chat.refresh_list()
    app.chat.open(1)
    window = app.window
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow, timeout=3000)
    qtbot.keyClick(window, Qt.Key.Key_C, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    assert QGuiApplication.clipboard().text() == "Use `numbers[::-1]`."
    qtbot.keyClick(window, Qt.Key.Key_F, Qt.KeyboardModifier.ControlModifier)
    assert window.sidebar.search.hasFocus()
    stops = []
    window.stop_requested.connect(lambda: stops.append(1))
    window.set_busy(True)
    qtbot.keyClick(window, Qt.Key.Key_Escape)
    assert stops == [1]
    window.set_busy(False)
    qtbot.keyClick(window, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    assert app.chat.conversation_id is None and window.turns == []
    window.resize(900, 640)
    window.splitter.setSizes([300, 600])

    async def close():
        window.close()  # no tray: closing quits, remembering the size
        await app.closed.wait()
        while app.window.isVisible():
            await asyncio.sleep(0.02)

    qloop.run_until_complete(asyncio.wait_for(close(), 10))
    prefs = read_settings(tmp_path / "user" / "settings.toml").desktop
    assert (prefs.window_width, prefs.window_height, prefs.sidebar_width) == (900, 640, 300)
    again = make_app(tmp_path, qtbot, folders)
    assert (again.window.width(), again.window.height()) == (900, 640)
    assert again.window.splitter.sizes()[0] == 300
    qapp.setQuitOnLastWindowClosed(True)


def test_the_default_system_prompt_is_a_setting(qtbot, qapp, qloop, tmp_path, folders):
    qapp.setQuitOnLastWindowClosed(False)
    app = make_app(tmp_path, qtbot, folders)
    assert app.window.system_prompt.text() == ""
    assert app.window.sampling.text() == "temperature 0 · top-p 0.95 · top-k off · up to 16 tokens · seed random"
    client = app.client

    async def change():
        dialog = app.open_settings()
        dialog.edits[("chat", "system_prompt")].setText("Answer in French.")
        dialog.accept()
        while app.config.chat.system_prompt != "Answer in French.":
            await asyncio.sleep(0.02)

    qloop.run_until_complete(asyncio.wait_for(change(), 30))
    assert read_settings(tmp_path / "user" / "settings.toml").layer == {"chat": {"system_prompt": "Answer in French."}}
    assert app.client is client  # a new system prompt needs no new client
    app.new_chat()
    assert app.window.system_prompt.text() == "Answer in French."
    assert app.conversation == [{"role": "system", "content": "Answer in French."}]
    qapp.setQuitOnLastWindowClosed(True)
