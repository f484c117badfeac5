"""Conversations that last: a SQLite store in the per-user data folder, with search and export.

No Qt here, so the chat window, the CLI and a local API can all use the same store.
"""

from specd.desktop.conversations.store import (
    Conversation,
    ConversationStore,
    Message,
    SearchHit,
    Segment,
    StoreError,
    default_store_path,
)

__all__ = ["Conversation", "ConversationStore", "Message", "SearchHit", "Segment", "StoreError",
           "default_store_path"]
