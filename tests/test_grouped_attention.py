"""Grouped-query attention on a CPU without repeated key/value heads gives transformers' own logits.

The batched verifier on a CPU runs its target's attention through ``grouped_sdpa`` (daemon/grouped_attention.py).
Real tiny Llama and Qwen2 models with grouped heads, made here: the switched model against a copy left on
transformers' SDPA path, over a whole sequence, over a cached continuation of several tokens (the mask
transformers builds itself), and over the engine's own padded batches (its 4D mask).
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from specd.daemon.engine import Engine, EngineLimits
from specd.daemon.grouped_attention import use_grouped_sdpa
from specd.daemon.kv_backends import _cache_kwarg
from specd.daemon.kv_slots import GROUPED_SDPA, BatchRow
from specd.daemon.target import TargetModel
from tests.tiny_models import TINY_VOCAB, tiny_tokenizer

SIZES = dict(vocab_size=TINY_VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512, attn_implementation="sdpa")


def _pair(kind: str):
    torch.manual_seed(5)
    config = (LlamaConfig if kind == "llama" else Qwen2Config)(**SIZES, bos_token_id=1, eos_token_id=2)
    model = (LlamaForCausalLM if kind == "llama" else Qwen2ForCausalLM)(config).eval()
    reference = copy.deepcopy(model)
    assert use_grouped_sdpa(model, torch.device("cpu")) and model.config._attn_implementation == GROUPED_SDPA
    assert reference.config._attn_implementation == "sdpa"
    return model, reference


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_switched_model_gives_transformers_logits_with_and_without_a_cache(kind):
    model, reference = _pair(kind)
    ids = torch.randint(3, TINY_VOCAB, (2, 40))
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)
        # a cached continuation of several tokens: the mask transformers builds for SDPA
        caches = DynamicCache(config=model.config), DynamicCache(config=reference.config)
        name = _cache_kwarg(model)
        model(ids[:, :30], **{name: caches[0]})
        reference(ids[:, :30], **{name: caches[1]})
        got = model(ids[:, 30:], **{name: caches[0]}).logits
        want = reference(ids[:, 30:], **{name: caches[1]}).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_the_engines_padded_batches_match_transformers_sdpa():
    model, reference = _pair("llama")
    target = TargetModel(model, tiny_tokenizer(), name="tiny", device=torch.device("cpu"), dtype=torch.float32)
    engine = Engine.create(target, EngineLimits(max_sessions=3, slot_len=96, max_batch_tokens=256,
                                                goodput_budget=False), ThreadPoolExecutor(max_workers=1))
    backend = engine.backend
    histories = [torch.randint(3, TINY_VOCAB, (n,)).tolist() for n in (50, 12, 31)]
    for slot, history in enumerate(histories):
        backend.forward([BatchRow(slot=slot, start=0, ids=history)], [0])
    queries = [[5, 6, 7, 8], [9], [10, 11]]  # rows padded to the widest
    logits = backend.forward([BatchRow(slot=s, start=len(h), ids=q)
                              for s, (h, q) in enumerate(zip(histories, queries, strict=True))], [4, 1, 2])
    with torch.inference_mode():
        for got, history, query in zip(logits, histories, queries, strict=True):
            want = reference(torch.tensor([history + query])).logits[0, -len(query):]
            assert torch.allclose(got, want, atol=1e-5)


def test_a_gpu_or_an_eager_model_keeps_transformers_path():
    torch.manual_seed(5)
    eager = LlamaForCausalLM(LlamaConfig(**(SIZES | {"attn_implementation": "eager"}))).eval()
    assert not use_grouped_sdpa(eager, torch.device("cpu")) and eager.config._attn_implementation == "eager"
    sdpa = LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    assert not use_grouped_sdpa(sdpa, torch.device("cuda")) and sdpa.config._attn_implementation == "sdpa"
