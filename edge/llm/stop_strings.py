"""Stop strings, in one place: where a generation's text ends and what a stream may show yet.

Text that could be the start of a stop string is held back until the next text decides it,
so a stop string split across two increments is found and never shown in part.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cut:
    """What feed() decided: text safe to show now, and whether a stop string ended the text."""

    text: str
    stopped: bool


class StopMatcher:
    """Finds the first of `stops` in text fed piece by piece; O(new text + longest stop)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""  # text not shown yet: it may begin a stop string

    def feed(self, text: str) -> Cut:
        """Take new text; return what can be shown now (cut before a stop string if one ends it)."""
        if not self.stops:
            return Cut(text, False)
        buf = self._held + text
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self._held = ""
            return Cut(buf[: min(found)], True)
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return Cut(buf[: len(buf) - keep], False)

    def flush(self) -> str:
        """The text held back, once the generation ended without a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_tail(self, buf: str) -> int:
        """The length of the longest end of `buf` that some stop string starts with."""
        longest = min(len(buf), max(len(s) for s in self.stops) - 1)
        for n in range(longest, 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
