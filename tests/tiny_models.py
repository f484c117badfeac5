"""Tiny random-init Llama models and a matching tokenizer, built in milliseconds for tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_VOCAB = 64


def tiny_config(vocab_size: int = TINY_VOCAB) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_ort_config(vocab_size: int = TINY_VOCAB) -> LlamaConfig:
    """The tiny config shaped for the ONNX Runtime GenAI builder: its attention needs a head size that is a
    multiple of 16 (the shared tiny config has 8), and it mistakes any linear layer with ``vocab_size``
    outputs for the LM head (the shared config's MLP has 64 = vocab_size)."""
    config = tiny_config(vocab_size)
    config.num_attention_heads, config.num_key_value_heads = 2, 1
    config.head_dim = config.hidden_size // config.num_attention_heads
    config.intermediate_size = 96
    return config


def tiny_llama(seed: int, vocab_size: int = TINY_VOCAB, config: LlamaConfig | None = None, *,
               sharpness: float = 8.0) -> LlamaForCausalLM:
    """A tiny Llama whose weights depend only on ``seed``; different seeds give different models."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config or tiny_config(vocab_size)).eval()
    # Random init gives nearly uniform outputs; sharpen them (the LM head times ``sharpness``) so drafts
    # and targets disagree clearly.
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model


def tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """A word-level tokenizer whose ids match the tiny models: ``<unk> <s> </s> w3 … w{V-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<unk>")
    tokenizer.chat_template = (
        "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> {% endif %}"
    )
    return tokenizer


def save_with_tokenizer(model: LlamaForCausalLM, folder):
    """Write a tiny model and its tokenizer as a Hugging Face folder; returns the folder."""
    model.save_pretrained(folder)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def save_tiny_model(folder, seed: int, vocab_size: int = TINY_VOCAB):
    """Write a tiny model and its tokenizer as a Hugging Face folder; returns the folder."""
    return save_with_tokenizer(tiny_llama(seed, vocab_size), folder)


def save_tiny_ort_model(folder, seed: int):
    """Like :func:`save_tiny_model`, with :func:`tiny_ort_config` (the ONNX Runtime GenAI builder takes it)."""
    return save_with_tokenizer(tiny_llama(seed, config=tiny_ort_config()), folder)


def perturbed_llama(model: LlamaForCausalLM, scale: float, seed: int) -> LlamaForCausalLM:
    """A copy of ``model`` with Gaussian noise of ``scale`` times each weight matrix's spread added: a
    draft that agrees with its target often but far from always (its overlap falls as ``scale`` grows)."""
    import copy

    generator = torch.Generator().manual_seed(seed)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for weight in noisy.parameters():
            if weight.dim() > 1:
                weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * scale)
    return noisy
