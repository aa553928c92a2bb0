"""A provider's request and token limits over a fixed window, and the ``x-ratelimit-*`` headers that report them.

OpenAI's headers: ``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests``,
``x-ratelimit-reset-requests`` and the same for ``-tokens``; a reset is the time until the window
is full again, written as a Go duration (``1s``, ``120ms``, ``6m0s``).
"""

from __future__ import annotations


def go_duration(seconds: float) -> str:
    """A duration as OpenAI writes its resets: ``120ms`` under a second, else ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{round(secs, 3):g}s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text


class RateWindow:
    """``limit`` units per ``window_s`` seconds, counted in fixed windows that open with their first unit."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._start = 0.0
        self.used = 0

    def _roll(self, now: float) -> None:
        if self.used and now >= self._start + self.window_s:
            self.used = 0

    def fits(self, amount: int, now: float) -> bool:
        """Whether ``amount`` more units fit in the current window (always, when unlimited)."""
        self._roll(now)
        return self.limit <= 0 or self.used + amount <= self.limit

    def take(self, amount: int, now: float) -> None:
        """Count ``amount`` units (the caller checked ``fits``)."""
        self._roll(now)
        if self.used == 0:
            self._start = now
        self.used += amount

    def remaining(self, now: float) -> int:
        self._roll(now)
        return max(0, self.limit - self.used)

    def reset_s(self, now: float) -> float:
        """Seconds until the window is full again (0 when nothing is used)."""
        self._roll(now)
        return max(0.0, self._start + self.window_s - now) if self.used else 0.0

    def headers(self, kind: str, now: float) -> dict[str, str]:
        """``x-ratelimit-*-{kind}`` for this window (kind: ``requests`` or ``tokens``); none when unlimited."""
        if self.limit <= 0:
            return {}
        return {
            f"x-ratelimit-limit-{kind}": str(self.limit),
            f"x-ratelimit-remaining-{kind}": str(self.remaining(now)),
            f"x-ratelimit-reset-{kind}": go_duration(self.reset_s(now)),
        }
