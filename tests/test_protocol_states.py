"""docs/protocol.md §8 draws the transition tables of shared/protocol/states.py; they must agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from specd.shared.protocol import states

DOC = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text(encoding="utf-8")
SECTION = DOC[DOC.index("## 8. State machines"):DOC.index("## 9.")]
ROW = re.compile(r"^\| (\w+) \| `([^`]+)` \| (\w+) \|$", flags=re.MULTILINE)


def _documented(heading: str, state_type: type, trigger_type: type) -> dict:
    part = SECTION[SECTION.index(heading):]
    part = part[: part.find("\n### ", 1) if "\n### " in part[1:] else len(part)]
    table = {}
    for source, trigger, target in ROW.findall(part):
        sources = list(state_type) if source == "any" else [state_type[source]]
        for state in sources:
            table[state, trigger_type(trigger)] = state_type[target]
    return table


@pytest.mark.parametrize("heading,code,state_type,trigger_type", [
    ("### Server", states.SERVER_TRANSITIONS, states.ServerState, states.ServerTrigger),
    ("### Client", states.CLIENT_TRANSITIONS, states.ClientState, states.ClientTrigger),
], ids=["server", "client"])
def test_documented_transitions_are_the_table_in_code(heading, code, state_type, trigger_type):
    assert _documented(heading, state_type, trigger_type) == code


def test_a_move_the_table_does_not_list_is_refused():
    with pytest.raises(states.InvalidTransition, match="start"):
        states.client_transition(states.ClientState.ACTIVE, states.ClientTrigger.START)
    with pytest.raises(states.InvalidTransition, match="end"):
        states.server_transition(states.ServerState.READY, states.ServerTrigger.END)
