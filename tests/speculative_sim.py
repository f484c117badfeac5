"""Batched simulation of speculative sampling on tiny models, for the statistical tests.

Thousands of independent requests run side by side through the real draft model, the real target
model and the real :func:`verify_round`, so the χ² tests measure the very code the verifier runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from scipy import stats

from specd.shared.sampling import (
    ProposalDistribution,
    RoundResult,
    SamplingParams,
    sparse_proposal,
    target_probs,
    verify_round,
)

Verifier = Callable[[torch.Tensor, ProposalDistribution, torch.Tensor, torch.Generator], RoundResult]


@torch.no_grad()
def next_probs(model: torch.nn.Module, seqs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Target-transformed next-token distributions ``[B, V]`` after each sequence."""
    return target_probs(model(seqs).logits[:, -1], params)


@torch.no_grad()
def speculative_first_tokens(target, draft, prompt: list[int], *, k: int, gamma: int, params: SamplingParams,
                             support_k: int, samples: int, seed: int,
                             verify: Verifier = verify_round) -> torch.Tensor:
    """Run ``samples`` speculative requests until each emitted ``k`` tokens; returns ``[samples, k]``."""
    generator = torch.Generator().manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in range(samples)]
    pending = list(range(samples))
    while pending:
        # Requests that emitted the same number of tokens share a length: run them as one batch.
        groups: dict[int, list[int]] = {}
        for i in pending:
            groups.setdefault(len(outputs[i]), []).append(i)
        for done, members in groups.items():
            seqs = torch.tensor([prompt + outputs[i][:done] for i in members])
            base = seqs.shape[1]
            ids, probs = [], []
            for _ in range(gamma):
                proposal = sparse_proposal(draft(seqs).logits[:, -1], params, support_k)
                choice = torch.multinomial(proposal.probs, 1, generator=generator)
                seqs = torch.cat([seqs, proposal.ids.gather(-1, choice)], dim=1)
                ids.append(proposal.ids)
                probs.append(proposal.probs)
            p = target_probs(target(seqs).logits[:, base - 1:], params)
            q_ids, q_probs = torch.stack(ids, dim=1), torch.stack(probs, dim=1)
            for row, i in enumerate(members):
                drafts = seqs[row, base:]
                result = verify(drafts, ProposalDistribution(q_ids[row], q_probs[row]), p[row], generator)
                outputs[i].extend([*drafts[: result.accepted].tolist(), result.token])
        pending = [i for i in pending if len(outputs[i]) < k]
    return torch.tensor([out[:k] for out in outputs])


@torch.no_grad()
def exact_first_two(target, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """The target's exact joint distribution of its first two sampled tokens, ``[V, V]``."""
    p1 = next_probs(target, torch.tensor([prompt]), params)[0]
    vocab = p1.shape[0]
    seqs = torch.cat([torch.tensor([prompt]).expand(vocab, -1), torch.arange(vocab).unsqueeze(1)], dim=1)
    p2 = next_probs(target, seqs, params)
    return p1.unsqueeze(1) * p2


@torch.no_grad()
def exact_third(target, prompt: list[int], params: SamplingParams, joint12: torch.Tensor) -> torch.Tensor:
    """The target's exact marginal distribution of its third token, ``[V]``."""
    vocab = joint12.shape[0]
    first = torch.arange(vocab).repeat_interleave(vocab)
    second = torch.arange(vocab).repeat(vocab)
    seqs = torch.cat([torch.tensor([prompt]).expand(vocab * vocab, -1), first[:, None], second[:, None]], dim=1)
    p3 = torch.cat([next_probs(target, chunk, params) for chunk in seqs.split(1024)])
    return (joint12.reshape(-1, 1) * p3).sum(dim=0)


def chi_square_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Goodness of fit of counts to probabilities; cells expecting < ``min_expected`` are pooled."""
    observed = observed.flatten().double()
    expected = expected_probs.flatten().double() * observed.sum()
    big = expected >= min_expected
    obs = torch.cat([observed[big], observed[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    if exp[-1] < min_expected:  # too little pooled mass to be its own cell: fold it into the largest
        largest = int(exp[:-1].argmax())
        obs[largest] += obs[-1]
        exp[largest] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * (obs.sum() / exp.sum())
    return float(stats.chisquare(obs.numpy(), exp.numpy()).pvalue)


def counts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab)


def pair_counts(first: torch.Tensor, second: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(first * vocab + second, minlength=vocab * vocab)
