"""The speculative session as sans-I/O state machines, one module per role (in the spirit of h11).

``server`` is the verifier's half, ``client`` the edge's, ``states`` every transition of both as a
table, ``codec`` the proposal bytes and prefix comparison, ``ratelimit`` the message-rate bucket. No
module here does I/O or imports torch: ``daemon/`` and ``desktop/`` move the frames and run the
models. docs/protocol.md describes the same machines; a third-party client can be written from it.
"""

from specd.shared.protocol.client import (
    ClientEvent,
    ClientSession,
    RequestCancelled,
    RequestStarted,
    RoundDiscarded,
    RoundVerdict,
    ServerFailed,
    TokensStreamed,
    Welcomed,
)
from specd.shared.protocol.codec import NO_PROPOSAL, WireProposal, common_prefix, proposal_bytes
from specd.shared.protocol.ratelimit import RateLimiter
from specd.shared.protocol.server import (
    CancelRequested,
    Close,
    DraftReceived,
    Send,
    ServerAction,
    ServerSession,
    StartRequested,
    StreamRequested,
)
from specd.shared.protocol.states import ClientState, InvalidTransition, ServerState

__all__ = [
    "NO_PROPOSAL", "CancelRequested", "ClientEvent", "ClientSession", "ClientState", "Close", "DraftReceived",
    "InvalidTransition", "RateLimiter", "RequestCancelled", "RequestStarted", "RoundDiscarded", "RoundVerdict",
    "Send", "ServerAction", "ServerFailed", "ServerSession", "ServerState", "StartRequested", "StreamRequested",
    "TokensStreamed", "Welcomed", "WireProposal", "common_prefix", "proposal_bytes",
]
