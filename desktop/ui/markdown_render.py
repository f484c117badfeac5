"""Markdown answers as HTML for Qt's rich text, with code highlighted and provenance tints kept.

markdown-it-py (CommonMark, plus tables and strikethrough) parses; our rules write the HTML subset
``QTextDocument`` understands. Every run of text the reader sees is located in the source text, so the
tint of the tokens that produced it (drafted, from the verifier, local) survives rendering — in prose,
inline code and Pygments-highlighted code blocks alike. Markup characters themselves are not shown, so
their provenance does not matter. No Qt here.

While an answer streams, :class:`IncrementalMarkdown` re-renders only its last two top-level blocks:
the ones before are final (later text cannot change a finished block, short of link reference
definitions, which answers do not use), so the cost of a piece stays flat however long the answer gets.
"""

from __future__ import annotations

import bisect
import html
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token
from pygments.lexer import Lexer
from pygments.lexers import TextLexer, get_lexer_by_name
from pygments.styles import get_style_by_name
from pygments.util import ClassNotFound

Runs = list[tuple[int, int, str]]  # (start, end, source) over the answer's text, in order
SOURCE_TINT = {"draft": "#dcf2dc", "target": "#fde3c0", "local": "#dbe7fb", "cloud": ""}
CODE_BG, CODE_STYLE = "#f6f8fa", "default"
COPY_CODE = "specd:copy-code/"  # link scheme of a code block's Copy button: specd:copy-code/<index>
FROZEN_TAIL_BLOCKS = 2  # top-level blocks that stay open to change while streaming


@dataclass(slots=True)
class Rendered:
    html: str
    code_blocks: list[str] = field(default_factory=list)  # each fenced block's code, for its Copy button


class _Tint:
    """Where each shown run of text sits in the source, and the provenance tint over it."""

    def __init__(self, text: str, runs: Runs, base: int = 0) -> None:
        self.text, self.runs, self.base = text, runs, base  # ``text`` starts at ``base`` in the answer
        self.starts = [start for start, _end, _source in runs]
        self.line_starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
        self.cursor = 0
        self.block_end = len(text)

    def sync(self, line_map: list[int]) -> None:
        """A block begins: what it shows lies within its lines (a lost match cannot drift further)."""
        first, last = line_map
        start = self.line_starts[min(first, len(self.line_starts) - 1)]
        self.cursor = max(self.cursor, start)
        self.block_end = self.line_starts[last] if last < len(self.line_starts) else len(self.text)

    def locate(self, shown: str) -> int | None:
        """Where ``shown`` starts at or after the cursor in this block; None if it is not verbatim there."""
        if not shown:
            return None
        where = self.text.find(shown, self.cursor, self.block_end)
        if where < 0:
            return None
        self.cursor = where + len(shown)
        return where

    def spans(self, shown: str, at: int | None, style: str = "") -> str:
        """``shown`` escaped, cut at provenance boundaries into tinted spans (plus ``style`` on each)."""
        if at is None or not self.runs:
            return _span(html.escape(shown, quote=False), style)
        out, position, end = [], at + self.base, at + self.base + len(shown)
        index = max(bisect.bisect_right(self.starts, position) - 1, 0)
        while position < end:
            run_start, run_end, source = self.runs[index] if index < len(self.runs) else (end, end, "")
            if run_end <= position:  # a run that ends before here (runs may leave gaps)
                index += 1
                continue
            if run_start > position:  # a stretch no run covers
                stop, tint = min(run_start, end), ""
            else:
                stop, tint = min(run_end, end), SOURCE_TINT.get(source, "")
                index += 1
            piece = html.escape(shown[position - at - self.base:stop - at - self.base], quote=False)
            css = ";".join(p for p in (f"background:{tint}" if tint else "", style) if p)
            out.append(_span(piece, css))
            position = stop
        return "".join(out)


def _span(escaped: str, css: str) -> str:
    return f'<span style="{css}">{escaped}</span>' if css and escaped else escaped


class _QtRenderer(RendererHTML):
    """markdown-it's HTML renderer with rules for what Qt shows and where each text came from."""

    def render(self, tokens: list[Token], options: Any, env: dict) -> str:
        tint: _Tint = env["tint"]
        out = []
        for i, token in enumerate(tokens):
            if token.map and token.type not in ("inline",):
                tint.sync(token.map)
            if token.type == "inline":
                out.append(self.renderInline(token.children or [], options, env))
            elif token.type in self.rules:
                out.append(self.rules[token.type](tokens, i, options, env))
            else:
                out.append(self.renderToken(tokens, i, options, env))
        return "".join(out)

    def text(self, tokens: list[Token], idx: int, _options: Any, env: dict) -> str:
        shown = tokens[idx].content
        return env["tint"].spans(shown, env["tint"].locate(shown))

    def code_inline(self, tokens: list[Token], idx: int, _options: Any, env: dict) -> str:
        shown = tokens[idx].content
        inner = env["tint"].spans(shown, env["tint"].locate(shown))
        return f'<code style="background:{CODE_BG};">{inner}</code>'

    def fence(self, tokens: list[Token], idx: int, _options: Any, env: dict) -> str:
        token = tokens[idx]
        language = token.info.strip().split(" ")[0] if token.info else ""
        return _code_block(token.content, language, env)

    def code_block(self, tokens: list[Token], idx: int, _options: Any, env: dict) -> str:
        return _code_block(tokens[idx].content, "", env)

    def table_open(self, _tokens: list[Token], _idx: int, _options: Any, _env: dict) -> str:
        return '<table border="1" cellspacing="0" cellpadding="4" style="border-color:#ccc; margin:4px 0;">\n'

    def image(self, tokens: list[Token], idx: int, _options: Any, env: dict) -> str:
        token = tokens[idx]  # no remote images in the window: the alt text as a link
        alt = "".join(child.content for child in token.children or []) or token.attrGet("src") or "image"
        return f'<a href="{html.escape(str(token.attrGet("src") or ""))}">{html.escape(alt, quote=False)}</a>'


def _code_block(code: str, language: str, env: dict) -> str:
    tint: _Tint = env["tint"]
    codes: list[str] = env["codes"]
    code = code[:-1] if code.endswith("\n") else code
    index = env["code_base"] + len(codes)
    codes.append(code)
    at = tint.locate(code) if code else None
    out, offset = [], 0
    for kind, value in _lexer(language).get_tokens(code):
        style = _token_css(kind)
        out.append(tint.spans(value, None if at is None else at + offset, style))
        offset += len(value)
    label = html.escape(language or "code", quote=False)
    head = (f'<p style="margin:6px 0 0 0; font-size:8pt; color:#777;">{label} &nbsp;'
            f'<a href="{COPY_CODE}{index}">Copy</a></p>')
    return (f'{head}<pre style="background:{CODE_BG}; font-family:monospace; margin:0 0 6px 0;">'
            f'{"".join(out)}</pre>\n')


@lru_cache(maxsize=64)
def _lexer(language: str) -> Lexer:
    try:
        return get_lexer_by_name(language, stripnl=False, ensurenl=False) if language else TextLexer()
    except ClassNotFound:
        return TextLexer(stripnl=False, ensurenl=False)


@lru_cache(maxsize=512)
def _token_css(kind: Any) -> str:
    style = get_style_by_name(CODE_STYLE).style_for_token(kind)
    parts = [f"color:#{style['color']}"] if style["color"] else []
    if style["bold"]:
        parts.append("font-weight:bold")
    if style["italic"]:
        parts.append("font-style:italic")
    return ";".join(parts)


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"breaks": True, "html": False}, renderer_cls=_QtRenderer)
    return md.enable(["table", "strikethrough"])


MARKDOWN = _markdown()


def render_markdown(text: str, runs: Runs | None = None, *, base: int = 0, code_base: int = 0) -> Rendered:
    """``text`` (which starts at ``base`` in the answer ``runs`` describe) as Qt rich-text HTML."""
    env = {"tint": _Tint(text, runs or [], base), "codes": [], "code_base": code_base}
    body = MARKDOWN.renderer.render(MARKDOWN.parse(text, env), MARKDOWN.options, env)
    return Rendered(body.strip(), env["codes"])


class IncrementalMarkdown:
    """One streaming answer: :meth:`update` with the whole text so far returns the HTML of the part that
    became final since the last call and the HTML of the still-open tail (its last top-level blocks)."""

    def __init__(self) -> None:
        self.frozen_chars = 0  # where the open tail starts in the text
        self.frozen_html: list[str] = []
        self.code_blocks: list[str] = []  # of the frozen part

    def update(self, text: str, runs: Runs) -> tuple[str, Rendered]:
        """(newly frozen HTML, the tail rendered). Frozen HTML never changes once returned."""
        tail = text[self.frozen_chars:]
        starts = _top_level_starts(tail)
        newly = ""
        if len(starts) > FROZEN_TAIL_BLOCKS:
            cut_line = starts[-FROZEN_TAIL_BLOCKS]
            cut = _line_offset(tail, cut_line)
            done = render_markdown(tail[:cut], runs, base=self.frozen_chars, code_base=len(self.code_blocks))
            newly = done.html
            self.frozen_html.append(newly)
            self.code_blocks += done.code_blocks
            self.frozen_chars += cut
            tail = tail[cut:]
        rendered = render_markdown(tail, runs, base=self.frozen_chars, code_base=len(self.code_blocks))
        return newly, rendered

    def whole(self, text: str, runs: Runs) -> Rendered:
        _newly, tail = self.update(text, runs)
        return Rendered("".join(self.frozen_html) + tail.html, self.code_blocks + tail.code_blocks)


def _top_level_starts(text: str) -> list[int]:
    """The first line of each top-level block of ``text``."""
    return [t.map[0] for t in MARKDOWN.parse(text) if t.level == 0 and t.nesting >= 0 and t.map]


def _line_offset(text: str, line: int) -> int:
    position = 0
    for _ in range(line):
        position = text.index("\n", position) + 1
    return position
