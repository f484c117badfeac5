"""The limits the verifier announces: the configured ones, fitted to the model it loaded.

A model's context (``max_position_embeddings``) caps ``max_total_tokens``, and the prompt limit
``max_input_tokens`` must stay below the total. Whatever set the smaller value (a flag, the config
file, the model), the larger one is capped with a warning of one shape that names where each value
came from; the verifier refuses neither, so a flag and a small model behave alike.
"""

from __future__ import annotations

from collections.abc import Callable

from specd.shared import messages as m
from specd.shared.config import LimitsConfig
from specd.shared.config_origins import Origins


def effective_limits(lim: LimitsConfig, origins: Origins, *, max_positions: int, vocab_size: int,
                     warn: Callable[[str], None]) -> m.Limits:
    """The limits for the Welcome; ``max_positions`` is the model's context (0: unknown)."""
    total, total_text = lim.max_total_tokens, origins.describe("limits.max_total_tokens", lim.max_total_tokens)
    if max_positions and total > max_positions:
        warn(f"{total_text} exceeds the model's context of {max_positions} positions; using {max_positions}")
        total, total_text = max_positions, f"the model's context of {max_positions} positions"
    max_input = lim.max_input_tokens
    if max_input >= total:
        warn(f"{origins.describe('limits.max_input_tokens', max_input)} is not below {total_text}; "
             f"using {total - 1}")
        max_input = total - 1
    return m.Limits(max_input_tokens=max_input, max_total_tokens=total, max_draft=lim.max_draft,
                    max_support=min(lim.max_support, vocab_size), max_frame_bytes=lim.max_frame_bytes,
                    max_messages_per_second=lim.max_messages_per_second, idle_timeout_s=lim.idle_timeout_s,
                    max_stream_tokens=total)
