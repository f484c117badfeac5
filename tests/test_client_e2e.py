"""The edge client against a real verifier on 127.0.0.1: equality with the target, reproducibility,
pipelining, adaptive γ, the verifier disappearing mid-answer, and cloud-only fallback."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import msgspec
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specd.daemon.server import Verifier
from specd.desktop.client.adaptive import GammaController
from specd.desktop.client.answer import Answer, Settings
from specd.desktop.client.connection import Endpoint
from specd.desktop.client.edge_client import EdgeClient
from specd.desktop.drafters.torch_drafter import TorchDrafter
from specd.shared import messages as m
from specd.shared.config import load_config
from specd.shared.fingerprint import tokenizer_fingerprint
from specd.shared.protocol import ClientState
from specd.shared.sampling import SamplingParams
from tests.tiny_models import save_tiny_model

GREEDY = Settings(sampling=SamplingParams(temperature=0.0), max_new_tokens=48, seed=0, gamma_max=8)
SAMPLED = Settings(sampling=SamplingParams(temperature=1.0, top_p=0.9), max_new_tokens=48, seed=11, gamma=3)
PROMPT = [1, 9, 33, 4, 17]
LONG_PROMPT = [1, 33, 34, 35]  # greedy, the tiny target does not reach end-of-sequence in 400 tokens


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"target": save_tiny_model(root / "target", seed=1), "draft": save_tiny_model(root / "draft", seed=2)}


@pytest.fixture
def always_draft_ahead(monkeypatch):
    """Whether drafting ahead pays is the controller's call from measured timings, which a loaded machine
    changes; the tests of the mechanism take that call out, so the counts they check are exact."""
    monkeypatch.setattr(GammaController, "worth_drafting_ahead", lambda _self, _now, _next: True)


def verifier_config(target, port: int = 0, **limits):
    return load_config(None, overrides={"models": {"target": str(target)}, "server": {"port": port},
                                        "limits": limits or None})


class SlowDrafter(TorchDrafter):
    """A drafter as slow as a laptop's (tiny models are too fast to see a reconnection mid-answer)."""

    def next_logits(self, ahead=()):
        time.sleep(0.015)
        return super().next_logits(ahead)


class GuessesTheEnd(TorchDrafter):
    """A drafter whose guess of the verifier's next token is always end-of-sequence."""

    def most_likely_next(self) -> int:
        super().most_likely_next()
        return 2


class ReadsPromptsSlowly(TorchDrafter):
    """A drafter whose forward over several tokens at once (a prompt, streamed tokens) takes 0.4 s, as a
    cold first call does; one token at a time it is as fast as a tiny model."""

    def _forward(self, token_ids, start):
        if len(token_ids) > 1:
            time.sleep(0.4)
        return super()._forward(token_ids, start)


def client_for(url: str, draft_folder, *, on_disconnect: str = "local", drafter: bool = True,
               slow: bool = False, client_class: type[EdgeClient] = EdgeClient,
               drafter_class: type[TorchDrafter] | None = None) -> EdgeClient:
    tokenizer = AutoTokenizer.from_pretrained(str(draft_folder))
    kind = drafter_class or (SlowDrafter if slow else TorchDrafter)
    return client_class(Endpoint(url=url, open_timeout=5), tokenizer=tokenizer,
                      fingerprint=tokenizer_fingerprint(tokenizer),
                      drafter=kind(draft_folder, "cpu") if drafter else None,
                      on_disconnect=on_disconnect, reconnect_max_s=0.5)


@torch.no_grad()
def reference_greedy(folder, prompt: list[int], max_new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos[0])
    return out[0, len(prompt):].tolist()


def consistent(answer: Answer, tokenizer) -> None:
    """Streamed pieces carry every token once, in order, and the text is their decoding."""
    assert [t for piece in answer.pieces for t in piece.token_ids] == answer.token_ids
    assert "".join(piece.text for piece in answer.pieces) == answer.text
    assert answer.text == tokenizer.decode(answer.token_ids, skip_special_tokens=True)


async def generate(url, draft_folder, settings, prompt=PROMPT, **kwargs) -> Answer:
    client = client_for(url, draft_folder, **kwargs)
    try:
        return await client.generate(list(prompt), settings)
    finally:
        await client.close()


async def test_greedy_equals_the_target_with_and_without_pipelining(folders):
    expected = reference_greedy(folders["target"], PROMPT, GREEDY.max_new_tokens)
    async with Verifier(verifier_config(folders["target"])) as verifier:
        piped = await generate(verifier.url, folders["draft"], GREEDY)
        plain = await generate(verifier.url, folders["draft"], replace(GREEDY, pipeline=False))
        cloud = await generate(verifier.url, folders["draft"], GREEDY, drafter=False)
    assert piped.token_ids == expected
    assert plain.token_ids == expected
    assert cloud.token_ids == expected
    assert piped.stats.mode == "speculative" and cloud.stats.mode == "cloud-only"
    assert piped.stats.rounds > 0 and piped.stats.target_forwards == piped.stats.rounds
    assert cloud.stats.rounds == 0 and cloud.stats.target_forwards == len(expected)


async def test_seeded_sampling_is_reproducible_and_pipelining_changes_nothing(folders):
    # Token-for-token reproduction needs every round verified whole (docs/protocol.md §5): no goodput budget.
    async with Verifier(verifier_config(folders["target"], goodput_budget=False)) as verifier:
        first = await generate(verifier.url, folders["draft"], SAMPLED)
        again = await generate(verifier.url, folders["draft"], SAMPLED)
        plain = await generate(verifier.url, folders["draft"], replace(SAMPLED, pipeline=False))
        other = await generate(verifier.url, folders["draft"], replace(SAMPLED, seed=12))
    assert first.token_ids == again.token_ids == plain.token_ids
    assert other.token_ids != first.token_ids
    assert set(first.stats.gammas) <= {1, 2, 3}


async def test_adaptive_gamma_follows_acceptance(folders):
    """Over a 40 ms round trip a draft that is always right earns long rounds; one that is always wrong
    is kept to a single draft per round (or none verified, a cloud step, where the budget finds it not
    worth the verify)."""
    from specd.desktop.bench.netem import DelayProxy

    settings = replace(GREEDY, max_new_tokens=60, pipeline=False)
    async with (Verifier(verifier_config(folders["target"])) as verifier,
                DelayProxy("127.0.0.1", verifier.port, rtt_ms=40) as proxy):
        same = await generate(proxy.url(), folders["target"], settings)  # the draft is the target
        other = await generate(proxy.url(), folders["draft"], settings)
    assert same.stats.acceptance_rate == 1.0 and same.stats.ahead_rounds == 0  # pipeline=False
    assert other.stats.acceptance_rate < 0.5
    assert same.stats.gamma_mean > other.stats.gamma_mean + 2
    assert max(same.stats.gammas) == settings.gamma_max
    assert max(other.stats.gammas[-10:]) <= 1  # one draft sent; the verifier's budget may verify none of it


async def test_verifier_gone_mid_answer_continues_locally_then_resumes(folders):
    """The draft is the target here, so local tokens equal the target's: the final ids must equal the
    target's greedy ids exactly — any lost or repeated token would show."""
    settings = replace(GREEDY, max_new_tokens=80, gamma=2, pipeline=True)
    expected = reference_greedy(folders["target"], PROMPT, settings.max_new_tokens)
    assert len(expected) >= 40, "the tiny target should not stop early"
    verifier = Verifier(verifier_config(folders["target"]))
    await verifier.start()
    port = verifier.port
    client = client_for(verifier.url, folders["target"], slow=True)
    states: list[str] = []
    client.on_status = lambda state, _msg: states.append(state)
    events = {"stopped": False, "restarted": None}

    def on_piece(piece):
        generated = len(client._run.committed) - len(PROMPT) if client._run else 0
        if not events["stopped"] and generated >= 10:
            events["stopped"] = True
            asyncio.get_running_loop().create_task(verifier.stop())
        if piece.source == "local" and events["restarted"] is None:
            events["restarted"] = asyncio.get_running_loop().create_task(restart())

    async def restart():
        revived = Verifier(verifier_config(folders["target"], port=port))
        await revived.start()
        return revived

    try:
        answer = await client.generate(list(PROMPT), settings, on_piece)
    finally:
        await client.close()
        if events["restarted"] is not None:
            await (await events["restarted"]).stop()
    assert answer.token_ids == expected
    consistent(answer, client.tokenizer)
    sources = [piece.source for piece in answer.pieces if piece.token_ids]
    assert "local" in sources
    last_local = max(i for i, s in enumerate(sources) if s == "local")
    assert any(s in ("draft", "target") for s in sources[last_local + 1:]), "speculation did not resume"
    assert answer.stats.mode == "local" and answer.stats.local_tokens > 0
    assert answer.stats.reconnects >= 1
    assert states.index("local") < len(states) - 1 and states[-1] in ("connected", "offline")
    assert "connected" in states[states.index("local"):]
    segments = answer.to_json()["segments"]
    assert [s["source"] for s in segments][:2] == ["verified", "local"]


async def test_verifier_gone_with_on_disconnect_stop_ends_cleanly_and_the_next_answer_resumes(folders):
    settings = replace(GREEDY, max_new_tokens=60, gamma=2)
    expected = reference_greedy(folders["target"], PROMPT, settings.max_new_tokens)
    verifier = Verifier(verifier_config(folders["target"]))
    await verifier.start()
    port = verifier.port
    client = client_for(verifier.url, folders["draft"], on_disconnect="stop")
    stopping = []

    def on_piece(_piece):
        if not stopping and len(client._run.committed) - len(PROMPT) >= 8:
            stopping.append(asyncio.get_running_loop().create_task(verifier.stop()))

    try:
        cut = await client.generate(list(PROMPT), settings, on_piece)
        assert cut.finish_reason == "disconnected"
        assert 8 <= len(cut.token_ids) < len(expected)
        assert cut.token_ids == expected[: len(cut.token_ids)]
        consistent(cut, client.tokenizer)
        async with Verifier(verifier_config(folders["target"], port=port)):
            rest = await client.generate(list(PROMPT) + cut.token_ids,
                                         replace(settings, max_new_tokens=len(expected) - len(cut.token_ids)))
    finally:
        await client.close()
    assert cut.token_ids + rest.token_ids == expected


async def test_cloud_only_when_no_drafter_can_run(folders, tmp_path):
    """A draft folder whose weights are missing: no device can run it, so answers are cloud-only."""
    import shutil

    from specd.desktop.commands.launch import build_client

    broken = tmp_path / "broken-draft"
    shutil.copytree(folders["draft"], broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    async with Verifier(verifier_config(folders["target"])) as verifier:
        cfg = load_config(None, overrides={"models": {"draft": str(broken), "draft_backend": "torch"},
                                           "client": {"server_url": verifier.url}})
        setup = await asyncio.to_thread(build_client, cfg)
        assert setup.client.drafter is None and "no device can run the draft" in setup.drafter_error
        try:
            answer = await setup.client.generate(list(PROMPT), GREEDY)
        finally:
            await setup.client.close()
    assert answer.stats.mode == "cloud-only"
    assert answer.token_ids == reference_greedy(folders["target"], PROMPT, GREEDY.max_new_tokens)
    assert {p.source for p in answer.pieces if p.token_ids} == {"cloud"}


async def test_cancel_stops_the_answer_cleanly(folders):
    settings = replace(GREEDY, max_new_tokens=200)
    async with Verifier(verifier_config(folders["target"], max_input_tokens=256, max_total_tokens=512)) as verifier:
        client = client_for(verifier.url, folders["draft"])
        try:
            def on_piece(_piece):
                if len(client._run.committed) - len(LONG_PROMPT) >= 5:
                    client.cancel()

            answer = await client.generate(list(LONG_PROMPT), settings, on_piece)
            assert answer.finish_reason == "cancelled"
            assert 5 <= len(answer.token_ids) < 200
            consistent(answer, client.tokenizer)
            after = await client.generate(list(PROMPT), replace(settings, max_new_tokens=10))
            assert after.token_ids == reference_greedy(folders["target"], PROMPT, 10)
        finally:
            await client.close()


async def test_tokenizer_mismatch_is_refused_with_a_clear_message(folders, tmp_path):
    from specd.desktop.client.connection import ConnectionFailed

    other = save_tiny_model(tmp_path / "other", seed=1, vocab_size=300)
    async with Verifier(verifier_config(folders["target"])) as verifier:
        client = client_for(verifier.url, other)
        with pytest.raises(ConnectionFailed, match="tokenizer"):
            await client.connect()
        await client.close()


async def test_unreachable_verifier_says_so():
    from specd.desktop.client.connection import ConnectionFailed

    tokenizer_folder = None
    client = EdgeClient(Endpoint(url="ws://127.0.0.1:9", open_timeout=2), tokenizer=tokenizer_folder,
                        fingerprint="x", drafter=None)
    with pytest.raises(ConnectionFailed, match=r"cannot reach the verifier at 127\.0\.0\.1:9"):
        await client.generate([1, 2, 3], GREEDY)
    await client.close()


@pytest.mark.smollm2
async def test_embedded_pair_greedy_equals_the_target(smollm2_folder):
    """The product's default pair: SmolLM2 target (torch fp32) and its ONNX Runtime GenAI draft."""
    from specd.desktop.commands.launch import build_client

    async with Verifier(verifier_config(smollm2_folder)) as verifier:
        cfg = load_config(None, overrides={"client": {"server_url": verifier.url}})
        setup = await asyncio.to_thread(build_client, cfg, device="cpu")
        assert setup.client.drafter is not None
        conversation = [{"role": "user", "content": "What is the capital of France? Answer, then say why."}]
        prompt = setup.client.prompt_ids(conversation)
        try:
            answer = await setup.client.chat(conversation, replace(GREEDY, max_new_tokens=40))
        finally:
            await setup.client.close()
    assert answer.prompt_token_ids == prompt
    assert answer.token_ids == reference_greedy(smollm2_folder, prompt, 40)
    assert answer.stats.mode == "speculative" and answer.stats.acceptance_rate > 0.2
    assert "Paris" in answer.text


async def test_rounds_drafted_ahead_are_used_when_the_guess_is_right(folders, always_draft_ahead):
    """With the target as its own draft every guess is right: rounds drafted during verification are
    sent ahead and verified without a round trip, and the output is still the target's own."""
    settings = replace(GREEDY, max_new_tokens=60, gamma=3)
    expected = reference_greedy(folders["target"], PROMPT, settings.max_new_tokens)
    async with Verifier(verifier_config(folders["target"])) as verifier:
        piped = await generate(verifier.url, folders["target"], settings, slow=True)
        plain = await generate(verifier.url, folders["target"], replace(settings, pipeline=False), slow=True)
    assert piped.token_ids == plain.token_ids == expected
    # Every guess is right, so every round after the first was drafted during its predecessor's
    # verification, and none was discarded; each round carries γ drafts and the bonus token.
    assert piped.stats.rounds == plain.stats.rounds == -(-len(expected) // 4)
    assert piped.stats.ahead_rounds == piped.stats.rounds - 1
    assert piped.stats.discarded_rounds == 0
    assert plain.stats.ahead_rounds == 0


async def test_an_idle_connection_closed_by_the_verifier_is_reported_and_reopened(folders):
    async with Verifier(verifier_config(folders["target"], idle_timeout_s=0.5)) as verifier:
        client = client_for(verifier.url, folders["draft"])
        states: list[str] = []
        client.on_status = lambda state, _msg: states.append(state)
        try:
            first = await client.generate(list(PROMPT), replace(GREEDY, max_new_tokens=8))
            for _ in range(300):
                if "offline" in states:
                    break
                await asyncio.sleep(0.1)
            assert states[-1] == "offline" and not client.connected
            second = await client.generate(list(PROMPT), replace(GREEDY, max_new_tokens=8))
        finally:
            await client.close()
    assert second.token_ids == first.token_ids and second.stats.mode == "speculative"
    assert states.count("connected") == 2


class VerdictFirstClient(EdgeClient):
    """Holds back telling the answer loop that its round drafted ahead is ready until the next verdict has
    arrived and waits unread: an ordering a loaded machine produces now and then."""

    async def next_event(self, other, cancel):
        event = await super().next_event(other, cancel)
        if event is None and other is not None and self._run is not None:
            for _ in range(500):
                if not self._inbox.empty() or self.session.state is not ClientState.ACTIVE:
                    break
                await asyncio.sleep(0.002)
        return event


class ParentCorruptingClient(EdgeClient):
    """A fault on the path: the parent token of every third round, three times, arrives corrupted, so
    the verifier discards rounds this client is already drafting after."""

    corrupt = 3

    async def send(self, frame: bytes) -> None:
        msg = m.decode_client(frame, len(frame))
        if isinstance(msg, m.Draft) and msg.round % 3 == 2 and self.corrupt:
            self.corrupt -= 1
            frame = m.encode(msgspec.structs.replace(msg, parent=msg.parent ^ 1))
        await super().send(frame)


async def _answer_with(client: EdgeClient, settings: Settings, prompt=PROMPT) -> Answer:
    try:
        return await asyncio.wait_for(client.generate(list(prompt), settings), 30)
    finally:
        await client.close()


async def test_a_round_drafted_ahead_is_sent_while_a_verdict_waits_unread(folders, always_draft_ahead):
    """The round drafted ahead is framed after the session's committed tokens, which end before the round
    in flight even when its verdict has already arrived (the session receives it only when the answer loop
    reads it): it must assume the round's drafts and the guess, be verified, and leave the answer the
    target's own."""
    from specd.desktop.bench.netem import DelayProxy

    settings = replace(GREEDY, max_new_tokens=60, gamma=3)
    expected = reference_greedy(folders["target"], PROMPT, settings.max_new_tokens)
    # every round verified whole (no goodput budget): each round after the first is the one drafted ahead
    async with (Verifier(verifier_config(folders["target"], goodput_budget=False)) as verifier,
                DelayProxy("127.0.0.1", verifier.port, rtt_ms=20) as proxy):  # drafting ahead beats the verdict
        client = client_for(proxy.url(), folders["target"], client_class=VerdictFirstClient)
        answer = await _answer_with(client, settings)
    assert answer.token_ids == expected
    assert answer.stats.ahead_rounds == answer.stats.rounds - 1 and answer.stats.discarded_rounds == 0


async def test_a_discarded_round_voids_what_was_drafted_after_it(folders, always_draft_ahead):
    """When the verifier discards a round in flight, the round being drafted after it is void too: the
    client drafts again from the committed tokens instead of building on what was discarded."""
    settings = replace(GREEDY, max_new_tokens=60, gamma=3)
    expected = reference_greedy(folders["target"], PROMPT, settings.max_new_tokens)
    async with Verifier(verifier_config(folders["target"])) as verifier:
        client = client_for(verifier.url, folders["target"], slow=True, client_class=ParentCorruptingClient)
        answer = await _answer_with(client, settings)
    assert client.corrupt == 0, "the answer ended before three rounds were corrupted"
    assert answer.token_ids == expected
    # Each corrupted round is discarded, and so is the one round that may have been sent ahead after it.
    assert 3 <= answer.stats.discarded_rounds <= 6 and answer.stats.ahead_rounds > 3


async def test_the_client_keeps_under_the_verifiers_message_rate(folders):
    """The verifier advertises its per-connection message limit; a client with a fast draft and a fast
    target paces its rounds under it instead of being cut off with 'rate_limited'."""
    settings = replace(GREEDY, max_new_tokens=100, gamma=1, pipeline=False)
    expected = reference_greedy(folders["target"], LONG_PROMPT, settings.max_new_tokens)
    # every round verified whole (no goodput budget), so the count of rounds below is exact
    async with Verifier(verifier_config(folders["target"], max_messages_per_second=20,
                                        goodput_budget=False)) as verifier:
        client = client_for(verifier.url, folders["target"])
        answer = await _answer_with(client, settings, LONG_PROMPT)
    assert answer.token_ids == expected
    # Every draft is right, so each round is one draft and the bonus token: 50 rounds, more than the
    # verifier's burst (2 × 20 messages) allows at once.
    assert answer.stats.rounds == -(-len(expected) // 2) > 2 * 20


async def test_a_guess_that_ends_the_answer_is_drafted_ahead_once_per_round(folders, always_draft_ahead,
                                                                          monkeypatch):
    """Nothing is drafted after a guessed end of the answer; the round in flight is not drafted ahead
    again and again while it is verified (that kept the drafter busy, and the verifier's CPU with it)."""
    from specd.desktop.client.drafting_ahead import DraftingAhead

    starts = []
    start = DraftingAhead.start.__func__

    def counted(cls, link, run, current, *args, **kwargs):
        starts.append(current.number)
        return start(cls, link, run, current, *args, **kwargs)

    monkeypatch.setattr(DraftingAhead, "start", classmethod(counted))
    expected = reference_greedy(folders["target"], PROMPT, GREEDY.max_new_tokens)
    async with Verifier(verifier_config(folders["target"])) as verifier:
        answer = await generate(verifier.url, folders["draft"], replace(GREEDY, context_proposer=False),
                                drafter_class=GuessesTheEnd)
    assert answer.token_ids == expected
    assert answer.stats.ahead_rounds == 0 and answer.stats.rounds > 3
    assert 0 < len(starts) == len(set(starts)) <= answer.stats.rounds


async def test_a_rounds_drafting_is_timed_without_reading_the_prompt(folders, monkeypatch):
    """The drafter reads the prompt before the first round is timed, all but its last token: a round's
    drafting time is γ one-token forwards, never the prompt's read (a cold prompt read timed inside the first
    round made its drafts look five times dearer than they were)."""
    from specd.desktop.client import speculation

    timed: list[float] = []
    propose_timed = speculation.propose_timed

    def recording(*args, **kwargs):
        proposal, ms = propose_timed(*args, **kwargs)
        timed.append(ms)
        return proposal, ms

    monkeypatch.setattr(speculation, "propose_timed", recording)
    expected = reference_greedy(folders["target"], PROMPT, GREEDY.max_new_tokens)
    async with Verifier(verifier_config(folders["target"])) as verifier:
        answer = await generate(verifier.url, folders["draft"], replace(GREEDY, context_proposer=False),
                                drafter_class=ReadsPromptsSlowly)
    assert answer.token_ids == expected
    assert timed and max(timed) < 300.0, timed
    assert answer.stats.edge_ms >= 400.0  # the read is still the drafter's work in the answer's stats


async def test_a_round_trip_that_grew_is_measured_where_the_stream_runs_dry(folders):
    """The round trip grows from 10 to 200 ms between two answers that stream (a laptop-slow draft against
    a fast verifier). The first answer's estimate asks too few tokens ahead, so the stream runs dry at the
    next top-up; that stall measures the new round trip, and the rest is asked far enough ahead."""
    from specd.desktop.bench.netem import DelayProxy

    settings = replace(GREEDY, max_new_tokens=80, mode_switching=True)
    expected = reference_greedy(folders["target"], LONG_PROMPT, settings.max_new_tokens)
    async with (Verifier(verifier_config(folders["target"])) as verifier,
                DelayProxy("127.0.0.1", verifier.port, rtt_ms=10) as proxy):
        client = client_for(proxy.url(), folders["draft"], slow=True)
        try:
            first = await client.generate(list(LONG_PROMPT), settings)
            proxy.rtt_ms = 200
            second = await client.generate(list(LONG_PROMPT), settings)
            network_ms = client._controller.estimate().network_ms
        finally:
            await client.close()
    assert first.token_ids == second.token_ids == expected
    assert second.stats.cloud_tokens > 60, "the second answer streams"
    assert network_ms > 150, network_ms
