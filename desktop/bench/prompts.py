"""The built-in diverse prompt set of the original test runner: 10 prompts in 4 categories."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BenchPrompt:
    id: str
    category: str
    text: str


PROMPTS: tuple[BenchPrompt, ...] = (
    BenchPrompt("ai-attention", "AI and technology",
                "Explain in simple terms how the attention mechanism in a transformer works."),
    BenchPrompt("sci-crispr", "scientific discoveries",
                "Describe how CRISPR gene editing was discovered and why it matters."),
    BenchPrompt("code-palindrome", "programming tasks",
                "Write a Python function that checks whether a string is a palindrome, with a short explanation."),
    BenchPrompt("gk-seasons", "general knowledge",
                "Why does the Earth have seasons? Answer in a few sentences."),
    BenchPrompt("ai-edge", "AI and technology",
                "What are the advantages of running AI models on a laptop instead of in the cloud?"),
    BenchPrompt("sci-penicillin", "scientific discoveries",
                "Tell the story of how Alexander Fleming discovered penicillin."),
    BenchPrompt("code-sql", "programming tasks",
                "Write an SQL query that returns the ten customers with the highest total order value."),
    BenchPrompt("gk-rome", "general knowledge",
                "Give a short overview of the history of ancient Rome."),
    BenchPrompt("sci-black-holes", "scientific discoveries",
                "How did astronomers first capture an image of a black hole?"),
    BenchPrompt("code-sorting", "programming tasks",
                "Compare quicksort and merge sort: how they work and when to use each."),
)

CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(p.category for p in PROMPTS))


def select_prompts(count: int) -> list[BenchPrompt]:
    """The first ``count`` prompts (1–10); the order interleaves categories, so any count of 4 or more
    covers all four."""
    if not 1 <= count <= len(PROMPTS):
        raise ValueError(f"--num-prompts must be between 1 and {len(PROMPTS)}, got {count}")
    return list(PROMPTS[:count])
