"""docs/protocol.md must describe exactly what the code speaks."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import msgspec
import pytest

from specd.shared import messages as m
from specd.shared import sampling
from specd.shared.errors import ERROR_RULES, ErrorCode
from specd.shared.fingerprint import vocab_fingerprint

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


def _error_table() -> dict[str, list[str]]:
    section = DOC[DOC.index("## 7. Error codes"):DOC.index("## 8. State machines")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def test_the_error_table_states_what_the_code_does():
    """Fatality, close code and whether the request ends, for every code, from the table the code uses."""
    rows = _error_table()
    assert set(rows) == {code.value for code in ErrorCode}
    for code, rule in ERROR_RULES.items():
        _code, _when, fatal, close, ends = rows[code.value]
        assert fatal == rule.fatal, code
        assert ends == ("yes" if rule.ends_request else "no"), code
        assert close == ("—" if rule.fatal == "no" else str(int(rule.close))), code


def _code_blocks_after(heading: str) -> list[str]:
    text = DOC[DOC.index(heading):]
    return re.findall(r"```(?:json)?\n(.*?)\n```", text, flags=re.DOTALL)


def test_the_fingerprint_test_vector_on_the_page_is_right():
    vocab_json, serialised, fingerprint = _code_blocks_after("Test vector")[:3]
    vocab = json.loads(vocab_json)
    canonical = json.dumps(sorted(vocab.items(), key=lambda item: (item[1], item[0])), ensure_ascii=False,
                           separators=(",", ":"))
    assert canonical == serialised.strip()
    assert f"the {len(canonical.encode('utf-8'))} bytes" in DOC
    assert vocab_fingerprint(vocab) == fingerprint.strip()
    assert fingerprint.strip() == fingerprint.strip().lower()


def test_the_documented_seed_derivation_is_the_one_the_code_uses():
    block = next(b for b in _code_blocks_after("## 5. Randomness") if "splitmix64" in b)
    c1, c2, c3, c4 = (int(h, 16) for h in re.findall(r"0x[0-9A-F]{16}", block))
    mask = (1 << 64) - 1

    def splitmix64(x: int) -> int:
        z1 = (x + c1) & mask
        z2 = ((z1 ^ (z1 >> 30)) * c2) & mask
        z3 = ((z2 ^ (z2 >> 27)) * c3) & mask
        return z3 ^ (z3 >> 31)

    streams = {name: int(value) for name, value in re.findall(r"`(\w+_STREAM) = (\d)`", DOC)}
    assert streams == {"DRAFT_STREAM": sampling.DRAFT_STREAM, "VERIFY_STREAM": sampling.VERIFY_STREAM,
                       "CLOUD_STREAM": sampling.CLOUD_STREAM, "LOCAL_STREAM": sampling.LOCAL_STREAM}
    for seed, position, stream in [(0, 0, 1), (7, 3, 2), (2**40 + 5, 1234, 3), (2**63, 9, 4)]:
        key = splitmix64(splitmix64(seed) ^ ((position * c4) & mask) ^ stream) & ((1 << 63) - 1)
        assert sampling.position_generator(seed, position, stream).initial_seed() == key
