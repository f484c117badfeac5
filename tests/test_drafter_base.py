"""The shared drafter machinery: the fast proposal path and the lazily fed, memoised KV cache."""

from __future__ import annotations

import pytest
import torch

from specd.desktop.drafters.base import CachedDrafter, draft_proposal
from specd.shared.sampling import SamplingParams, sparse_proposal


def dense(proposal, vocab: int) -> torch.Tensor:
    return torch.zeros(proposal.ids.shape[0], vocab).scatter_add_(1, proposal.ids, proposal.probs)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_p=0.95),
    SamplingParams(temperature=1.0, top_p=0.5),
    SamplingParams(temperature=1.3, top_k=40, top_p=0.9),
    SamplingParams(temperature=0.2, top_p=0.99),
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.0),
])
@pytest.mark.parametrize("vocab", [64, 49152])
def test_draft_proposal_equals_the_shared_sparse_proposal(params, vocab):
    generator = torch.Generator().manual_seed(vocab)
    for scale in (0.5, 3.0, 12.0):  # flat to peaked distributions
        logits = torch.randn(1, vocab, generator=generator) * scale
        fast, reference = draft_proposal(logits, params, 32), sparse_proposal(logits, params, 32)
        torch.testing.assert_close(dense(fast, vocab), dense(reference, vocab), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(fast.probs.sum(dim=-1), torch.ones(1))


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
        seed = hash(tuple(self.cache)) % (2**31)
        return torch.randn(50, generator=torch.Generator().manual_seed(seed)) * 4

    def _truncate(self, length: int) -> None:
        del self.cache[length:]
        self.truncations.append(length)


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
