"""The tray app's answers: a question asked (new, edited or asked again) in the open conversation,
answered by the edge client while the window streams it; stopping it, starting a new chat.

Mixed into :class:`~specd.desktop.ui.controller.DesktopApp`, which owns the state annotated below; what
a conversation holds and how it is stored is :class:`~specd.desktop.ui.chat_session.ChatSession`'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Callable
from typing import Any

from specd.desktop.ui.chat_session import ChatSession
from specd.desktop.ui.chat_window import ChatWindow
from specd.desktop.ui.idle_reconnect import IdleReconnector
from specd.desktop.ui.status_line import milliseconds
from specd.shared.errors import SpecdError


class ChatAnswers:
    """Ask, answer, stop; one answer at a time."""

    # The app's state this part reads and writes (set in DesktopApp.__init__).
    setup: Any  # launch.ClientSetup once the client is ready
    client: Any
    chat: ChatSession
    window: ChatWindow
    reconnector: IdleReconnector
    prepare_error: str
    latency: str
    _answer_task: asyncio.Task | None
    # The app's own reports (DesktopApp) and the client's reconnects (EdgeClientLifecycle).
    _error: Callable[[str], None]
    _show_status: Callable[[], None]
    _retry_while_idle: Callable[[], None]

    @property
    def conversation(self) -> list[dict[str, str]]:
        """The open conversation as it is sent to the model (system prompt, questions, answers)."""
        return self.chat.prompt_messages()

    async def send(self, text: str, *, edit_of: int | None = None) -> None:
        """Ask ``text`` in the open conversation; ``edit_of``: an earlier question edited, the conversation
        forks there."""
        if not self._can_answer():
            return
        if edit_of is not None:
            self.chat.fork_and_ask(edit_of, text)
        else:
            self.chat.ask(text)
        await self._answer(self.setup.settings)

    async def regenerate(self) -> None:
        """The last answer again, with a new seed (a fixed seed in the config would repeat it)."""
        if self._can_answer() and self.chat.ask_again():
            await self._answer(dataclasses.replace(self.setup.settings, seed=secrets.randbits(63)))

    def _can_answer(self) -> bool:
        if self._answer_task is not None and not self._answer_task.done():
            return False
        if self.client is None:
            if self.prepare_error:
                self._error(f"Cannot answer: {self.prepare_error}. Change it in Settings….")
            else:
                self._error("The client is not ready yet (the draft model is still being prepared).")
            return False
        return True

    async def _answer(self, settings: Any) -> None:
        self._answer_task = asyncio.current_task()
        await self.reconnector.pause()  # the answer reconnects by itself; one handshake at a time
        self.window.set_busy(True)
        try:
            answer = await self.client.chat(self.chat.prompt_messages(), settings, self.chat.on_piece)
        except SpecdError as exc:
            self.chat.fail(str(exc))
            self._show_status()
            return
        finally:
            self.window.set_busy(False)
            self._answer_task = None
            self._retry_while_idle()
        self.chat.finish(answer)
        if answer.stats.rounds and answer.stats.network_ms:
            self.latency = "round trip " + milliseconds(answer.stats.network_ms / answer.stats.rounds)
        self._show_status()

    def stop(self) -> None:
        if self.client is not None:
            self.client.cancel()

    def new_chat(self) -> None:
        self.stop()
        self.chat.new_chat()
