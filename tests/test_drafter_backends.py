"""Every CPU drafter backend, on a tiny model and on the embedded SmolLM2: exact proposals, exact
rollback, normalised proposals, and agreement between backends built from the same weights."""

from __future__ import annotations

import pytest
import torch

from specd.desktop.drafters.convert import build_ortgenai, prepare_draft
from specd.desktop.drafters.openvino import OpenVINODrafter
from specd.desktop.drafters.openvino_export import export_openvino
from specd.desktop.drafters.ortgenai import OrtGenAIDrafter
from specd.desktop.drafters.torch_drafter import TorchDrafter
from specd.shared.models import EMBEDDED_PRESET
from specd.shared.sampling import SamplingParams, sparse_proposal, validate_proposal
from tests.tiny_models import save_tiny_ort_model

SAMPLED = SamplingParams(temperature=0.8, top_k=0, top_p=0.9)
GREEDY = SamplingParams(temperature=0.0)
SUPPORT = 16
BACKENDS = ("torch", "onnxruntime-genai", "openvino")


@pytest.fixture(scope="module")
def tiny_builds(tmp_path_factory):
    """One tiny Llama as an HF folder and as fp32 ORT GenAI and OpenVINO builds (a few seconds each)."""
    root = tmp_path_factory.mktemp("tiny-draft")
    hf = save_tiny_ort_model(root / "hf", seed=3)
    (root / "ort").mkdir()
    build_ortgenai(hf, root / "ort", "fp32", lambda _msg: None)
    (root / "ov").mkdir()
    export_openvino(hf, root / "ov", "fp32", lambda _msg: None)
    return {"torch": hf, "onnxruntime-genai": root / "ort", "openvino": root / "ov"}


@pytest.fixture(scope="module")
def smollm2_builds(smollm2_folder):
    """The embedded draft as the app prepares it by default (int4), cached per user like the app's."""
    return {"torch": smollm2_folder,
            "onnxruntime-genai": prepare_draft(EMBEDDED_PRESET, "onnxruntime-genai", "int4"),
            "openvino": prepare_draft(EMBEDDED_PRESET, "openvino", "int4")}


def open_backend(backend: str, folder):
    if backend == "torch":
        return TorchDrafter(folder)
    if backend == "onnxruntime-genai":
        return OrtGenAIDrafter(folder, max_length=512)
    return OpenVINODrafter(folder)


@pytest.fixture(scope="module", params=[
    *[("tiny", b) for b in BACKENDS],
    *[pytest.param(("smollm2", b), marks=[pytest.mark.smollm2, pytest.mark.slow]) for b in BACKENDS],
], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    """(drafter, prompt) for one backend and model; a second drafter of the same build opens on demand."""
    model, backend = request.param
    builds = request.getfixturevalue("tiny_builds" if model == "tiny" else "smollm2_builds")
    drafter = open_backend(backend, builds[backend])
    if model == "tiny":
        prompt = [1, 5, 9, 17, 33, 4, 60, 12]
    else:
        tokenizer = drafter.load_tokenizer()
        prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                                    add_generation_prompt=True, tokenize=True, return_dict=True)
                      ["input_ids"])
    yield drafter, prompt, lambda: open_backend(backend, builds[backend])
    drafter.close()


def dense(ids: torch.Tensor, probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.zeros(vocab_size).scatter_add_(0, ids, probs)


def test_proposals_are_the_distribution_of_the_backends_own_logits(case):
    drafter, prompt, _ = case
    drafter.prefill(prompt)
    drafted = drafter.propose(drafter.tokens(), 5, SAMPLED, SUPPORT, seed=11)
    assert drafter.token_count == len(prompt) + 5
    drafter.rollback(len(prompt))
    for i, token in enumerate(drafted.tokens):
        expected = sparse_proposal(drafter.next_logits().unsqueeze(0), SAMPLED, SUPPORT)
        # Compare as distributions: entries of probability 0 (cut by top-p) may name any ids.
        got = dense(drafted.proposal.ids[i], drafted.proposal.probs[i], drafter.vocab_size)
        want = dense(expected.ids[0], expected.probs[0], drafter.vocab_size)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert got[token] > 0
        drafter.append([token])


def test_greedy_proposes_the_argmax_of_its_own_logits(case):
    drafter, prompt, _ = case
    drafter.prefill(prompt)
    drafted = drafter.propose(drafter.tokens(), 4, GREEDY, SUPPORT, seed=0)
    assert drafted.proposal is None
    drafter.rollback(len(prompt))
    for token in drafted.tokens:
        assert token == int(drafter.next_logits().argmax())
        drafter.append([token])
    assert drafter.most_likely_next() == int(drafter.next_logits().argmax())


def test_proposals_sum_to_one_over_their_support(case):
    drafter, prompt, _ = case
    drafter.prefill(prompt)
    drafted = drafter.propose(drafter.tokens(), 6, SAMPLED, SUPPORT, seed=5)
    probs = drafted.proposal.probs
    assert probs.shape == (6, SUPPORT) and probs.dtype == torch.float32
    assert bool((probs >= 0).all())
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(6), atol=1e-5, rtol=0)
    validate_proposal(torch.tensor(drafted.tokens), drafted.proposal, drafter.vocab_size)  # q(d) > 0, no repeats


def test_propose_rollback_propose_equals_a_fresh_run(case):
    drafter, prompt, reopen = case
    quantised = drafter.backend != "torch" and drafter.vocab_size > 64
    drafter.prefill(prompt)
    first = drafter.propose(drafter.tokens(), 5, SAMPLED, SUPPORT, seed=3)
    drafter.rollback(len(prompt))
    again = drafter.propose(drafter.tokens(), 5, SAMPLED, SUPPORT, seed=3)
    fresh_drafter = reopen()
    fresh_drafter.prefill(prompt)
    fresh = fresh_drafter.propose(fresh_drafter.tokens(), 5, SAMPLED, SUPPORT, seed=3)
    assert first.tokens == again.tokens == fresh.tokens
    torch.testing.assert_close(again.proposal.probs, fresh.proposal.probs, atol=1e-6, rtol=1e-5)
    # A verdict that keeps two drafts and adds the verifier's token, then the next round.
    verdict = [*prompt, *first.tokens[:2], 7]
    drafter.rollback(len(prompt) + 2)
    drafter.append([7])
    assert drafter.tokens() == verdict
    next_round = drafter.propose(drafter.tokens(), 3, GREEDY, SUPPORT, seed=0)
    fresh_drafter.prefill(verdict)
    assert next_round.tokens == fresh_drafter.propose(fresh_drafter.tokens(), 3, GREEDY, SUPPORT, seed=0).tokens
    fresh_drafter.close()
    # Against a drafter that sees the verdict as one prompt: equal up to how the kernels round a long
    # pass versus short ones (tight in fp32; int4/int8 kernels quantise activations per pass).
    drafter.rollback(len(verdict))
    scratch = reopen()
    scratch.prefill(verdict)
    tolerance = 1.0 if quantised else 1e-3
    torch.testing.assert_close(drafter.next_logits(), scratch.next_logits(), atol=tolerance, rtol=0)
    scratch.close()


def test_rollback_and_prefill_bounds(case):
    drafter, prompt, _ = case
    drafter.prefill(prompt)
    with pytest.raises(ValueError):
        drafter.rollback(len(prompt) + 1)
    with pytest.raises(ValueError):
        drafter.append([drafter.vocab_size])
    drafter.prefill(prompt[:3])  # a shorter prompt keeps the common prefix
    assert drafter.tokens() == prompt[:3]
    logits = drafter.next_logits()
    assert logits.shape == (drafter.vocab_size,) and logits.dtype == torch.float32


def test_torch_ortgenai_and_openvino_fp32_builds_agree(tiny_builds):
    drafters = {b: open_backend(b, tiny_builds[b]) for b in BACKENDS}
    sequence = [1, 8, 22, 40, 3, 19, 51, 6, 30, 2, 44]
    for drafter in drafters.values():
        drafter.prefill(sequence[:4])
    for token in sequence[4:]:
        reference = drafters["torch"].next_logits()
        for backend in ("onnxruntime-genai", "openvino"):
            torch.testing.assert_close(drafters[backend].next_logits(), reference, atol=2e-4, rtol=1e-4)
        for drafter in drafters.values():
            drafter.append([token])


@pytest.mark.smollm2
@pytest.mark.slow
def test_embedded_draft_tokenizers_match_the_target(smollm2_builds):
    from transformers import AutoTokenizer

    from specd.shared.fingerprint import tokenizer_fingerprint

    target = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(smollm2_builds["torch"])))
    for backend in ("onnxruntime-genai", "openvino"):
        drafter = open_backend(backend, smollm2_builds[backend])
        assert tokenizer_fingerprint(drafter.load_tokenizer()) == target, backend
        drafter.close()
