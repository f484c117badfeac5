"""Fuzzing a running verifier with a real model: random sequences of honest, broken and garbage frames.

Each example opens a connection and sends a random mix of starts (greedy, sampled, cloud), rounds at the
right or a wrong position, cancels and malformed frames. Whatever happens, the verifier never fails
internally, never closes the connection, and afterwards its KV cache still gives exactly the verdicts a
full forward pass gives (``daemon_support.direct_verdict``). Example counts are small for CI;
``SPECD_FUZZ_EXAMPLES`` raises them (tests/fuzz_strategies.py).
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from websockets.sync.client import connect

from specd.daemon.server import Verifier
from specd.shared import messages as m
from specd.shared.errors import ProtocolError
from specd.shared.fingerprint import tokenizer_fingerprint
from specd.shared.sampling import SamplingParams
from tests import fuzz_strategies as fz
from tests.daemon_support import daemon_config, direct_verdict
from tests.tiny_models import save_tiny_model, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)
FINGERPRINT = tokenizer_fingerprint(tiny_tokenizer())
LIMITS = {"max_input_tokens": 40, "max_total_tokens": 64, "max_draft": 6, "max_support": 32,
          "max_frame_bytes": 8192, "max_messages_per_second": 0}
BARRIER = m.encode(m.Hello(protocol=1, tokenizer=FINGERPRINT))  # always answered by unexpected_message


@pytest.fixture(scope="module")
def verifier_url(tmp_path_factory):
    """A verifier on its own event loop in a thread, so that hypothesis can drive it synchronously."""
    folder = save_tiny_model(tmp_path_factory.mktemp("target"), seed=1)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict = {}

    async def serve() -> None:
        try:
            async with Verifier(daemon_config(folder, **LIMITS)) as v:
                box["v"], box["stop"] = v, asyncio.Event()
                started.set()
                await box["stop"].wait()
        except BaseException as exc:
            box["error"] = exc
            started.set()
            raise

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    assert started.wait(60) and "error" not in box, box.get("error")
    yield box["v"].url
    loop.call_soon_threadsafe(box["stop"].set)
    thread.join(30)


class Conversation:
    """One connection; every frame is followed by a barrier so its replies are collected in order."""

    def __init__(self, url: str) -> None:
        self.ws = connect(url, compression=None, max_size=None, open_timeout=10, legacy=True)
        self.ws.send(BARRIER)
        assert isinstance(self.reply(), m.Welcome)
        self.request = 0  # the id of the last start sent
        self.running = -1  # the request the verifier last started (it may have ended since)
        self.committed: list[int] = []  # as far as the verdicts tell (a mirror, not the oracle)
        self.pending: list[int] = []
        self.prompt: list[int] = []
        self.active = False
        self.sampled = False
        self.round = 0
        self.errors: list[m.Error] = []

    def reply(self) -> m.ServerMessage:
        return m.decode_server(self.ws.recv(timeout=30))

    def send(self, frame: bytes | str) -> list[m.ServerMessage]:
        self.ws.send(frame)
        self.ws.send(BARRIER)
        replies = []
        while True:
            msg = self.reply()
            if isinstance(msg, m.Error) and msg.code == "unexpected_message" and "already received" in msg.message:
                return replies
            replies.append(msg)
            self.track(msg)

    def track(self, msg: m.ServerMessage) -> None:
        assert not (isinstance(msg, m.Error) and (msg.fatal or msg.code == "internal")), msg
        if isinstance(msg, m.Started):  # ours, or one a garbage frame happened to start (prompt unknown)
            ours = msg.request == self.request and bool(self.prompt)
            self.running, self.active = msg.request, ours
            self.committed = list(self.prompt) if ours else []
        elif isinstance(msg, m.Error):
            self.errors.append(msg)
            if msg.request == self.running:
                self.active = False
        elif isinstance(msg, m.Verdict) and msg.request == self.running:
            self.committed = self.committed[: msg.position] + self.pending[: msg.accepted] + [msg.token]
            self.active = not msg.finished
        elif isinstance(msg, m.Tokens) and msg.request == self.running:
            self.committed = self.committed[: msg.position] + list(msg.tokens)
            self.active = not msg.finished
        elif isinstance(msg, m.Cancelled) and msg.request == self.running:
            self.active = False

    def step(self, a: dict) -> None:
        """Apply one pre-drawn action (hypothesis needs draws that do not depend on the replies)."""
        kind = a["kind"]
        if kind == "start" or (kind in ("draft", "stale") and not self.active):
            self.request += 1
            self.round = 0
            self.sampled = a["sampling"].temperature > 0
            self.prompt = a["prompt"]
            self.send(m.encode(m.Start(request=self.request, prompt=a["prompt"], max_new_tokens=a["max_new"],
                                       sampling=a["sampling"], seed=a["seed"], mode=a["mode"], stop=a["stop"])))
        elif kind in ("draft", "stale"):
            tokens = a["tokens"]
            position = len(self.committed) + (a["offset"] if kind == "stale" else 0)
            support, q_ids, q_probs = a["proposal"] if self.sampled else (0, b"", b"")
            self.round += a["round_step"]
            self.pending = tokens
            self.send(m.encode(m.Draft(request=self.running, round=self.round, position=max(1, position),
                                       parent=self.committed[-1], tokens=tokens, support=support, q_ids=q_ids,
                                       q_probs=q_probs)))
        elif kind == "cancel":
            self.send(m.encode(m.Cancel(request=self.running)))
        else:
            try:
                if isinstance(m.decode_client(a["garbage"]), m.Hello):
                    return  # a second hello would be mistaken for the barrier
            except ProtocolError:
                pass
            self.send(a["garbage"])

    def settle(self) -> int:
        """Cancel whatever runs and start a fresh greedy request; returns its id."""
        if self.running >= 0:
            self.send(m.encode(m.Cancel(request=self.running)))
        for attempt in range(200):
            self.request, self.prompt = 10_000 + attempt, [1, 5, 6]
            replies = self.send(m.encode(m.Start(request=self.request, prompt=[1, 5, 6], max_new_tokens=20,
                                                 sampling=m.Sampling(temperature=0.0))))
            if any(isinstance(r, m.Started) for r in replies):
                return self.request
        raise AssertionError("the session never became free")


@st.composite
def actions(draw) -> dict:
    tokens = draw(st.lists(fz.token, min_size=1, max_size=LIMITS["max_draft"]))
    return {
        "kind": draw(st.sampled_from(["start", "draft", "draft", "draft", "stale", "cancel", "garbage"])),
        "prompt": draw(st.lists(fz.token, min_size=1, max_size=LIMITS["max_input_tokens"])),
        "mode": draw(st.sampled_from(["speculative", "speculative", "cloud"])),
        "sampling": draw(st.sampled_from([m.Sampling(temperature=0.0), m.Sampling(temperature=0.8, top_p=0.9),
                                          m.Sampling(temperature=1e-40)])),
        "max_new": draw(st.integers(1, 30)), "seed": draw(st.none() | fz.small),
        "stop": draw(st.lists(fz.token, max_size=1)),
        "tokens": tokens, "proposal": draw(fz.proposals(tokens)),
        "offset": draw(st.sampled_from([-1, 1, 3])), "round_step": draw(st.integers(1, 2)),
        "garbage": draw(fz.frames_from(fz.client_messages).filter(lambda f: len(f) < 8000)),
    }


@fz.fuzz_settings(25)
@given(st.lists(actions(), min_size=1, max_size=25),
       st.lists(st.lists(fz.token, min_size=1, max_size=4), min_size=2, max_size=2))
def test_random_traffic_never_breaks_the_verifier_or_its_kv_cache(verifier_url, steps, final_drafts):
    model = tiny_llama(1)
    conversation = Conversation(verifier_url)
    try:
        for step in steps:
            conversation.step(step)
        request = conversation.settle()
        committed = [1, 5, 6]
        greedy = SamplingParams(temperature=0.0)
        for round_, drafts in enumerate(final_drafts):  # after the chaos, the cache gives full-forward verdicts
            replies = conversation.send(m.encode(m.Draft(request=request, round=round_, position=len(committed),
                                                         parent=committed[-1], tokens=drafts)))
            (verdict,) = [r for r in replies if isinstance(r, m.Verdict)]
            # the goodput budget may verify a prefix: the verdict must be a full forward's over that prefix
            assert verdict.verified is not None and 0 <= verdict.verified <= len(drafts)
            expected = direct_verdict(model, committed, drafts[: verdict.verified], None, greedy, 0)
            assert (verdict.accepted, verdict.token) == (expected.accepted, expected.token)
            committed += [*drafts[: verdict.accepted], verdict.token]
            if verdict.finished:
                break
    finally:
        conversation.ws.close()
