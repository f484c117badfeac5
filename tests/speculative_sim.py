"""Batched simulation of speculative sampling on tiny models, for the statistical tests.

Thousands of independent requests run side by side through the real draft model, the real target
model and the real :func:`verify_round`, so the χ² tests measure the very code the verifier runs
(tests/target_law.py holds the target's exact law they are tested against).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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
def speculative_first_tokens(target, draft, prompt: list[int], *, k: int, gamma: int, params: SamplingParams,
                             support_k: int, samples: int, seed: int,
                             verify: Verifier = verify_round) -> torch.Tensor:
    """Run ``samples`` speculative requests until each emitted ``k`` tokens; returns ``[samples, k]``.

    Requests go on past end-of-sequence (the tests ignore what follows it)."""
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
