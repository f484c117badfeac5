"""The conversation on screen and in the store, kept in step: what the sidebar lists, what the view
shows, what is sent to the model, and every streamed piece saved as it arrives.

The controller runs the answer (the client, settings, errors); this object knows conversations:
which one is open, the turns it shows, where each turn lives in the store, forks and exports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtWidgets import QFileDialog

from specd.desktop.client.stats_line import stats_line
from specd.desktop.conversations import ConversationStore, Message, StoreError, default_store_path
from specd.desktop.conversations.export import export_json_text, export_markdown
from specd.desktop.ui.chat_view import Turn
from specd.desktop.ui.chat_window import ChatWindow

log = logging.getLogger("specd.desktop")


def open_store(folder: Path | None) -> tuple[ConversationStore, str]:
    """The user's conversations (``folder``: where ``conversations.db`` lives, default the per-user data
    folder), and "" — or, where that file cannot be used, a store in memory and why."""
    path = folder / "conversations.db" if folder is not None else default_store_path()
    try:
        store = ConversationStore(path)
        store.recover_interrupted()  # one app per user: an answer still "streaming" lost its writer
        store.purge_deleted()  # deletes from an earlier session are final
        return store, ""
    except StoreError as exc:
        log.error("%s", exc)
        return ConversationStore(":memory:"), f"{exc}; this session's conversations are kept in memory only"


class ChatSession:
    def __init__(self, store: ConversationStore, window: ChatWindow, *, system_prompt: Callable[[], str],
                 sampling: Callable[[], dict[str, Any]], on_error: Callable[[str], None],
                 stop_answer: Callable[[], None] = lambda: None) -> None:
        self.store, self.window = store, window
        self._default_system_prompt, self._sampling, self._on_error = system_prompt, sampling, on_error
        self._stop_answer = stop_answer
        self.conversation_id: int | None = None  # None: a new chat, stored once its first question is sent
        self.positions: list[int | None] = []  # per turn on screen: its message's position (None: not stored)
        self._answer: int | None = None  # the message id of the answer streaming now
        self._answer_in: int | None = None  # its conversation: the window may have moved on to another
        self._save_failed = False
        bar = window.sidebar
        bar.open_requested.connect(self.open)
        bar.search_changed.connect(lambda _text: self.refresh_list())
        bar.rename_requested.connect(self.rename)
        bar.delete_requested.connect(self.delete)
        bar.undo_requested.connect(self.undo_delete)
        bar.undo_expired.connect(lambda _id: self._save(self.store.purge_deleted))
        bar.export_requested.connect(self.ask_where_to_export)
        window.system_prompt_changed.connect(self.set_system_prompt)

    # -- the list ---------------------------------------------------------------------------------
    def refresh_list(self) -> None:
        query = self.window.sidebar.search.text().strip()
        if query:
            self.window.sidebar.show_hits(self.store.search(query))
        else:
            self.window.sidebar.show_conversations(self.store.conversations())
        self.window.sidebar.select(self.conversation_id)

    def open(self, conversation_id: int) -> None:
        conversation = self.store.conversation(conversation_id)
        messages = self.store.messages(conversation_id)
        self.conversation_id = conversation_id
        self.positions = [m.position for m in messages]
        self.window.show_conversation([turn_of(m) for m in messages], system_prompt=conversation.system_prompt,
                                      sampling=sampling_words(conversation.sampling or self._sampling()))
        self.window.sidebar.select(conversation_id)

    def new_chat(self) -> None:
        self.conversation_id = None
        self.positions = []
        self.window.show_conversation([], system_prompt=self._default_system_prompt(),
                                      sampling=sampling_words(self._sampling()))
        self.window.sidebar.select(None)

    def rename(self, conversation_id: int, title: str) -> None:
        self._save(self.store.rename, conversation_id, title)
        self.refresh_list()

    def delete(self, conversation_id: int) -> None:
        title = self.store.conversation(conversation_id).title
        if conversation_id == self._answer_in and self._answer is not None:  # its answer goes with it
            self._answer = self._answer_in = None
            self._stop_answer()
        self._save(self.store.delete, conversation_id)
        if conversation_id == self.conversation_id:
            self.new_chat()
        self.window.sidebar.offer_undo(conversation_id, title)
        self.refresh_list()

    def undo_delete(self, conversation_id: int) -> None:
        self._save(self.store.undo_delete, conversation_id)
        self.refresh_list()

    def set_system_prompt(self, text: str) -> None:
        if self.conversation_id is not None:
            self._save(self.store.set_system_prompt, self.conversation_id, text)

    # -- what goes to the model -------------------------------------------------------------------
    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation so far as chat messages: the system prompt, then questions and answers
        (a stopped answer with what it had written; errors are not part of it)."""
        system = self.window.system_prompt.text().strip()
        out = [{"role": "system", "content": system}] if system else []
        for turn, position in zip(self.window.turns, self.positions, strict=True):
            if position is not None and (turn.role == "user" or (turn.role == "assistant" and turn.text)):
                out.append({"role": turn.role, "content": turn.text})
        return out

    # -- an answer --------------------------------------------------------------------------------
    def ask(self, text: str) -> None:
        """The question goes in the store and on screen, and an empty answer starts streaming."""
        if self.conversation_id is None:
            self.conversation_id = self.store.create(system_prompt=self.window.system_prompt.text().strip(),
                                                     sampling=self._sampling())
        self.store.add_message(self.conversation_id, "user", text)
        self.window.add_turn("user", text)
        self.positions.append(self._last_position())
        self._begin_answer()
        self.refresh_list()

    def ask_again(self) -> bool:
        """Regenerate: the last answer goes (from the store too) and a new one starts; False when there is
        no answer to replace."""
        turns = self.window.turns
        if self.conversation_id is None or not turns or turns[-1].role != "assistant":
            return False
        position = self.positions[-1]
        if position is not None:
            self.store.remove_messages_from(self.conversation_id, position)
        self.positions.pop()
        self.window.drop_last_turn()
        self._begin_answer()
        return True

    def fork_and_ask(self, index: int, text: str) -> None:
        """Edit and resend: a new conversation with what came before question ``index``, then ``text``."""
        position = self.positions[index] if 0 <= index < len(self.positions) else None
        if self.conversation_id is None or position is None:
            self.ask(text)
            return
        title = self.store.conversation(self.conversation_id).title
        fork = self.store.fork(self.conversation_id, position, title=f"{title} (edited)")
        self.open(fork)
        self.ask(text)

    def _begin_answer(self) -> None:
        assert self.conversation_id is not None
        self._answer = self.store.begin_answer(self.conversation_id)
        self._answer_in = self.conversation_id
        self._save_failed = False  # a failure is said once per answer
        self.window.add_turn("assistant", pending=True)
        self.positions.append(self._last_position())

    def on_piece(self, piece: Any) -> None:
        """A committed piece: saved first (a kill right after loses nothing shown), then shown."""
        if self._answer is not None and not self._save_failed:
            self._save(self.store.append_piece, self._answer, piece.text, piece.source, piece.token_ids)
        if self._showing_answer():
            self.window.append_piece(piece.text, piece.source)

    def finish(self, answer: Any) -> None:
        stats = answer.stats.to_json()
        status = "stopped" if answer.finish_reason == "cancelled" else "done"
        if self._answer is not None:
            self._save(self.store.finish_answer, self._answer, status=status,
                       finish_reason=answer.finish_reason or "", stats=stats)
        if self._showing_answer():
            self.window.finish_turn(stats_line(stats, answer.finish_reason), status=status)
        self._answer = None
        self.refresh_list()

    def fail(self, message: str) -> None:
        """No answer: the question and the empty answer leave the store (the question was not answered, so
        it is not part of the conversation); the error shows under it."""
        showing = self._showing_answer()
        self._answer = None
        if not showing:  # the window shows another conversation now: only the store is put right
            if self._answer_in is not None:
                self._drop_unanswered(self._answer_in)
            return
        if self.conversation_id is not None and len(self.positions) >= 2 and self.positions[-2] is not None:
            self._save(self.store.remove_messages_from, self.conversation_id, self.positions[-2])
            self.positions[-2:] = [None, None]
        self.window.finish_turn("")
        self.window.add_turn("error", message)
        self.positions.append(None)

    # -- export -----------------------------------------------------------------------------------
    def ask_where_to_export(self, conversation_id: int, kind: str) -> QFileDialog:
        title = self.store.conversation(conversation_id).title or "conversation"
        suffix, label = (".md", "Markdown (*.md)") if kind == "markdown" else (".json", "JSON (*.json)")
        name = "".join(c if c.isalnum() or c in " -_" else "_" for c in title).strip() or "conversation"
        dialog = QFileDialog(self.window, "Export conversation", str(Path.home() / f"{name}{suffix}"), label)
        dialog.setAcceptMode(QFileDialog.AcceptMode.AcceptSave)
        dialog.fileSelected.connect(lambda path: self.export(conversation_id, kind, Path(path)))
        dialog.open()  # not exec(): a nested loop would stall a streaming answer
        return dialog

    def export(self, conversation_id: int, kind: str, path: Path) -> None:
        text = (export_markdown(self.store, conversation_id) if kind == "markdown"
                else export_json_text(self.store, conversation_id))
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            self._on_error(f"Cannot export the conversation to {path}: {exc}")
            return
        self.window.statusBar().showMessage(f"Exported to {path}", 5000)

    # -- helpers ----------------------------------------------------------------------------------
    def _showing_answer(self) -> bool:
        """Whether the window still shows the conversation the streaming answer belongs to."""
        return self._answer_in is not None and self._answer_in == self.conversation_id

    def _drop_unanswered(self, conversation_id: int) -> None:
        messages = self.store.messages(conversation_id)
        if len(messages) >= 2 and messages[-1].role == "assistant" and not messages[-1].text:
            self._save(self.store.remove_messages_from, conversation_id, messages[-2].position)

    def _last_position(self) -> int:
        assert self.conversation_id is not None
        return self.store.messages(self.conversation_id)[-1].position

    def _save(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A store write; a failure is said once (the answer goes on, unsaved) and logged each time."""
        try:
            return write(*args, **kwargs)
        except StoreError as exc:
            log.error("%s", exc)
            if not self._save_failed:
                self._save_failed = True
                self._on_error(f"Conversations are not being saved: {exc}")
            return None


def turn_of(message: Message) -> Turn:
    """A stored message as it was shown live: provenance runs from its segments, its stats line."""
    turn = Turn(role=message.role, status=message.status, pending=message.status == "streaming")
    if message.segments:
        for segment in message.segments:
            turn.append(segment.text, segment.source)
    elif message.text:
        turn.append(message.text, "cloud")
    if message.role == "assistant" and (message.stats or message.status == "stopped"):
        turn.stats = stats_line(message.stats, message.finish_reason) if message.stats else ""
    return turn


def sampling_words(sampling: dict[str, Any]) -> str:
    """``temperature 0.7 · top-p 0.95 · top-k off · up to 256 tokens · seed random``."""
    if not sampling:
        return ""
    top_k = sampling.get("top_k", 0)
    seed = sampling.get("seed", -1)
    return " · ".join([f"temperature {sampling.get('temperature', 0.0):g}", f"top-p {sampling.get('top_p', 1.0):g}",
                       f"top-k {top_k if top_k else 'off'}", f"up to {sampling.get('max_new_tokens', 0)} tokens",
                       f"seed {seed if seed is not None and seed >= 0 else 'random'}"])
