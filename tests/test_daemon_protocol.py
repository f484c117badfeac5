"""The verifier speaks docs/protocol.md: handshake, verdicts equal to the core's rule, KV reuse and
rollback without recomputation, cloud-only generation equal to transformers' greedy decoding.

Every test runs a real ``Verifier`` on 127.0.0.1 with a real model; the client is the sans-I/O
``ClientSession`` over websockets.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from specd.daemon.server import Verifier
from specd.shared import messages as m
from specd.shared.fingerprint import tokenizer_fingerprint
from specd.shared.protocol import RequestStarted, RoundDiscarded, ServerFailed
from specd.shared.sampling import (
    DRAFT_STREAM,
    SamplingParams,
    position_generator,
    sample_proposal,
    sparse_proposal,
)
from tests.daemon_support import Client, daemon_config, direct_verdict, greedy_reference
from tests.tiny_models import save_tiny_model, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("target"), seed=1)


@pytest.fixture
async def verifier(tiny_folder):
    # Every round is verified whole (no goodput budget): these tests count the positions of each forward.
    async with Verifier(daemon_config(tiny_folder, goodput_budget=False)) as v:
        yield v


FINGERPRINT = tokenizer_fingerprint(tiny_tokenizer())


async def test_handshake_announces_model_and_limits(verifier):
    client = await Client.open(verifier.url, FINGERPRINT)
    welcome = client.session.welcome
    assert welcome.protocol == 1 and welcome.tokenizer == FINGERPRINT
    assert welcome.vocab_size == 64 and welcome.eos == [2]
    assert welcome.limits.max_total_tokens == 512  # clamped to the model's context
    assert welcome.limits.max_input_tokens == 511 and welcome.limits.max_draft == 16
    assert welcome.server.startswith("specd-verifier")
    await client.close()


async def test_a_different_tokenizer_is_refused_with_a_clear_error(verifier):
    client = await Client.open(verifier.url, "sha256:" + "0" * 64, hello=False)
    await client.ws.send(client.session.hello())
    (event,) = await client.events()
    assert isinstance(event, ServerFailed) and event.error.code == "tokenizer_mismatch" and event.error.fatal
    assert "tokenizer" in event.error.message and "same family" in event.error.message
    await client.ws.wait_closed()
    assert client.ws.close_code == 1008
    assert not verifier.target.forward_positions  # refused before any model work


async def test_greedy_verdicts_equal_the_core_and_the_prefix_is_never_recomputed(verifier):
    target, model = verifier.target, tiny_llama(1)
    client = await Client.open(verifier.url, FINGERPRINT)
    prompt = [1, 7, 8, 9, 10, 11]
    (started,) = await client.start(prompt, 40, sampling=m.Sampling(temperature=0.0))
    assert isinstance(started, RequestStarted) and started.started.cached_tokens == 0
    assert list(target.forward_positions) == [len(prompt) - 1]  # prefill: the prompt minus its last token
    reference = greedy_reference(model, prompt, 40, [2])
    rounds, expected_positions = 0, len(prompt) - 1
    while not client.session.finished:
        committed = list(client.session.committed)
        generated = len(committed) - len(prompt)
        # Alternate right drafts (from the reference) and wrong ones, so rollbacks happen.
        drafts = reference[generated:generated + 3] if rounds % 2 == 0 else [5, 6, 7]
        drafts = drafts or [5]
        verdict = await client.round(drafts)
        expected = direct_verdict(model, committed, drafts, None, SamplingParams(temperature=0.0), 0)
        if not verdict.finished:
            assert (verdict.accepted, verdict.verdict.token) == (expected.accepted, expected.token)
        # Exactly one forward per round, over [parent] + drafts and nothing else.
        assert target.forward_positions[-1] == len(drafts) + 1
        rounds += 1
        expected_positions += len(drafts) + 1
    assert client.session.generated == reference
    assert len(target.forward_positions) == 1 + rounds and target.positions_total == expected_positions
    await client.close()


async def test_sampled_verdicts_equal_the_core_with_the_verify_stream(verifier):
    model, draft_model = tiny_llama(1), tiny_llama(2)
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95)
    seed = 1234
    client = await Client.open(verifier.url, FINGERPRINT)
    prompt = [1, 12, 13, 14]
    await client.start(prompt, 30, sampling=m.Sampling(temperature=0.9, top_k=40, top_p=0.95), seed=seed)
    accepted = 0
    while not client.session.finished:
        committed = list(client.session.committed)
        gamma = min(4, 30 - (len(committed) - len(prompt)))
        seq = list(committed)
        rows_ids, rows_probs = [], []
        for _ in range(gamma):  # draft autoregressively from the other tiny model, keyed like specd's client
            with torch.inference_mode():
                logits = draft_model(torch.tensor([seq])).logits[0, -1:]
            proposal = sparse_proposal(logits, params, 16)
            token = int(sample_proposal(proposal, position_generator(seed, len(seq), DRAFT_STREAM))[0])
            rows_ids.append(proposal.ids[0])
            rows_probs.append(proposal.probs[0])
            seq.append(token)
        drafts = seq[len(committed):]
        proposal = type(proposal)(ids=torch.stack(rows_ids), probs=torch.stack(rows_probs))
        verdict = await client.round(drafts, proposal)
        expected = direct_verdict(model, committed, drafts, proposal, params, seed)
        if not verdict.finished:
            assert (verdict.accepted, verdict.verdict.token) == (expected.accepted, expected.token)
        else:  # a stop rule may cut the run short, but never changes what was kept
            assert verdict.new_tokens == [*drafts[:expected.accepted], expected.token][:len(verdict.new_tokens)]
        accepted += verdict.accepted
    assert accepted > 0  # the proposals were used, not just corrections


async def test_a_growing_chat_reuses_the_cache_and_stale_rounds_are_discarded(verifier):
    target = verifier.target
    client = await Client.open(verifier.url, FINGERPRINT)
    prompt = [1, 20, 21, 22, 23]
    await client.start(prompt, 6, sampling=m.Sampling(temperature=0.0))
    while not client.session.finished:
        await client.round([30, 31])
    first = list(client.session.committed)
    # The next turn repeats everything: only the new tokens are prefilled.
    await client.start([*first, 40, 41], 4, sampling=m.Sampling(temperature=0.0))
    assert target.forward_positions[-1] == 2  # the old last token (never run) and 40; 41 is the next parent
    forwards = len(target.forward_positions)
    # A round drafted ahead on a wrong assumption is discarded without any model work.
    _rnd, frame = client.session.draft([5], assumed=[9, 9])
    await client.ws.send(frame)
    (event,) = await client.events()
    assert isinstance(event, RoundDiscarded)
    assert len(target.forward_positions) == forwards
    assert verifier.metrics.discarded == 1  # counted from the message the session encoded
    verdict = await client.round([5, 6, 7])
    assert target.forward_positions[-1] == 4
    assert verdict.verdict.position == len(first) + 2
    await client.close()


async def test_cached_tokens_are_reported_in_started(verifier):
    client = await Client.open(verifier.url, FINGERPRINT)
    await client.start([1, 5, 6, 7, 8], 3, sampling=m.Sampling(temperature=0.0), mode="cloud")
    await client.stream_all()
    committed = list(client.session.committed)
    (started,) = await client.start([*committed, 9, 10], 2, sampling=m.Sampling(temperature=0.0))
    assert started.started.cached_tokens == len(committed) - 1
    await client.close()


async def test_cloud_only_greedy_equals_transformers_generate(verifier):
    model = tiny_llama(1)
    client = await Client.open(verifier.url, FINGERPRINT)
    for prompt in ([1, 3, 4, 5], [1, 50, 40, 30, 20, 10]):
        await client.start(prompt, 48, sampling=m.Sampling(temperature=0.0), mode="cloud")
        streamed = await client.stream_all()
        assert streamed == greedy_reference(model, prompt, 48, [2])
    await client.close()


async def test_cloud_sampling_is_reproducible_with_a_seed(verifier):
    client = await Client.open(verifier.url, FINGERPRINT)
    outputs = []
    for _ in range(2):
        await client.start([1, 3, 4], 20, sampling=m.Sampling(temperature=1.0), seed=77, mode="cloud")
        outputs.append(await client.stream_all())
    await client.start([1, 3, 4], 20, sampling=m.Sampling(temperature=1.0), seed=78, mode="cloud")
    other = await client.stream_all()
    assert outputs[0] == outputs[1] and len(outputs[0]) > 0
    assert other != outputs[0]
    await client.close()


async def test_cancel_stops_a_cloud_stream(verifier):
    client = await Client.open(verifier.url, FINGERPRINT)
    # Greedy from this prompt the tiny target does not reach end-of-sequence in 400 tokens: only the
    # cancel can end the stream early (a sampled stream may draw end-of-sequence first on a slow machine).
    await client.start([1, 33, 34, 35], 400, sampling=m.Sampling(temperature=0.0), mode="cloud", stop=[])
    await client.events()
    await client.ws.send(client.session.cancel())
    while not client.session.finished:
        await client.events()
    assert client.session.reason == "cancelled"
    assert len(client.session.committed) - 4 < 400
    await client.start([1, 3, 4], 2, sampling=m.Sampling(temperature=0.0))  # the session goes on
    await client.close()


async def test_a_second_session_keeps_working_while_the_first_sends_garbage(verifier):
    model = tiny_llama(1)
    noisy = await Client.open(verifier.url, FINGERPRINT)
    good = await Client.open(verifier.url, FINGERPRINT)
    prompt = [1, 33, 34, 35]
    await good.start(prompt, 24, sampling=m.Sampling(temperature=0.0), mode="cloud")

    async def garbage() -> list[str]:
        codes = []
        for frame in ("text is not allowed", b"\xc1\xc1\xc1", b"\x93\x01\x02\x03",
                      m.encode(m.Draft(request=99, round=0, position=1, parent=1, tokens=[1]))):
            await noisy.ws.send(frame)
            codes.append((await noisy.message()).code)
        return codes

    codes, streamed = await asyncio.gather(garbage(), good.stream_all())
    assert codes == ["bad_frame", "bad_frame", "bad_frame", "unknown_request"]
    assert streamed == greedy_reference(model, prompt, 24, [2])
    # The noisy session survived its non-fatal errors; an oversized frame closes only it (1009).
    await noisy.start([1, 3], 2, sampling=m.Sampling(temperature=0.0))
    await noisy.ws.send(b"\x00" * (2 * 1024 * 1024))
    await noisy.ws.wait_closed()
    assert noisy.ws.close_code == 1009
    await good.start([1, 3, 4], 2, sampling=m.Sampling(temperature=0.0))
    assert (await good.round([5])).verdict.position == 3
    await good.close()


async def test_pings_and_other_sessions_are_served_during_a_slow_forward(verifier):
    """The model runs on its own thread: a forward held on purpose does not stop the event loop from
    answering pings, and another session's round waits for at most the stream's forward in progress,
    never for the whole stream (the engine serves every session with work ready)."""
    backend = verifier.engine.backend
    original = backend.forward
    release, held = threading.Event(), threading.Semaphore(0)
    release.set()
    batches: list[set[int]] = []  # the slots of each forward, in order

    def gated_forward(rows, wanted):
        if not release.is_set():
            held.release()
            assert release.wait(60), "the test never released the forward"
        batches.append({row.slot for row in rows})
        time.sleep(0.02)  # slow enough that the stream is still running while the other session works
        return original(rows, wanted)

    backend.forward = gated_forward
    try:
        streaming = await Client.open(verifier.url, FINGERPRINT)
        other = await Client.open(verifier.url, FINGERPRINT)
        await streaming.start([1, 33, 34, 35], 300, sampling=m.Sampling(temperature=0.0), mode="cloud", stop=[])
        await streaming.events()  # the first token: the stream is running
        release.clear()
        assert await asyncio.to_thread(held.acquire, True, 30), "no forward started"
        # A forward is held on the model thread now; the pong can only come from the event loop.
        await asyncio.wait_for(await other.ws.ping(), 30)
        assert not release.is_set()
        release.set()
        await other.start([1, 9, 9], 5, sampling=m.Sampling(temperature=0.0))
        verdict = await other.round([5, 6])
        assert verdict.verdict.position == 3
    finally:
        release.set()
        backend.forward = original
    # The other session's forwards: its prefill, then its round. Between them the stream ran at most one
    # forward of its own (the one in progress when the round arrived): the round never waited behind
    # the stream's queue, and it was served while the stream was still running.
    stream_slot = next(iter(batches[0]))
    served = [i for i, slots in enumerate(batches) if slots - {stream_slot}]
    assert len(served) >= 2, batches
    between = [slots for slots in batches[served[0] + 1:served[-1]] if slots == {stream_slot}]
    assert len(between) <= 1, batches
    assert sum(stream_slot in slots for slots in batches[:served[-1]]) < 300, "the stream had ended first"
    await streaming.close()
    await other.close()


@pytest.mark.smollm2
@pytest.mark.slow
async def test_smollm2_cloud_greedy_equals_generate_and_speculation_agrees(smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    async with Verifier(daemon_config(smollm2_folder)) as v:
        client = await Client.open(v.url, tokenizer_fingerprint(tokenizer))
        eos = client.session.welcome.eos
        reference = greedy_reference(model, prompt, 24, eos)
        await client.start(prompt, 24, sampling=m.Sampling(temperature=0.0), mode="cloud")
        assert await client.stream_all() == reference
        # Speculative, drafting a mix of the right continuation and a wrong token: same output.
        await client.start(prompt, 24, sampling=m.Sampling(temperature=0.0))
        while not client.session.finished:
            done = len(client.session.generated)
            await client.round([*reference[done:done + 3], 0])
        assert client.session.generated == reference
        await client.close()
