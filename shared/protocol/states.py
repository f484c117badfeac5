"""Every state and transition of both roles, as data (docs/protocol.md §8 draws the same tables).

``transition`` is the only way either session changes state, so a move this table does not list is a
bug in the caller (the server) or a protocol violation by the peer (the client); the sessions turn it
into the fitting error. Nothing here knows which side it plays.
"""

from __future__ import annotations

from enum import Enum


class ServerState(Enum):
    AWAIT_HELLO = "await_hello"
    READY = "ready"
    SPECULATING = "speculating"
    STREAMING = "streaming"
    STREAMING_CHUNK = "streaming_chunk"  # a speculative request streaming tokens the client asked for
    CLOSED = "closed"


class ClientState(Enum):
    NEW = "new"
    HELLO_SENT = "hello_sent"
    READY = "ready"
    ACTIVE = "active"
    CLOSED = "closed"


class ServerTrigger(Enum):
    HELLO = "hello"  # a valid hello: the fingerprint and version match
    START_SPECULATIVE = "start(speculative)"  # a start that passed its checks
    START_CLOUD = "start(cloud)"
    STREAM = "stream"  # a stream that passed its checks (a speculative request's next tokens, or more of them)
    CHUNK_STREAMED = "chunk_streamed"  # every token a stream asked for was sent; drafts are taken again
    END = "end"  # the request ended: finished, cancelled, or an error naming it
    FATAL = "fatal"  # a fatal error was sent
    CLOSE = "close"  # the driver closed the connection


class ClientTrigger(Enum):
    HELLO = "hello"  # hello sent
    WELCOME = "welcome"
    START = "start"
    END = "end"  # finished verdict or tokens, cancelled, or an error naming the request
    FATAL = "fatal"  # a fatal error was received


SERVER_TRANSITIONS: dict[tuple[ServerState, ServerTrigger], ServerState] = {
    (ServerState.AWAIT_HELLO, ServerTrigger.HELLO): ServerState.READY,
    (ServerState.READY, ServerTrigger.START_SPECULATIVE): ServerState.SPECULATING,
    (ServerState.READY, ServerTrigger.START_CLOUD): ServerState.STREAMING,
    (ServerState.SPECULATING, ServerTrigger.END): ServerState.READY,
    (ServerState.STREAMING, ServerTrigger.END): ServerState.READY,
    (ServerState.SPECULATING, ServerTrigger.STREAM): ServerState.STREAMING_CHUNK,
    (ServerState.STREAMING_CHUNK, ServerTrigger.STREAM): ServerState.STREAMING_CHUNK,
    (ServerState.STREAMING_CHUNK, ServerTrigger.CHUNK_STREAMED): ServerState.SPECULATING,
    (ServerState.STREAMING_CHUNK, ServerTrigger.END): ServerState.READY,
    **{(state, event): ServerState.CLOSED for state in ServerState
       for event in (ServerTrigger.FATAL, ServerTrigger.CLOSE)},
}

CLIENT_TRANSITIONS: dict[tuple[ClientState, ClientTrigger], ClientState] = {
    (ClientState.NEW, ClientTrigger.HELLO): ClientState.HELLO_SENT,
    (ClientState.HELLO_SENT, ClientTrigger.WELCOME): ClientState.READY,
    (ClientState.READY, ClientTrigger.START): ClientState.ACTIVE,
    (ClientState.ACTIVE, ClientTrigger.END): ClientState.READY,
    **{(state, ClientTrigger.FATAL): ClientState.CLOSED for state in ClientState},
}


class InvalidTransition(Exception):
    """``event`` is not allowed in ``state``."""


def server_transition(state: ServerState, event: ServerTrigger) -> ServerState:
    try:
        return SERVER_TRANSITIONS[state, event]
    except KeyError:
        raise InvalidTransition(f"server: {event.value} is not allowed in {state.value}") from None


def client_transition(state: ClientState, event: ClientTrigger) -> ClientState:
    try:
        return CLIENT_TRANSITIONS[state, event]
    except KeyError:
        raise InvalidTransition(f"client: {event.value} is not allowed in {state.value}") from None
