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

    text_special = text  # an escaped character (markdown-it's text_join pass is not run on streamed blocks)

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
# The same parser without the inline pass: streaming parses the open tail's blocks, then runs the inline
# pass only for the blocks it renders (the inline pass is most of markdown-it's time).
BLOCKS = _markdown().disable("inline")


def _parse_inline(tokens: list[Token], env: dict) -> None:
    for token in tokens:
        if token.type == "inline" and not token.children:
            token.children = []
            MARKDOWN.inline.parse(token.content, MARKDOWN, env, token.children)


def render_markdown(text: str, runs: Runs | None = None, *, base: int = 0, code_base: int = 0) -> Rendered:
    """``text`` (which starts at ``base`` in the answer ``runs`` describe) as Qt rich-text HTML."""
    env = {"tint": _Tint(text, runs or [], base), "codes": [], "code_base": code_base}
    body = MARKDOWN.renderer.render(MARKDOWN.parse(text, env), MARKDOWN.options, env)
    return Rendered(body.strip(), env["codes"])


class IncrementalMarkdown:
    """One streaming answer: :meth:`update` with the whole text so far returns the HTML of the part that
    became final since the last call and the HTML of the still-open tail (its last top-level blocks).

    Each update parses the open tail once; of its blocks only the last is rendered afresh (the one
    before it is reused while its text is unchanged), so a piece costs about one block's work."""

    def __init__(self) -> None:
        self.frozen_chars = 0  # where the open tail starts in the text
        self.frozen_html: list[str] = []
        self.code_blocks: list[str] = []  # of the frozen part
        self._cache: dict[tuple[int, str, int], Rendered] = {}

    def update(self, text: str, runs: Runs) -> tuple[str, Rendered]:
        """(newly frozen HTML, the tail rendered). Frozen HTML never changes once returned."""
        tail = text[self.frozen_chars:]
        env = {"tint": _Tint(tail, runs, self.frozen_chars), "codes": [], "code_base": len(self.code_blocks)}
        tokens = BLOCKS.parse(tail, env)
        groups = _top_level_groups(tokens)
        line_starts = env["tint"].line_starts
        newly = ""
        if len(groups) > FROZEN_TAIL_BLOCKS:
            done = [self._render(tokens[a:b], tail, line_starts, first, env) for a, b, first in
                    groups[:-FROZEN_TAIL_BLOCKS]]
            newly = "\n".join(part.html for part in done)
            self.frozen_html.append(newly)
            self.code_blocks += [code for part in done for code in part.code_blocks]
            cut = line_starts[groups[-FROZEN_TAIL_BLOCKS][2]]
            self.frozen_chars += cut
            self._cache.clear()
            groups = groups[-FROZEN_TAIL_BLOCKS:]
        open_parts = [self._render(tokens[a:b], tail, line_starts, first, env, cache=i < len(groups) - 1)
                      for i, (a, b, first) in enumerate(groups)]
        return newly, Rendered("\n".join(p.html for p in open_parts if p.html),
                               [code for part in open_parts for code in part.code_blocks])

    def _render(self, tokens: list[Token], tail: str, line_starts: list[int], first_line: int, env: dict,
                *, cache: bool = False) -> Rendered:
        """One top-level block; ``cache``: reuse it while its source text is unchanged."""
        start = line_starts[first_line]
        end_line = tokens[0].map[1] if tokens[0].map else first_line + 1
        end = line_starts[end_line] if end_line < len(line_starts) else len(tail)
        key = (env["tint"].base + start, tail[start:end], env["code_base"] + len(env["codes"]))
        if cache and key in self._cache:
            hit = self._cache[key]
            env["codes"] += hit.code_blocks
            return hit
        before = len(env["codes"])
        _parse_inline(tokens, env)
        html_text = MARKDOWN.renderer.render(tokens, MARKDOWN.options, env).strip()
        rendered = Rendered(html_text, env["codes"][before:])
        self._cache[key] = rendered
        return rendered

    def whole(self, text: str, runs: Runs) -> Rendered:
        _newly, tail = self.update(text, runs)
        return Rendered("\n".join([*self.frozen_html, tail.html]), self.code_blocks + tail.code_blocks)


def _top_level_groups(tokens: list[Token]) -> list[tuple[int, int, int]]:
    """(first token, end token, first line) of each top-level block."""
    groups, start, depth = [], 0, 0
    for i, token in enumerate(tokens):
        if token.level == 0 and token.nesting >= 0 and depth == 0:
            start = i
        depth += token.nesting
        if token.level == 0 and depth == 0:
            groups.append((start, i + 1, tokens[start].map[0] if tokens[start].map else 0))
    return groups
