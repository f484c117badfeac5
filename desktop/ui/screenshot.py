"""``specd-desktop --screenshot PATH``: the chat window with a short sample conversation, as a PNG.

No network and no models: the sample answer is replayed as pieces with the provenance a real
speculative answer has (runs of drafted-and-accepted tokens ended by a verifier correction).
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication

from specd.desktop.ui.chat_view import stats_line
from specd.desktop.ui.chat_window import ChatWindow

SAMPLE_QUESTION = "How do I reverse a list in Python?"
# (text, source) pieces: what the draft proposed and the verifier kept, and the verifier's own tokens.
SAMPLE_ANSWER = [
    ("Use ", "draft"), ("slicing", "target"), (" or the built-in ", "draft"), ("`reversed()`", "draft"),
    (":\n\n", "target"), ("```python\nnumbers = [1, 2, 3]\n", "draft"), ("print(numbers[::-1])", "draft"),
    ("  # [3, 2, 1]\n", "target"), ("numbers.reverse()  # in place\n```\n\n", "draft"),
    ("Slicing returns a new list; ", "draft"), ("`list.reverse()`", "target"),
    (" changes the list itself and returns `None`.", "draft"),
]
SAMPLE_STATS = {"mode": "speculative", "tokens_per_second": 41.7, "acceptance_rate": 0.81, "gamma_mean": 4.6,
                "device": "cpu", "backend": "onnxruntime-genai"}


def fill_sample(window: ChatWindow) -> None:
    window.add_turn("user", SAMPLE_QUESTION)
    window.add_turn("assistant", pending=True)
    for text, source in SAMPLE_ANSWER:
        window.append_piece(text, source)
    window.finish_turn(stats_line(SAMPLE_STATS, "eos", 58))
    window.add_turn("user", "Thanks! And a tuple?")
    window.add_turn("assistant", pending=True)
    window.append_piece("Tuples cannot change, so slice them: ", "draft")
    window.append_piece("`t[::-1]`", "target")
    window.append_piece(".", "draft")
    window.finish_turn(stats_line({**SAMPLE_STATS, "tokens_per_second": 44.2, "acceptance_rate": 0.77,
                                   "gamma_mean": 4.1}, "eos", 14))
    window.set_status("Connected · verifier.example.com:8765 · CPU (onnxruntime-genai)", "round trip 38 ms")


def render_screenshot(path: Path, icon: QIcon | None = None, size: tuple[int, int] = (760, 620)) -> Path:
    """Render the sample chat window to ``path`` (needs a QApplication; offscreen is fine)."""
    app = QApplication.instance()
    if app is None:
        raise RuntimeError("render_screenshot needs a QApplication")
    window = ChatWindow(icon)
    window.resize(*size)
    fill_sample(window)
    window.show()
    for _ in range(5):  # let layouts and the document settle before grabbing
        app.processEvents()
    window.refresh(now=True)
    app.processEvents()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not window.grab().save(str(path), "PNG"):
        raise OSError(f"cannot write the screenshot to {path}")
    window.close()
    return path
