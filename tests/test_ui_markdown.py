"""Markdown answers: every element renders, code is highlighted, provenance tints survive rendering
(in prose, inline code, tables, headings and highlighted code), and an answer rendered piece by piece
while streaming ends up exactly as the same answer rendered at once."""

from __future__ import annotations

import pytest
from PySide6.QtGui import QTextCursor

from specd.desktop.ui.chat_view import Turn
from specd.desktop.ui.markdown_render import SOURCE_TINT, IncrementalMarkdown, render_markdown
from specd.desktop.ui.message_view import ConversationView

EVERY_ELEMENT = """# A heading

## A second level

Some **bold**, *emphasis*, ~~struck~~, `inline code` and a [link](https://example.org/docs).

- a bullet
- another bullet

1. first
2. second

| Name | Value |
|------|------:|
| pi   | 3.14  |

```python
def greet(name):
    return f"hello {name}"
```

> quoted text

An escaped \\*star\\* &amp; an entity.
"""


def test_every_element_renders_as_qt_rich_text():
    rendered = render_markdown(EVERY_ELEMENT)
    page = rendered.html
    for tag in ("<h1>", "<h2>", "<strong>", "<em>", "<s>", "<code", '<a href="https://example.org/docs">', "<ul>",
                "<li>", "<ol>", '<table border="1"', "<th>", '<td style="text-align:right">', "<pre", "<blockquote>"):
        assert tag in page, tag
    assert rendered.code_blocks == ['def greet(name):\n    return f"hello {name}"']
    assert 'href="specd:copy-code/0">Copy</a>' in page  # every code block has its Copy button
    # Pygments: the keyword and the function name are coloured by the default style.
    assert '<span style="color:#008000;font-weight:bold">def</span>' in page
    assert '<span style="color:#0000FF">greet</span>' in page
    assert "**" not in page and "```" not in page  # markup is rendered, not shown


def test_markdown_in_the_window_shows_text_not_markup(qtbot):
    view = ConversationView()
    qtbot.addWidget(view)
    answer = Turn("assistant")
    answer.append(EVERY_ELEMENT, "draft")
    view.show_turns([Turn("user", "show me everything"), answer], highlight=True)
    text = view.toPlainText()
    for shown in ("A heading", "Some bold, emphasis, struck, inline code and a link.", "a bullet", "pi", "3.14",
                  'return f"hello {name}"', "quoted text", "An escaped *star* & an entity."):
        assert shown in text, shown
    assert "**" not in text and "```" not in text and "|---" not in text


def test_copy_buttons_copy_the_code_and_the_answer(qtbot):
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QGuiApplication

    view = ConversationView()
    qtbot.addWidget(view)
    answer = Turn("assistant")
    answer.append(EVERY_ELEMENT, "draft")
    view.show_turns([Turn("user", "show me everything"), answer], highlight=True)
    actions = []
    view.action.connect(lambda kind, index: actions.append((kind, index)))
    view.anchorClicked.emit(QUrl("specd:copy-code/0"))
    assert QGuiApplication.clipboard().text() == 'def greet(name):\n    return f"hello {name}"'
    view.anchorClicked.emit(QUrl("specd:copy/1"))
    view.anchorClicked.emit(QUrl("specd:regenerate/1"))
    view.anchorClicked.emit(QUrl("specd:edit/0"))
    assert actions == [("copy", 1), ("regenerate", 1), ("edit", 0)]
    html = view.toHtml()
    assert "specd:copy/1" in html and "specd:regenerate/1" in html and "specd:edit/0" in html


def sample_answer() -> Turn:
    turn = Turn("assistant")
    for text, source in [("# Rev", "draft"), ("ersing\n\nUse ", "target"), ("**slicing**", "draft"),
                         (" or `reversed()`:\n\n| a | b |\n|---|---|\n| ", "target"), ("one", "local"),
                         (" | two |\n\n```python\nnums = [1, 2]\n", "draft"), ("print(nums[::-1])\n```\n", "target"),
                         ("\nDone.", "draft")]:
        turn.append(text, source)
    return turn


def tint_of(view: ConversationView, needle: str) -> str:
    """The background colour Qt shows behind the first character of ``needle``."""
    found = view.document().find(needle)
    assert not found.isNull(), needle
    cursor = QTextCursor(view.document())
    cursor.setPosition(found.selectionStart() + 1)  # the format of the character before the position
    background = cursor.charFormat().background()
    return background.color().name() if background.style().value else ""


def test_provenance_tints_survive_rendering(qtbot):
    view = ConversationView()
    qtbot.addWidget(view)
    view.show_turns([Turn("user", "how?"), sample_answer()], highlight=True)
    draft, target, local = SOURCE_TINT["draft"], SOURCE_TINT["target"], SOURCE_TINT["local"]
    assert tint_of(view, "Rev") == draft and tint_of(view, "ersing") == target  # in a heading
    assert tint_of(view, "slicing") == draft  # in bold
    assert tint_of(view, "reversed()") == target  # in inline code
    assert tint_of(view, "one") == local  # in a table cell
    assert tint_of(view, "nums = ") == draft and tint_of(view, "print(") == target  # in highlighted code
    assert tint_of(view, "Done") == draft
    view.show_turns([Turn("user", "how?"), sample_answer()], highlight=False)
    assert tint_of(view, "slicing") == "" and tint_of(view, "print(") in ("", "#f6f8fa")


def every_element_answer() -> Turn:
    turn = Turn("assistant")
    for i in range(0, len(EVERY_ELEMENT), 5):
        turn.append(EVERY_ELEMENT[i:i + 5], ("draft", "target", "local")[i % 3])
    return turn


@pytest.mark.parametrize("make", [sample_answer, every_element_answer])
def test_an_answer_streamed_piece_by_piece_ends_as_rendered_at_once(qtbot, make):
    whole = make()
    view = ConversationView()
    qtbot.addWidget(view)
    streaming = Turn("assistant", pending=True)
    turns = [Turn("user", "how?"), streaming]
    view.show_turns(turns, highlight=True)
    for start, end, source in whole.sources:  # one character at a time: every cut an answer can have
        for i in range(start, end):
            streaming.append(whole.text[i], source)
            view.update_stream(streaming, highlight=True)
    streaming.pending = False
    view.finish_stream(turns, highlight=True)
    live_text, live_code = view.toPlainText(), list(view.code_blocks)
    needles = [w for w in ("Rev", "slicing", "one", "print(", "pi", "greet", "quoted", "bullet") if w in whole.text]
    live_tints = [tint_of(view, n) for n in needles]
    view.show_turns([Turn("user", "how?"), whole], highlight=True)  # reopened later
    assert live_text == view.toPlainText()
    assert live_code == view.code_blocks == render_markdown(whole.text).code_blocks
    assert live_tints == [tint_of(view, n) for n in needles]


def test_only_the_open_tail_is_rendered_again():
    answer = "".join(f"Paragraph {i} with some words.\n\n" for i in range(30))
    stream = IncrementalMarkdown()
    tails = []
    for cut in range(0, len(answer), 7):
        _newly, tail = stream.update(answer[:cut], [])
        tails.append(len(tail.html))
    assert stream.frozen_chars > len(answer) * 0.8  # nearly all of it is final by the end
    assert max(tails) < 200  # the part rendered again stays small however long the answer gets
