"""The benchmark's built-in prompt sets (``specd bench --prompts``): ``standard``, the original test
runner's 10 diverse prompts in 4 categories, and ``copy``, work whose answer repeats text the conversation
already holds (code edits, corrections of a given paragraph, questions answered from a given text, a
follow-up quoting the previous answer), where drafts looked up in the context cost nothing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BenchPrompt:
    id: str
    category: str
    text: str
    history: tuple[tuple[str, str], ...] = ()  # earlier turns, (role, content), before ``text``
    prompt_set: str = "standard"

    def conversation(self) -> list[dict[str, str]]:
        return [*({"role": role, "content": content} for role, content in self.history),
                {"role": "user", "content": self.text}]


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

_FUNCTION = """def average(values):
    total = 0
    for v in values:
        total = total + v
    return total / len(values)"""
_PARAGRAPH = ("The comittee met on tuesday to discus the new budjet. After a long debate, they desided to "
              "increase the funding for the libary and to reduce the spending on office suplies. The chair "
              "thanked every member for there hard work.")
_TEXT = ("Harbor Lane Bakery opened in 1987 on the corner of Harbor Lane and Fifth Street. It was founded by "
         "Maria Costa, who moved to the city from Lisbon. The bakery is best known for its almond croissants "
         "and its sourdough bread, which is baked every morning at four o'clock. In 2015 the bakery expanded "
         "into the building next door and added a small cafe with twelve tables.")
_TIPS = ("Here are three tips for better sleep:\n\n1. Go to bed and wake up at the same time every day, even "
         "on weekends.\n2. Keep your bedroom cool, dark and quiet.\n3. Avoid screens and caffeine in the hour "
         "before bed.")

COPY_PROMPTS: tuple[BenchPrompt, ...] = (
    BenchPrompt("edit-rename", "code edits",
                f"Rename the variable `v` to `value` in this Python function and show the whole function:\n\n"
                f"```python\n{_FUNCTION}\n```", prompt_set="copy"),
    BenchPrompt("fix-spelling", "corrections",
                f"Correct the spelling mistakes in this paragraph and write it out in full:\n\n{_PARAGRAPH}",
                prompt_set="copy"),
    BenchPrompt("text-question", "questions from a text",
                f"Read this text:\n\n{_TEXT}\n\nWhat is the bakery best known for, and when is its bread baked? "
                "Answer with sentences from the text.", prompt_set="copy"),
    BenchPrompt("follow-up-quote", "follow-ups",
                "Repeat your previous answer word for word, then add a fourth tip.",
                history=(("user", "Give me three tips for sleeping better."), ("assistant", _TIPS)),
                prompt_set="copy"),
    BenchPrompt("edit-docstring", "code edits",
                f"Add a docstring to this Python function and show the whole function:\n\n"
                f"```python\n{_FUNCTION}\n```", prompt_set="copy"),
    BenchPrompt("text-summary-quote", "questions from a text",
                f"Read this text:\n\n{_TEXT}\n\nWho founded the bakery and where did she come from? Quote the "
                "text.", prompt_set="copy"),
)

PROMPT_SETS: dict[str, tuple[BenchPrompt, ...]] = {"standard": PROMPTS, "copy": COPY_PROMPTS}


def select_prompts(count: int, sets: tuple[str, ...] = ("standard",)) -> list[BenchPrompt]:
    """The first ``count`` prompts (1–10) of each of ``sets`` (all of a smaller set); the standard order
    interleaves categories, so any count of 4 or more covers all four."""
    if not 1 <= count <= len(PROMPTS):
        raise ValueError(f"--num-prompts must be between 1 and {len(PROMPTS)}, got {count}")
    unknown = [name for name in sets if name not in PROMPT_SETS]
    if unknown:
        raise ValueError(f"unknown prompt set {unknown[0]!r}; choose from {', '.join(PROMPT_SETS)}")
    return [prompt for name in dict.fromkeys(sets) for prompt in PROMPT_SETS[name][:count]]
