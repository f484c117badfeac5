"""``specd-desktop --screenshot PATH``: the chat window with a short sample conversation, as a PNG.

No network and no models: the sample answer is replayed as pieces with the provenance a real
speculative answer has (runs of drafted-and-accepted tokens ended by a verifier correction), the
sidebar lists a few sample conversations, and the answer's Markdown (code, lists) is rendered.
``--sample reconnecting`` shows the same window after the verifier went away: a last answer finished
on the draft model alone, and the status bar counting down to the next reconnect with the reason.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication

from specd.desktop.client.stats_line import stats_line
from specd.desktop.conversations import Conversation
from specd.desktop.ui.chat_session import sampling_words
from specd.desktop.ui.chat_window import ChatWindow
from specd.desktop.ui.idle_reconnect import RetryState
from specd.desktop.ui.status_line import AppStatus

SAMPLE_QUESTION = "How do I reverse a list in Python?"
# (text, source) pieces: what the draft proposed and the verifier kept, and the verifier's own tokens.
SAMPLE_ANSWER = [
    ("Use ", "draft"), ("**slicing**", "target"), (" or the built-in ", "draft"), ("`reversed()`", "draft"),
    (":\n\n", "target"), ("```python\nnumbers = [1, 2, 3]\n", "draft"), ("print(numbers[::-1])", "draft"),
    ("  # [3, 2, 1]\n", "target"), ("numbers.reverse()  # in place\n```\n\n", "draft"),
    ("- Slicing returns a *new* list.\n", "draft"), ("- `list.reverse()`", "target"),
    (" changes the list itself and returns `None`.", "draft"),
]
SAMPLE_TITLES = ["How do I reverse a list in Python?", "Summarise the meeting notes in three bullets",
                 "Explain speculative decoding simply", "SQL: top five customers by revenue",
                 "A regular expression for ISO dates"]
SAMPLE_SYSTEM_PROMPT = "You are a concise Python tutor."
SAMPLE_SAMPLING = {"temperature": 0.7, "top_p": 0.95, "top_k": 0, "max_new_tokens": 256, "seed": -1}
SAMPLE_STATS = {"mode": "speculative", "rounds": 13, "tokens_per_second": 41.7, "acceptance_rate": 0.81,
                "gamma_mean": 4.6, "tokens_per_forward": 4.46, "device": "cpu", "backend": "onnxruntime-genai",
                "draft_precision": "int8"}


def fill_sample(window: ChatWindow) -> None:
    window.sidebar.show_conversations([Conversation(id=i + 1, title=title) for i, title in enumerate(SAMPLE_TITLES)])
    window.sidebar.select(1)
    window.show_conversation([], system_prompt=SAMPLE_SYSTEM_PROMPT, sampling=sampling_words(SAMPLE_SAMPLING))
    window.add_turn("user", SAMPLE_QUESTION)
    window.add_turn("assistant", pending=True)
    for text, source in SAMPLE_ANSWER:
        window.append_piece(text, source)
    window.finish_turn(stats_line({**SAMPLE_STATS, "generated": 58}, "eos"))
    window.add_turn("user", "Thanks! And a tuple?")
    window.add_turn("assistant", pending=True)
    window.append_piece("Tuples cannot change, so slice them: ", "draft")
    window.append_piece("`t[::-1]`", "target")
    window.append_piece(".", "draft")
    window.finish_turn(stats_line({**SAMPLE_STATS, "tokens_per_second": 44.2, "acceptance_rate": 0.77,
                                   "gamma_mean": 4.1, "tokens_per_forward": 3.5, "generated": 14}, "eos"))
    window.set_status("Connected · verifier.example.com:8765 · CPU (onnxruntime-genai)", "round trip 38 ms")


SAMPLE_SERVER = "verifier.example.com:8765"
SAMPLES = ("answered", "reconnecting")


def fill_reconnecting(window: ChatWindow) -> None:
    fill_sample(window)
    window.add_turn("user", "And a string?")
    window.add_turn("assistant", pending=True)
    window.append_piece("Strings slice the same way: ", "draft")
    window.append_piece("`s[::-1]`", "target")
    window.append_piece(" returns a new, reversed string.", "local")
    window.finish_turn(stats_line({**SAMPLE_STATS, "mode": "local", "tokens_per_second": 23.5, "rounds": 2,
                                   "acceptance_rate": 0.8, "gamma_mean": 5.0, "tokens_per_forward": 5.5,
                                   "local_tokens": 8, "generated": 19},
                                  "eos"))
    reason = f"cannot reach the verifier at {SAMPLE_SERVER}: connection refused (is specd-verifier running?)"
    status = AppStatus(state="local", endpoint=SAMPLE_SERVER, url=f"wss://{SAMPLE_SERVER}",
                       device="CPU (onnxruntime-genai)", reason=reason, retry=RetryState("waiting", 4, reason))
    window.set_status(status.line(), status.shown_latency(), status.detail())


def render_screenshot(path: Path, icon: QIcon | None = None, size: tuple[int, int] = (1000, 680),
                      sample: str = "answered") -> Path:
    """Render a sample chat window to ``path`` (needs a QApplication; offscreen is fine)."""
    app = QApplication.instance()
    if app is None:
        raise RuntimeError("render_screenshot needs a QApplication")
    window = ChatWindow(icon)
    window.resize(*size)
    (fill_reconnecting if sample == "reconnecting" else fill_sample)(window)
    window.show()
    for _ in range(5):  # let layouts and the document settle before grabbing
        app.processEvents()
    window.refresh(now=True)
    app.processEvents()
    window.view.verticalScrollBar().setValue(window.view.verticalScrollBar().maximum())  # the last answer
    app.processEvents()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not window.grab().save(str(path), "PNG"):
        raise OSError(f"cannot write the screenshot to {path}")
    window.close()
    return path
