"""A process that streams an answer into a conversation store forever, saying after each committed
piece how many it has committed (the kill test reads that and then SIGKILLs it)."""

from __future__ import annotations

import sys

from specd.desktop.conversations import ConversationStore

PIECE_SOURCES = ("draft", "draft", "target")


def piece(i: int) -> tuple[str, str, list[int]]:
    return f"word{i} ", PIECE_SOURCES[i % 3], [i, i + 1]


def main(path: str) -> None:
    store = ConversationStore(path)
    conversation = store.create(system_prompt="Be brief.")
    store.add_message(conversation, "user", "Tell me a long story")
    answer = store.begin_answer(conversation)
    print(f"answer {answer}", flush=True)
    i = 0
    while True:
        text, source, ids = piece(i)
        store.append_piece(answer, text, source, ids)
        i += 1
        print(f"committed {i}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
