"""What the status bar, the tray menu's status line and the tray tooltip say, from the app's state.

One short line (``Reconnecting in 4 s… — cannot reach the verifier at 127.0.0.1:8765: … · CPU (torch)``) and a
detail text for tooltips with the whole reason, so a long error never grows the status bar. No Qt here.
"""

from __future__ import annotations

from dataclasses import dataclass

from specd.desktop.ui.idle_reconnect import RetryState

STATE_TEXT = {"connected": "Connected", "local": "Local (draft model only)", "offline": "Offline"}


@dataclass(frozen=True, slots=True)
class AppStatus:
    state: str  # the edge client's: connected | local | offline
    endpoint: str = ""  # host:port of the verifier; "" before a client exists
    url: str = ""
    device: str = ""  # "Intel AI Boost (openvino)"; "" when cloud-only
    cloud_only_reason: str = ""  # why there is no draft model although one was configured
    reason: str = ""  # why the verifier is not connected (the last failure)
    retry: RetryState | None = None
    not_ready: str = ""  # why there is no client at all (its preparation failed)
    latency: str = ""  # handshake or round-trip figure, shown while connected only
    api_in_flight: int | None = None  # requests the local API is answering; None: it is off

    @property
    def phrase(self) -> str:
        if self.not_ready:
            return "Not ready"
        if self.retry is not None and self.state != "connected":
            return self.retry.text
        return STATE_TEXT.get(self.state, self.state)

    def line(self) -> str:
        """While not connected the reason takes the server's place (the client's reasons name it, and the
        tooltip has the URL), so that what matters comes before the line is cut."""
        if self.not_ready:
            return f"Not ready — {first_line(self.not_ready)}"
        device = (self.device or "cloud-only") if self.endpoint else ""
        # The local API's count goes before a long reason, which the menu may cut.
        api = f"Local API: {self.api_in_flight} in flight" if self.api_in_flight is not None else ""
        if self.state != "connected" and self.reason:
            head = f"{' · '.join(p for p in (self.phrase, api) if p)} — {first_line(self.reason)}"
            api = ""
        else:
            head = " · ".join(p for p in (self.phrase, self.endpoint) if p)
        return " · ".join(p for p in (head, device, api) if p)

    def detail(self) -> str:
        lines = [self.phrase]
        if self.not_ready:
            lines.append(f"Why: {self.not_ready}")
            lines.append("Change the draft model or the server in Settings…")
            return "\n".join(lines)
        if self.url:
            lines.append(f"Verifier: {self.url}")
        if self.state != "connected" and self.reason:
            lines.append(f"Why: {self.reason}")
        if self.state == "local":
            lines.append("Answers go on with the draft model alone until the verifier is back.")
        if self.device:
            lines.append(f"Draft model on {self.device}")
        elif self.endpoint:
            why = f": {self.cloud_only_reason}" if self.cloud_only_reason else ""
            lines.append(f"No draft model: answers are cloud-only{why}")
        if self.latency and self.state == "connected":
            lines.append(f"Latency: {self.latency}")
        return "\n".join(lines)

    def shown_latency(self) -> str:
        return self.latency if self.state == "connected" and not self.not_ready else ""


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def milliseconds(value: float) -> str:
    return f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"
