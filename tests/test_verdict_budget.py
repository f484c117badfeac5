"""The verdict's goodput-budget fields (docs/protocol.md §3 ``verdict``): ``verified`` drafts were judged (the
rest not judged, not rejected) and ``suggested_gamma``; old clients and old servers still work, and the
client checks the new fields. Sans-I/O, driven with frames."""

from __future__ import annotations

import msgspec
import pytest

from specd.shared import messages as m
from specd.shared import protocol as s
from specd.shared.errors import ProtocolError
from specd.shared.sampling import RoundResult
from tests.test_session import EOS, Pair, _draft_frame, _server


class OldVerdict(msgspec.Struct, tag="verdict", frozen=True):
    """The verdict as clients before the budget decode it (no ``verified``, no ``suggested_gamma``)."""

    request: int
    round: int
    position: int
    accepted: int
    token: int
    finished: bool = False
    reason: str | None = None
    queue_ms: float = 0.0
    forward_ms: float = 0.0


def _verdict_sends(actions) -> list[s.Send]:
    return [a for a in actions if isinstance(a, s.Send) and isinstance(a.message, m.Verdict)]


def test_a_trimmed_round_says_how_many_drafts_were_verified_and_suggests_gamma():
    pair = Pair().ready()
    pair.server.receive(_draft_frame(pair, [7, 8, 9, 10]))
    actions = pair.server.verdict(RoundResult(accepted=2, token=11, bonus=True), verified=2, suggested_gamma=2)
    (send,) = _verdict_sends(actions)
    assert send.message.verified == 2 and send.message.suggested_gamma == 2
    assert m.decode_server(send.data) == send.message  # the driver counts what was encoded
    (event,) = pair.deliver(actions)
    assert event.drafted == 4 and event.verified == 2 and event.accepted == 2 and event.suggested_gamma == 2
    # the two drafts past the verified prefix were not judged: the bonus follows the verified ones
    assert event.new_tokens == [7, 8, 11]
    assert pair.client.committed == pair.server.committed == [1, 5, 6, 7, 8, 11]
    # the next round continues from there on both sides
    actions = pair.server.receive(_draft_frame(pair, [12]))
    assert isinstance(actions[0], s.DraftReceived) and actions[0].draft.position == 6


def test_a_round_verified_to_no_draft_is_one_target_step():
    pair = Pair().ready()
    pair.server.receive(_draft_frame(pair, [7, 8]))
    (event,) = pair.deliver(pair.server.verdict(RoundResult(accepted=0, token=30), verified=0, suggested_gamma=1))
    assert event.verified == 0 and event.new_tokens == [30]
    assert pair.client.committed == pair.server.committed == [1, 5, 6, 30]


def test_an_untrimmed_verdict_says_every_draft_was_verified():
    pair = Pair().ready()
    pair.server.receive(_draft_frame(pair, [7, 8, 9]))
    (send,) = _verdict_sends(pair.server.verdict(RoundResult(accepted=1, token=20)))
    assert send.message.verified == 3 and send.message.suggested_gamma == 0


def test_a_stop_token_inside_a_trimmed_round_still_ends_it():
    pair = Pair().ready()
    pair.server.receive(_draft_frame(pair, [7, EOS, 9, 10]))
    (event,) = pair.deliver(pair.server.verdict(RoundResult(accepted=3, token=12), verified=3))
    assert event.finished and event.verdict.reason == "eos" and event.new_tokens == [7, EOS]
    assert event.verified == 3


def test_an_old_client_reads_the_new_verdict():
    pair = Pair().ready()
    pair.server.receive(_draft_frame(pair, [7, 8, 9]))
    (send,) = _verdict_sends(pair.server.verdict(RoundResult(accepted=1, token=20), verified=2, suggested_gamma=1))
    old = msgspec.msgpack.decode(send.data, type=OldVerdict)  # unknown fields are ignored (§1)
    assert (old.accepted, old.token, old.position) == (1, 20, 3)


def test_a_new_client_reads_an_old_servers_verdict():
    pair = Pair().ready()
    pair.server.receive(_draft_frame(pair, [7, 8, 9]))
    old = msgspec.msgpack.encode(OldVerdict(request=0, round=0, position=3, accepted=3, token=20))
    (event,) = pair.to_client(old)
    assert event.verified == 3 and event.suggested_gamma == 0 and event.new_tokens == [7, 8, 9, 20]


@pytest.mark.parametrize("accepted,verified", [(3, 2), (1, 5)])
def test_the_client_refuses_a_verdict_beyond_what_was_verified_or_sent(accepted, verified):
    pair = Pair().ready()
    pair.server.receive(_draft_frame(pair, [7, 8, 9]))
    frame = m.encode(m.Verdict(request=0, round=0, position=3, accepted=accepted, token=20, verified=verified))
    with pytest.raises(ProtocolError, match="verified"):
        pair.client.receive(frame)


def test_the_server_session_refuses_a_verdict_accepting_unverified_drafts():
    pair = Pair().ready()
    pair.server.receive(_draft_frame(pair, [7, 8, 9]))
    with pytest.raises(RuntimeError, match="verified"):
        pair.server.verdict(RoundResult(accepted=2, token=20), verified=1)


def test_every_frame_the_server_session_sends_carries_its_message():
    """The daemon counts errors and discarded rounds from ``Send.message``, never by decoding frames."""
    pair = Pair()
    sends = [a for a in pair.server.receive(pair.client.hello()) if isinstance(a, s.Send)]
    sends += [a for a in pair.server.receive(b"\x81") if isinstance(a, s.Send)]  # not a message: an error
    sends += [a for a in pair.server.receive(m.encode(m.Draft(request=3, round=0, position=1, parent=1, tokens=[1])))
              if isinstance(a, s.Send)]
    kinds = [type(a.message) for a in sends]
    assert kinds == [m.Welcome, m.Error, m.Error]
    assert all(m.decode_server(a.data) == a.message for a in sends)


def test_the_gamma_controller_caps_an_adaptive_gamma_at_the_verifiers_suggestion():
    from specd.desktop.client.adaptive import GammaController

    controller = GammaController(8)
    for _ in range(20):  # every draft accepted, a slow verifier: γ climbs to the top
        controller.observe_round(drafted=8, accepted=8, draft_ms=1.0, network_ms=50.0, verify_ms=60.0)
    assert controller.choose() == 8
    controller.observe_server_gamma(3)
    assert controller.choose() == 3 and controller.choose(remaining=3) == 2
    controller.observe_server_gamma(0)  # a verdict without a suggestion (an older verifier)
    assert controller.choose() == 8
    fixed = GammaController(8, fixed=6)
    fixed.observe_server_gamma(2)
    assert fixed.choose() == 6  # an explicit γ stays what the user set; the verifier trims if it must


def test_the_welcome_and_every_verdict_state_the_servers_decode_step():
    pair = Pair(server=_server(decode_step_ms=61.25))
    pair.ready()
    assert pair.client.welcome.decode_step_ms == 61.25
    pair.server.receive(_draft_frame(pair, [7, 8]))
    (event,) = pair.deliver(pair.server.verdict(RoundResult(accepted=2, token=9), decode_step_ms=70.5))
    assert event.decode_step_ms == 70.5
    unstated = Pair().ready()  # a server that does not state it
    assert unstated.client.welcome.decode_step_ms == 0.0
    unstated.server.receive(_draft_frame(unstated, [7]))
    (event,) = unstated.deliver(unstated.server.verdict(RoundResult(accepted=1, token=9)))
    assert event.decode_step_ms == 0.0
