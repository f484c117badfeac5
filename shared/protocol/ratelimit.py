"""The message-rate token bucket both sides share: the server refuses with it, the client paces with it."""

from __future__ import annotations


class RateLimiter:
    """Token bucket: ``rate`` messages per second, bursts up to ``burst`` (default twice the rate).

    The server refuses a message with :meth:`allow`; a client paces itself with :meth:`delay` so it
    never trips the limit the server advertised (``Limits.max_messages_per_second``).
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = float(rate)
        self.burst = float(2 * rate if burst is None else burst)
        self.allowance = self.burst
        self.last: float | None = None

    def _refill(self, now: float) -> None:
        if self.last is not None:
            self.allowance = min(self.burst, self.allowance + max(0.0, now - self.last) * self.rate)
        self.last = now

    def allow(self, now: float) -> bool:
        """Take one message's allowance; False (taking nothing) when there is none left."""
        if self.rate <= 0:
            return True
        self._refill(now)
        if self.allowance < 1.0:
            return False
        self.allowance -= 1.0
        return True

    def delay(self, now: float) -> float:
        """Reserve one message; the seconds to wait before sending it (0 when it may go now)."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        self.allowance -= 1.0
        return 0.0 if self.allowance >= 0.0 else -self.allowance / self.rate
