"""A conversation as Markdown (to read or paste) or as JSON (everything: token ids and provenance).

The JSON form round-trips: :func:`import_json` of :func:`export_json` gives a conversation whose own
export is the same apart from its id and times.
"""

from __future__ import annotations

import json
from typing import Any

from specd.desktop.conversations.store import ConversationStore, Segment, StoreError

FORMAT = "specd-conversation"
FORMAT_VERSION = 1
ROLE_HEADINGS = {"user": "You", "assistant": "specd", "error": "Error"}


def export_markdown(store: ConversationStore, conversation_id: int) -> str:
    conversation = store.conversation(conversation_id)
    out = [f"# {conversation.title or 'Untitled conversation'}", ""]
    if conversation.system_prompt:
        out += ["> **System prompt:** " + conversation.system_prompt.replace("\n", "\n> "), ""]
    for message in store.messages(conversation_id):
        note = f" ({message.status})" if message.status in ("stopped", "error") else ""
        out += [f"## {ROLE_HEADINGS.get(message.role, message.role)}{note}", "", message.text.rstrip(), ""]
    return "\n".join(out).rstrip() + "\n"


def export_json(store: ConversationStore, conversation_id: int) -> dict[str, Any]:
    conversation = store.conversation(conversation_id)
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "id": conversation.id, "title": conversation.title,
        "system_prompt": conversation.system_prompt, "sampling": conversation.sampling,
        "created": conversation.created, "updated": conversation.updated,
        "messages": [{"role": m.role, "text": m.text, "status": m.status, "finish_reason": m.finish_reason,
                      "stats": m.stats, "created": m.created,
                      "segments": [{"text": s.text, "source": s.source, "token_ids": list(s.token_ids)}
                                   for s in m.segments]}
                     for m in store.messages(conversation_id)],
    }


def export_json_text(store: ConversationStore, conversation_id: int) -> str:
    return json.dumps(export_json(store, conversation_id), ensure_ascii=False, indent=1) + "\n"


def import_json(store: ConversationStore, data: dict[str, Any]) -> int:
    """A new conversation from an export; StoreError says what is missing from a file that is not one."""
    if data.get("format") != FORMAT or not isinstance(data.get("messages"), list):
        raise StoreError(f"not a specd conversation export (expected \"format\": \"{FORMAT}\" and a message list)")
    new = store.create(title=str(data.get("title", "")), system_prompt=str(data.get("system_prompt", "")),
                       sampling=dict(data.get("sampling") or {}))
    for message in data["messages"]:
        segments = [Segment(s["text"], s["source"], tuple(s.get("token_ids", ()))) for s in message.get("segments", ())]
        store.add_message(new, message["role"], message.get("text", ""), status=message.get("status", "done"),
                          segments=segments, stats=message.get("stats") or {},
                          finish_reason=message.get("finish_reason", ""))
    return new
