"""The shared drafter machinery: the fast proposal path and the lazily fed, memoised KV cache."""

from __future__ import annotations

import pytest
import torch

from specd.desktop.drafters.base import CachedDrafter
from specd.shared.sampling import DRAFT_STREAM, SamplingParams, position_generator, target_probs


def reference_proposal(logits: torch.Tensor, params: SamplingParams, support_k: int) -> tuple[list[int], torch.Tensor]:
    """The proposal from first principles: the target's law for these settings (checked against
    transformers in test_sampling.py), cut to its ``support_k`` most likely tokens and renormalised."""
    probs = target_probs(logits.unsqueeze(0), params)[0]
    order = sorted(range(probs.shape[0]), key=lambda i: -float(probs[i]))[:support_k]
    kept = probs[order]
    return order, kept / kept.sum()


class CountingDrafter(CachedDrafter):
    """Logits are a fixed function of the whole sequence; forward passes and truncations are logged."""

    backend = "torch"

    def __init__(self) -> None:
        super().__init__()
        self.cache: list[int] = []
        self.passes: list[tuple[int, list[int]]] = []
        self.truncations: list[int] = []

    @property
    def vocab_size(self) -> int:
        return 50

    def _forward(self, token_ids: list[int], start: int) -> torch.Tensor:
        assert start == len(self.cache), "fed at the wrong position"
        self.cache.extend(token_ids)
        self.passes.append((start, list(token_ids)))
        return self.logits_after(self.cache)

    @staticmethod
    def logits_after(sequence: list[int]) -> torch.Tensor:
        seed = hash(tuple(sequence)) % (2**31)
        return torch.randn(50, generator=torch.Generator().manual_seed(seed)) * 4

    def _truncate(self, length: int) -> None:
        del self.cache[length:]
        self.truncations.append(length)


class FeedingAheadDrafter(CountingDrafter):
    """The same logits, from a backend that gives every fed token's (as the torch and ORT GenAI ones do)."""

    feeds_ahead = True

    def _forward_all(self, token_ids: list[int], start: int) -> torch.Tensor:
        self._forward(token_ids, start)
        return torch.stack([self.logits_after(self.cache[: start + i + 1]) for i in range(len(token_ids))])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_p=0.95),
    SamplingParams(temperature=1.3, top_k=40, top_p=0.9),
    SamplingParams(temperature=1.0, top_k=5),
])
def test_propose_samples_each_draft_from_its_sent_proposal_with_the_position_stream(params):
    """Every draft row is the proposal of the logits at that prefix, and each token is the draw of
    ``position_generator(seed, n, DRAFT_STREAM)`` from that row, n being the token's absolute position."""
    drafter, seed, support = CountingDrafter(), 21, 8
    prompt = [3, 1, 4, 1, 5]
    drafter.prefill(prompt)
    drafted = drafter.propose(drafter.tokens(), 6, params, support, seed=seed)
    assert len(drafted.tokens) == 6 and drafted.proposal.ids.shape == (6, support)
    sequence = list(prompt)
    for row, token in enumerate(drafted.tokens):
        ids, probs = reference_proposal(CountingDrafter.logits_after(sequence), params, support)
        kept = int((probs > 0).sum())  # past the nucleus the order of the zero-probability tail is arbitrary
        assert drafted.proposal.ids[row, :kept].tolist() == ids[:kept]
        torch.testing.assert_close(drafted.proposal.probs[row], probs)
        draw = int(torch.multinomial(probs, 1, generator=position_generator(seed, len(sequence), DRAFT_STREAM)))
        assert token == ids[draw], f"draft {row} was not drawn from its own stream"
        sequence.append(token)
    assert drafter.tokens() == sequence
    # The same prefix and seed give the same drafts however the rounds are split.
    again = CountingDrafter()
    again.prefill(prompt)
    split = again.propose(again.tokens(), 2, params, support, seed=seed).tokens + again.propose(
        again.tokens(), 4, params, support, seed=seed).tokens
    assert split == drafted.tokens


def test_greedy_propose_takes_the_argmax_and_stops_after_a_stop_token():
    drafter = CountingDrafter()
    drafter.prefill([7, 7, 2])
    sequence = [7, 7, 2]
    expected = []
    for _ in range(5):
        expected.append(int(CountingDrafter.logits_after(sequence).argmax()))
        sequence.append(expected[-1])
    drafted = drafter.propose(drafter.tokens(), 5, SamplingParams(temperature=0.0), 8, seed=0)
    assert drafted.tokens == expected and drafted.proposal is None
    drafter.rollback(3)
    stopped = drafter.propose(drafter.tokens(), 5, SamplingParams(temperature=0.0), 8, seed=0, stop={expected[1]})
    assert stopped.tokens == expected[:2] and drafter.token_count == 5


def test_tokens_are_fed_lazily_and_a_verdict_costs_one_short_pass():
    drafter = CountingDrafter()
    drafter.prefill([1, 2, 3, 4])
    assert drafter.passes == []  # nothing runs before logits are needed
    drafted = drafter.propose(drafter.tokens(), 4, SamplingParams(temperature=1.0), 8, seed=1)
    assert [p[0] for p in drafter.passes] == [0, 4, 5, 6]  # the prompt, then one pass per draft
    # Verdict: two drafts kept, then the verifier's token.
    drafter.rollback(6)
    drafter.append([9])
    drafter.passes.clear()
    drafter.next_logits()
    assert drafter.passes == [(6, [9])]  # the kept drafts are cached already: only the new token runs
    assert drafter.tokens() == [1, 2, 3, 4, *drafted.tokens[:2], 9]
    assert drafter.cache == drafter.tokens()


def test_rolling_back_to_a_length_already_seen_reuses_its_logits():
    drafter = CountingDrafter()
    drafter.prefill([5, 6, 7])
    before = drafter.next_logits().clone()
    drafter.propose(drafter.tokens(), 3, SamplingParams(temperature=0.0), 8, seed=0)
    drafter.rollback(3)
    drafter.passes.clear()
    assert torch.equal(drafter.next_logits(), before) and drafter.passes == []
    assert drafter.cache == [5, 6, 7]


def test_reset_and_prefill_of_a_new_prompt():
    drafter = CountingDrafter()
    drafter.prefill([5, 6, 7])
    drafter.next_logits()
    drafter.prefill([5, 8])  # shares one token: the cache keeps it
    drafter.next_logits()
    assert drafter.passes[-1] == (1, [8]) and drafter.cache == [5, 8]
    drafter.reset()
    assert drafter.token_count == 0 and drafter.cache == []
    with pytest.raises(ValueError, match="prefill a prompt first"):
        drafter.next_logits()


def test_rolling_back_into_the_prompt_reruns_only_the_last_kept_token():
    drafter = CountingDrafter()
    drafter.prefill([5, 6, 7, 8])
    drafter.next_logits()
    drafter.rollback(2)
    drafter.passes.clear()
    fresh = CountingDrafter()
    fresh.prefill([5, 6])
    assert torch.equal(drafter.next_logits(), fresh.next_logits())
    assert drafter.passes == [(1, [6])] and drafter.cache == [5, 6]


def test_propose_reconciles_the_drafters_cache_with_the_prefix_it_is_handed():
    drafter = CountingDrafter()
    drafted = drafter.propose([1, 2, 3, 4], 4, SamplingParams(temperature=1.0), 8, seed=1)
    verdict = [1, 2, 3, 4, *drafted.tokens[:2], 9]  # two drafts kept, then the verifier's token
    drafter.passes.clear()
    again = drafter.propose(verdict, 2, SamplingParams(temperature=0.0), 8, seed=0)
    assert drafter.passes[0] == (6, [9])  # the common prefix stays cached: only the new token runs first
    assert drafter.tokens() == [*verdict, *again.tokens] and drafter.cache[:7] == verdict


def guessing(expected: list[int], asked: list | None = None):
    """A guess that expects the drafts to be ``expected`` (what it offers while they are); logs its calls."""

    def guess(drafts):
        if asked is not None:
            asked.append(list(drafts))
        return expected[len(drafts):] if list(drafts) == expected[: len(drafts)] else []

    return guess


def drafts_and_passes(drafter: CountingDrafter, expected: list[int], params: SamplingParams, gamma: int = 6):
    drafter.prefill([3, 1, 4, 1, 5])
    drafter.next_logits()
    drafter.append([9])  # the verifier's token: the round's first forward feeds it
    drafter.passes.clear()
    drafted = drafter.propose(drafter.tokens(), gamma, params, 8, seed=21, guess=guessing(expected))
    return drafted, list(drafter.passes)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_p=0.95), SamplingParams(temperature=0.0)])
def test_a_guess_that_comes_true_saves_the_forwards_and_changes_no_draft(params):
    plain, plain_passes = drafts_and_passes(CountingDrafter(), [], params)
    assert len(plain_passes) == 6
    guess = plain.tokens[:4]  # the lookup guessed the first four drafts right, the fifth not
    drafted, passes = drafts_and_passes(FeedingAheadDrafter(), [*guess, (plain.tokens[4] + 1) % 50], params)
    assert drafted.tokens == plain.tokens
    if plain.proposal is not None:
        torch.testing.assert_close(drafted.proposal.probs, plain.proposal.probs)
        assert torch.equal(drafted.proposal.ids, plain.proposal.ids)
    # One forward feeds the verifier's token and the five guesses; drafts 2-5 read their logits from it;
    # the wrong fifth guess is cut and the drawn fifth draft runs, and the sixth needs one more.
    assert passes[0] == (5, [9, *guess, (plain.tokens[4] + 1) % 50])
    assert passes[1:] == [(10, [plain.tokens[4]])] and len(passes) == 2
    assert drafted.looked_ahead == 4


def test_a_wrong_guess_costs_one_wider_forward_and_changes_no_draft():
    params = SamplingParams(temperature=0.7, top_p=0.95)
    plain, _ = drafts_and_passes(CountingDrafter(), [], params)
    wrong = [(token + 1) % 50 for token in plain.tokens[:3]]
    drafter = FeedingAheadDrafter()
    drafted, passes = drafts_and_passes(drafter, wrong, params)
    assert drafted.tokens == plain.tokens and drafted.looked_ahead == 0
    assert passes[0] == (5, [9, *wrong]) and len(passes) == 6
    assert drafter.cache == drafter.tokens()[:-1]  # the wrong guesses were cut; the last draft is not fed yet


def test_guesses_fed_ahead_outlive_a_prefill_that_only_confirms_the_sequence():
    """Drafting ahead proposes one token at a time (to stop between tokens): the guesses fed with the first
    stay cached while the tokens drawn equal them."""
    params = SamplingParams(temperature=0.7, top_p=0.95)
    plain, _ = drafts_and_passes(CountingDrafter(), [], params, gamma=4)
    drafter = FeedingAheadDrafter()
    drafter.prefill([3, 1, 4, 1, 5, 9])
    drafter.next_logits()
    drafter.passes.clear()
    sequence, drawn, pieces, asked = drafter.tokens(), [], [], []
    guess = guessing(plain.tokens, asked)

    def round_guess(drafts):  # as drafting ahead asks: the round's drafts so far, then the piece's
        return guess([*drawn, *drafts])

    for _ in range(4):
        piece = drafter.propose(sequence, 1, params, 8, seed=21, guess=round_guess)
        pieces.append(piece)
        drawn.extend(piece.tokens)
        sequence += piece.tokens
    assert drawn == plain.tokens
    # The first draft's logits were remembered; the second's forward feeds the first draft and the guesses.
    assert drafter.passes == [(6, plain.tokens)]
    assert [piece.looked_ahead for piece in pieces] == [0, 0, 1, 1]  # the drafts read after a guess
    assert asked == [plain.tokens[:1]]  # asked only where a forward was to run


def test_a_backend_that_gives_only_the_last_logits_ignores_the_guess():
    params = SamplingParams(temperature=0.7, top_p=0.95)
    plain, plain_passes = drafts_and_passes(CountingDrafter(), [], params)
    drafted, passes = drafts_and_passes(CountingDrafter(), plain.tokens, params)
    assert drafted.tokens == plain.tokens and passes == plain_passes and drafted.looked_ahead == 0


class LastLogitsOnly(FeedingAheadDrafter):
    """A model built to output its last token's logits only, whatever it is fed (some exported graphs)."""

    def _forward_all(self, token_ids: list[int], start: int) -> torch.Tensor:
        return super()._forward_all(token_ids, start)[-1:]


def test_a_model_that_outputs_the_last_logits_only_drafts_without_the_guess(caplog):
    params = SamplingParams(temperature=0.7, top_p=0.95)
    plain, _ = drafts_and_passes(CountingDrafter(), [], params)
    drafter = LastLogitsOnly()
    drafted, passes = drafts_and_passes(drafter, plain.tokens, params)
    assert drafted.tokens == plain.tokens and drafted.looked_ahead == 0 and not drafter.feeds_ahead
    assert passes[1] == (5, [9]) and len(passes) == 7  # the guess was cut, then one forward per draft
    assert "gives the logits of the last token it is fed only" in caplog.text
