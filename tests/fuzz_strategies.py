"""Hypothesis strategies for fuzzing the wire protocol: valid messages, and ways to break them.

``SPECD_FUZZ_EXAMPLES`` (an integer) raises every fuzz test's example count, e.g.
``SPECD_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_fuzz_messages.py tests/test_fuzz_session.py``.
Unset, the counts are sized so the fuzz tests together stay well under a minute in CI, and with
``CI=true`` the examples are derandomised (tests/conftest.py: the same examples on every run); set, they
are random — `make reliability` runs them so.
"""

from __future__ import annotations

import math
import os
import struct

import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from specd.shared import messages as m

VOCAB = 64
MAX_U64 = 2**64 - 1
MIN_I64 = -(2**63)


def fuzz_settings(ci_examples: int) -> settings:
    """``ci_examples`` by default; ``$SPECD_FUZZ_EXAMPLES`` when set (run thousands locally)."""
    examples = int(os.environ.get("SPECD_FUZZ_EXAMPLES", "0") or 0) or ci_examples
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


FIELD_NAMES = ["type", "protocol", "tokenizer", "client", "draft_model", "request", "prompt", "max_new_tokens",
               "sampling", "seed", "stop", "mode", "round", "position", "parent", "tokens", "support", "q_ids",
               "q_probs", "temperature", "top_k", "top_p", "session", "model", "vocab_size", "eos", "limits",
               "accepted", "token", "finished", "reason", "queue_ms", "forward_ms", "cached_tokens",
               "prompt_tokens", "code", "message", "fatal"]
TYPE_NAMES = ["hello", "start", "draft", "cancel", "welcome", "started", "verdict", "discarded", "tokens",
              "cancelled", "error", "", "HELLO", "start ", "drafts"]


# --- arbitrary msgpack values -----------------------------------------------------------------

nasty_ints = st.one_of(
    st.integers(min_value=-3, max_value=VOCAB + 3),
    st.sampled_from([MIN_I64, -1, 0, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, MAX_U64]),
    st.integers(min_value=MIN_I64, max_value=MAX_U64),
)
nasty_floats = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, -1.0, 1e-45, 1.0000001, 1e38, 3.5e38, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), nasty_ints, nasty_floats, st.text(max_size=20),
                    st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5),
    st.dictionaries(st.one_of(st.text(max_size=10), st.sampled_from(FIELD_NAMES)), inner, max_size=5),
), max_leaves=20)




# --- valid messages ---------------------------------------------------------------------------

token = st.integers(min_value=0, max_value=VOCAB - 1)
small = st.integers(min_value=0, max_value=40)


def f32_bytes(values_: list[float]) -> bytes:
    return struct.pack(f"<{len(values_)}f", *values_)


def i32_bytes(values_: list[int]) -> bytes:
    return struct.pack(f"<{len(values_)}i", *values_)


@st.composite
def proposals(draw, tokens: list[int]) -> tuple[int, bytes, bytes]:
    """A valid sparse proposal for ``tokens``: each draft is inside its own row's support."""
    k = draw(st.integers(min_value=1, max_value=6))
    ids: list[int] = []
    probs: list[float] = []
    for d in tokens:
        others = draw(st.lists(token.filter(lambda t, d=d: t != d), min_size=k - 1, max_size=k - 1, unique=True))
        row = [d, *others]
        weights = draw(st.lists(st.floats(min_value=0.01, max_value=1.0), min_size=k, max_size=k))
        total = sum(weights)
        ids += row
        probs += [w / total for w in weights]
    return k, i32_bytes(ids), f32_bytes(probs)


sampling = st.builds(m.Sampling, temperature=st.sampled_from([0.0, 0.7, 1.0, 1.5]),
                     top_k=st.integers(0, 80), top_p=st.sampled_from([1.0, 0.9, 0.5, 1e-6]))


@st.composite
def drafts(draw, request: int | None = None) -> m.Draft:
    tokens = draw(st.lists(token, min_size=1, max_size=6))
    greedy = draw(st.booleans())
    support, q_ids, q_probs = (0, b"", b"") if greedy else draw(proposals(tokens))
    return m.Draft(request=draw(small) if request is None else request, round=draw(small), position=draw(small),
                   parent=draw(token), tokens=tokens, support=support, q_ids=q_ids, q_probs=q_probs)


client_messages = st.one_of(
    st.builds(m.Hello, protocol=st.sampled_from([1, 1, 0, 2]), tokenizer=st.sampled_from(["fp", "fp", "other"]),
              client=st.text(max_size=10), draft_model=st.text(max_size=10)),
    st.builds(m.Start, request=small, prompt=st.lists(token, min_size=1, max_size=20),
              max_new_tokens=st.integers(1, 40), sampling=sampling, seed=st.none() | small,
              stop=st.lists(token, max_size=3), mode=st.sampled_from(["speculative", "speculative", "cloud"])),
    drafts(),
    st.builds(m.Stream, request=small, tokens=st.integers(1, 40)),
    st.builds(m.Cancel, request=small),
)

limits = st.builds(m.Limits, max_input_tokens=small, max_total_tokens=small, max_draft=small,
                   max_support=small, max_frame_bytes=st.integers(0, 10**6),
                   max_messages_per_second=st.integers(0, 500), max_stream_tokens=small)
reasons = st.none() | st.sampled_from(["eos", "stop", "length", "context", "cancelled"])
server_messages = st.one_of(
    st.builds(m.Welcome, protocol=st.sampled_from([1, 2]), session=st.text(max_size=8), model=st.text(max_size=8),
              tokenizer=st.sampled_from(["fp", "other"]), vocab_size=st.integers(0, 200),
              eos=st.lists(token, max_size=3), limits=limits),
    st.builds(m.Started, request=small, prompt_tokens=small, cached_tokens=small),
    st.builds(m.Verdict, request=small, round=small, position=small, accepted=small, token=token,
              finished=st.booleans(), reason=reasons, queue_ms=st.floats(0, 1e6), forward_ms=st.floats(0, 1e6)),
    st.builds(m.Discarded, request=small, round=small, position=small),
    st.builds(m.Tokens, request=small, position=small, tokens=st.lists(token, max_size=5), finished=st.booleans(),
              reason=reasons),
    st.builds(m.Cancelled, request=small, position=small),
    st.builds(m.Error, code=st.sampled_from(["bad_frame", "internal", "nonsense"]), message=st.text(max_size=20),
              request=st.none() | small, fatal=st.booleans()),
)


# --- breaking frames --------------------------------------------------------------------------

@st.composite
def byte_mutations(draw, frame: bytes) -> bytes:
    """Bit flips, truncation, byte overwrites, insertions and deletions of an encoded frame."""
    data = bytearray(frame)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "overwrite", "insert", "delete", "append"]))
        if kind == "truncate" or not data:
            data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
            continue
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            data[i] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[i: i + draw(st.integers(1, 8))]
        else:
            data += draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@st.composite
def field_mutations(draw, frame: bytes) -> bytes:
    """Structural damage on the decoded map: drop, add, swap, retype fields; bad numbers; odd tags."""
    raw = msgspec.msgpack.decode(frame)
    assert isinstance(raw, dict)
    for _ in range(draw(st.integers(1, 3))):
        keys = list(raw)
        kind = draw(st.sampled_from(["drop", "add", "swap", "retype", "number", "tag", "nest", "float_bytes"]))
        if kind == "drop" and keys:
            raw.pop(draw(st.sampled_from(keys)))
        elif kind == "add":
            raw[draw(st.sampled_from(FIELD_NAMES) | st.text(max_size=8))] = draw(values)
        elif kind == "swap" and len(keys) >= 2:
            a, b = draw(st.lists(st.sampled_from(keys), min_size=2, max_size=2, unique=True))
            raw[a], raw[b] = raw[b], raw[a]
        elif kind == "retype" and keys:
            raw[draw(st.sampled_from(keys))] = draw(values)
        elif kind == "number" and keys:
            raw[draw(st.sampled_from(keys))] = draw(st.one_of(nasty_ints, nasty_floats))
        elif kind == "tag":
            raw["type"] = draw(st.sampled_from(TYPE_NAMES) | st.text(max_size=6) | nasty_ints)
        elif kind == "nest" and keys:
            key = draw(st.sampled_from(keys))
            depth = draw(st.integers(1, 300))  # deeper: deep_nesting() builds raw bytes
            value: object = raw[key]
            for _ in range(depth):
                value = [value]
            raw[key] = value
        elif kind == "float_bytes":
            # NaN, inf, negative or unnormalised probabilities where a proposal is expected.
            n = draw(st.integers(0, 12))
            raw["q_probs"] = f32_bytes(draw(st.lists(nasty_floats.filter(lambda x: abs(x) < 3e38 or not
                                                                         math.isfinite(x)), min_size=n, max_size=n)))
            raw["q_ids"] = i32_bytes(draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=n, max_size=n)))
            raw["support"] = draw(st.integers(0, 12))
    return msgspec.msgpack.encode(raw)


def deep_nesting(depth: int, opener: bytes = b"\x91") -> bytes:
    """``depth`` nested one-element arrays (or maps, with ``b"\\x81\\xa1k"``) around nil."""
    return opener * depth + b"\xc0"


def frames_from(messages: st.SearchStrategy) -> st.SearchStrategy[bytes | str]:
    """Valid frames of ``messages``, mutated ones, random bytes, text and pathological nesting."""
    encoded = messages.map(m.encode)
    return st.one_of(
        encoded,
        encoded.flatmap(byte_mutations),
        encoded.flatmap(field_mutations),
        st.binary(max_size=200),
        st.text(max_size=50),
        values.map(msgspec.msgpack.encode),
        st.integers(1, 200_000).map(deep_nesting),
        st.integers(1, 200_000).map(lambda d: deep_nesting(d, b"\x81\xa1k")),
    )
