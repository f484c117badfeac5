"""Wire messages: every type round-trips, and bad frames map to stable error codes."""

from __future__ import annotations

import msgspec
import pytest

from specd.shared import messages as m
from specd.shared.errors import ProtocolError

LIMITS = m.Limits(max_input_tokens=1, max_total_tokens=2, max_draft=3, max_support=4, max_frame_bytes=5)

CLIENT = [
    m.Hello(protocol=1, tokenizer="sha256:x", client="specd 0.1", draft_model="d"),
    m.Start(request=3, prompt=[1, 2], max_new_tokens=9, sampling=m.Sampling(temperature=0.5, top_k=3, top_p=0.9),
            seed=42, stop=[7], mode="cloud"),
    m.Draft(request=3, round=1, position=2, parent=2, tokens=[5, 6], support=1, q_ids=b"\0" * 8, q_probs=b"\1" * 8),
    m.Cancel(request=3),
]
SERVER = [
    m.Welcome(protocol=1, session="abc", model="t", tokenizer="sha256:x", vocab_size=10, eos=[2], limits=LIMITS),
    m.Started(request=3, prompt_tokens=2, cached_tokens=1),
    m.Verdict(request=3, round=1, position=2, accepted=1, token=4, finished=True, reason="eos", queue_ms=1.5),
    m.Discarded(request=3, round=2, position=9),
    m.Tokens(request=3, position=2, tokens=[4, 5], finished=False),
    m.Cancelled(request=3, position=4),
    m.Error(code="bad_frame", message="no", request=None, fatal=True),
]


@pytest.mark.parametrize("msg", CLIENT)
def test_client_messages_round_trip(msg):
    assert m.decode_client(m.encode(msg)) == msg


@pytest.mark.parametrize("msg", SERVER)
def test_server_messages_round_trip(msg):
    assert m.decode_server(m.encode(msg)) == msg


def test_frames_are_msgpack_maps_with_a_type_tag():
    raw = msgspec.msgpack.decode(m.encode(m.Cancel(request=1)))
    assert raw == {"type": "cancel", "request": 1}


def test_defaults_let_a_minimal_client_omit_fields():
    frame = msgspec.msgpack.encode({"type": "start", "request": 0, "prompt": [1], "max_new_tokens": 4})
    start = m.decode_client(frame)
    assert start.mode == "speculative" and start.sampling == m.Sampling() and start.seed is None


@pytest.mark.parametrize("frame,code", [
    ("a text frame", "bad_frame"),
    (b"", "bad_frame"),
    (b"\xc1", "bad_frame"),
    (msgspec.msgpack.encode([1, 2]), "bad_frame"),
    (msgspec.msgpack.encode({"type": "verdict", "request": 0}), "bad_frame"),  # a server message
    (msgspec.msgpack.encode({"type": "hello"}), "bad_message"),
    (msgspec.msgpack.encode({"type": "cancel", "request": -1}), "bad_message"),
    (msgspec.msgpack.encode({"type": "cancel", "request": 1, "extra": 0}), "bad_message"),
    (msgspec.msgpack.encode({"type": "start", "request": 0, "prompt": [1], "max_new_tokens": 0}), "bad_message"),
    (msgspec.msgpack.encode({"type": "start", "request": 0, "prompt": [[1]], "max_new_tokens": 1}), "bad_message"),
    (msgspec.msgpack.encode({"type": "start", "request": 0, "prompt": [1], "max_new_tokens": 1,
                             "sampling": {"temperature": float("nan")}}), "bad_message"),
    (b"\x91" * 50_000 + b"\x01", "bad_frame"),
])
def test_bad_frames_raise_protocol_errors_with_codes(frame, code):
    with pytest.raises(ProtocolError) as err:
        m.decode_client(frame)
    assert err.value.code.value == code


def test_frame_size_limit():
    frame = m.encode(m.Start(request=0, prompt=[1] * 100, max_new_tokens=1))
    with pytest.raises(ProtocolError) as err:
        m.decode_client(frame, max_bytes=50)
    assert err.value.code.value == "frame_too_large"
    assert m.decode_client(frame, max_bytes=len(frame)).prompt == [1] * 100
