"""docs/protocol.md must describe exactly what the code speaks."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import msgspec
import pytest

from specd.shared import messages as m
from specd.shared.errors import ErrorCode

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text(encoding="utf-8")
MESSAGES = [*typing.get_args(m.ClientMessage), *typing.get_args(m.ServerMessage)]


@pytest.mark.parametrize("struct", MESSAGES, ids=lambda s: s.__struct_config__.tag)
def test_every_message_and_field_is_documented(struct):
    tag = struct.__struct_config__.tag
    assert f"**`{tag}`**" in DOC, f"message {tag!r} is not described in docs/protocol.md"
    section = DOC[DOC.index(f"**`{tag}`**"):]
    section = section[: section.find("\n**`", 5) if "\n**`" in section[5:] else len(section)]
    for name in struct.__struct_fields__:
        assert f"`{name}`" in section, f"field {name!r} of {tag!r} is not documented"


def test_every_documented_message_exists():
    documented = set(re.findall(r"^\*\*`(\w+)`\*\*", DOC, flags=re.MULTILINE))
    assert documented == {s.__struct_config__.tag for s in MESSAGES}


def test_error_codes_match_the_table():
    table = set(re.findall(r"^\| `(\w+)` \|", DOC[DOC.index("## 7. Error codes"):], flags=re.MULTILINE))
    assert table == {code.value for code in ErrorCode}


def test_limits_and_sampling_fields_are_documented():
    for struct in (m.Limits, m.Sampling):
        for name in struct.__struct_fields__:
            assert f"`{name}`" in DOC


def test_protocol_version_is_the_documented_one():
    assert f"version {m.PROTOCOL_VERSION}" in DOC.splitlines()[0]
    assert msgspec.msgpack.decode(m.encode(m.Hello(protocol=m.PROTOCOL_VERSION, tokenizer="x")))["protocol"] == 1
