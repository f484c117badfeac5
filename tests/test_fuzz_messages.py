"""Fuzzing the wire decoder: any frame decodes to a message or raises a typed ProtocolError, never more.

Example counts are small for CI; ``SPECD_FUZZ_EXAMPLES=5000`` runs thousands (tests/fuzz_strategies.py).
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from specd.shared import messages as m
from specd.shared.errors import ErrorCode, ProtocolError
from tests import fuzz_strategies as fz

CLIENT_TYPES = (m.Hello, m.Start, m.Draft, m.Stream, m.Cancel)
SERVER_TYPES = (m.Welcome, m.Started, m.Verdict, m.Discarded, m.Tokens, m.Cancelled, m.Error)


def _decode_or_error(decode, frame: bytes | str, max_bytes: int = 0) -> object | ProtocolError:
    """What the decoder did with ``frame``; anything but a message or a ProtocolError fails the test."""
    try:
        return decode(frame, max_bytes)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.code in (ErrorCode.BAD_FRAME, ErrorCode.BAD_MESSAGE, ErrorCode.FRAME_TOO_LARGE)
        assert exc.message and len(exc.message) < 2000, "error messages stay short enough to send back"
        return exc


@fz.fuzz_settings(400)
@given(fz.frames_from(fz.client_messages))
@example(fz.deep_nesting(100_000))
@example(b"\x82\xa1x" + fz.deep_nesting(100_000) + b"\xa4type\xa5hello")  # nesting skipped before the tag
@example(msgspec.msgpack.encode(msgspec.msgpack.Ext(5, b"abc")))
@example(b"\xd6\xff\x00\x00\x00\x00")  # a msgpack timestamp
@example(b"\x81\xa4type\xa5\x00\x00\x00\x00\x80")  # a string that is not UTF-8
@example(msgspec.msgpack.encode({"type": "cancel", "request": 1, "k" * 100_000: 1}))  # echoed field name
@example(msgspec.msgpack.encode({"type": "x" * 100_000}))
def test_decode_client_never_raises_anything_but_protocol_error(frame):
    result = _decode_or_error(m.decode_client, frame)
    if not isinstance(result, ProtocolError):
        assert isinstance(result, CLIENT_TYPES)
        assert m.decode_client(m.encode(result)) == result, "what decodes re-encodes identically"


@fz.fuzz_settings(300)
@given(fz.frames_from(fz.server_messages))
def test_decode_server_never_raises_anything_but_protocol_error(frame):
    result = _decode_or_error(m.decode_server, frame)
    if not isinstance(result, ProtocolError):
        assert isinstance(result, SERVER_TYPES)
        assert m.decode_server(m.encode(result)) == result


@fz.fuzz_settings(200)
@given(fz.client_messages)
def test_valid_client_messages_round_trip(msg):
    assert m.decode_client(m.encode(msg)) == msg


@fz.fuzz_settings(200)
@given(fz.server_messages)
def test_valid_server_messages_round_trip(msg):
    assert m.decode_server(m.encode(msg)) == msg


@fz.fuzz_settings(200)
@given(fz.client_messages.map(m.encode), st.integers(1, 400))
def test_frame_limit_is_enforced_before_decoding(frame, limit):
    result = _decode_or_error(m.decode_client, frame, limit)
    if len(frame) > limit:
        assert isinstance(result, ProtocolError) and result.code is ErrorCode.FRAME_TOO_LARGE
    else:
        assert not isinstance(result, ProtocolError)


@fz.fuzz_settings(200)
@given(fz.client_messages.map(m.encode).flatmap(fz.field_mutations))
def test_mutated_fields_never_pass_as_out_of_range_values(frame):
    """Whatever survives decoding respects the declared ranges (no NaN temperature, no negative ids)."""
    result = _decode_or_error(m.decode_client, frame)
    if isinstance(result, m.Start):
        s = result.sampling
        assert 0.0 <= s.temperature <= 100.0 and 0.0 < s.top_p <= 1.0 and s.top_k >= 0
        assert all(0 <= t < 2**31 for t in (*result.prompt, *result.stop)) and result.max_new_tokens >= 1
    elif isinstance(result, m.Draft):
        assert all(0 <= t < 2**31 for t in (*result.tokens, result.parent))
        assert min(result.request, result.round, result.position, result.support) >= 0


@pytest.mark.parametrize("field,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -0.5), ("temperature", 1e9),
    ("top_p", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2**64 - 1 + 0.5),
])
def test_non_finite_and_out_of_range_sampling_is_bad_message(field, value):
    frame = msgspec.msgpack.encode({"type": "start", "request": 0, "prompt": [1], "max_new_tokens": 1,
                                    "sampling": {field: value}})
    result = _decode_or_error(m.decode_client, frame)
    assert isinstance(result, ProtocolError) and result.code is ErrorCode.BAD_MESSAGE
