"""At temperature 0, speculative decoding emits exactly the target's own greedy tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from specd.shared.sampling import verify_greedy


@torch.no_grad()
def speculative_greedy(target, draft, prompt: list[int], *, max_new_tokens: int, gamma: int,
                       eos: set[int]) -> tuple[list[int], int]:
    """Greedy speculative decoding in one process (no caches: clarity over speed); returns the
    generated ids and the number of target forwards it took."""
    seq = list(prompt)
    forwards = 0
    while len(seq) - len(prompt) < max_new_tokens:
        drafts: list[int] = []
        for _ in range(gamma):
            drafts.append(int(draft(torch.tensor([seq + drafts])).logits[0, -1].argmax()))
        logits = target(torch.tensor([seq + drafts])).logits[0, len(seq) - 1:]
        forwards += 1
        result = verify_greedy(torch.tensor(drafts), logits)
        for token in [*drafts[: result.accepted], result.token]:
            seq.append(token)
            if token in eos or len(seq) - len(prompt) == max_new_tokens:
                return seq[len(prompt):], forwards
    return seq[len(prompt):], forwards


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0])
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def forwards_needed(draft, prompt: list[int], expected: list[int], gamma: int) -> int:
    """Target forwards greedy speculation must take to emit ``expected`` (the target's own output): a round
    keeps the draft's greedy tokens while they match ``expected`` (at most γ), plus one from the target.
    While they match, the draft reads ``prompt + expected[:j]``, so one forward gives every prediction."""
    logits = draft(torch.tensor([prompt + expected])).logits[0, len(prompt) - 1:-1]
    right = (logits.argmax(dim=-1) == torch.tensor(expected)).tolist()  # the draft predicts expected[j]
    done, forwards = 0, 0
    while done < len(expected):
        kept = 0
        while kept < gamma and done + kept < len(expected) and right[done + kept]:
            kept += 1
        done, forwards = done + kept + 1, forwards + 1
    return forwards


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_tiny_model_greedy_equals_generate(tiny_target, tiny_draft, gamma):
    prompt = [1, 9, 33, 4]
    expected = hf_greedy(tiny_target, prompt, 40, eos={2})
    got, forwards = speculative_greedy(tiny_target, tiny_draft, prompt, max_new_tokens=40, gamma=gamma, eos={2})
    assert got == expected
    assert forwards == forwards_needed(tiny_draft, prompt, expected, gamma)


def test_tiny_model_greedy_with_itself_as_draft_needs_few_target_forwards(tiny_target):
    prompt = [1, 9, 33, 4]
    got, forwards = speculative_greedy(tiny_target, tiny_target, prompt, max_new_tokens=40, gamma=4, eos={2})
    assert got == hf_greedy(tiny_target, prompt, 40, eos={2})
    assert forwards == -(-len(got) // 5)  # every draft accepted: γ + 1 = 5 tokens per forward


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_greedy_equals_generate(smollm2_folder):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    target = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    # A cheap, quite different draft: the same model cut to its first 8 of 30 layers.
    draft = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    draft.model.layers = draft.model.layers[:8]
    draft.config.num_hidden_layers = 8
    messages = [{"role": "user", "content": "Name three uses of copper."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    eos = {tokenizer.eos_token_id}
    expected = hf_greedy(target, prompt, 24, eos)
    got, _ = speculative_greedy(target, draft, prompt, max_new_tokens=24, gamma=4, eos=eos)
    assert got == expected
    assert len(tokenizer.decode(got).split()) > 3
