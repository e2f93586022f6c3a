"""Token ids -> text pieces a client can show, as the ids arrive.

- Incremental detokenization: a byte-level BPE token can hold part of a multi-byte UTF-8 character;
  text is released only once the ids decode to whole characters (no U+FFFD at the end).
- Stop strings: text that could be the start of a stop string is held back until it is known not to
  be one; when a stop string appears, the text ends before it and :attr:`stopped` is set.
"""

from __future__ import annotations

from typing import Callable, Sequence


class TextStream:
    """Feed ids one at a time with :meth:`push`; each call returns the text that is safe to send now."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] decode to text already taken into self._text
        self._read = 0
        self._text = ""  # all whole-character text decoded so far
        self.sent = ""  # what push/flush returned so far
        self.stopped = False

    def _decoded(self, final: bool) -> None:
        """Move whole characters of the ids not yet read into self._text."""
        if self._read == len(self.ids):
            return
        head = self.decode(self.ids[self._prefix:self._read])
        full = self.decode(self.ids[self._prefix:])
        if full.endswith("\ufffd") and not final:
            return  # the last token ends inside a multi-byte character: wait for the rest
        self._text += full[len(head):]
        self._prefix, self._read = self._read, len(self.ids)

    def _first_stop(self) -> int:
        """Index in self._text where the earliest stop string starts (-1: none). Text already sent never ends
        with the start of a stop string, so a match can only begin in the unsent part."""
        hits = [j for s in self.stop if (j := self._text.find(s, max(0, len(self.sent) - len(s) + 1))) != -1]
        return max(min(hits), len(self.sent)) if hits else -1

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        j = self._first_stop()
        if j != -1:
            self.stopped = True
            pending = self._text[len(self.sent):j]
        else:
            pending = self._text[len(self.sent):]
            if not final:  # hold back a tail that could be the start of a stop string
                keep = 0
                for s in self.stop:
                    keep = max([keep] + [k for k in range(1, min(len(s) - 1, len(pending)) + 1)
                                         if pending.endswith(s[:k])])
                pending = pending[:len(pending) - keep]
        self.sent += pending
        return pending

    def push(self, token: int) -> str:
        """Add one id; return the new text that can be sent (possibly "")."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        self._decoded(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end: everything not sent yet (a cut character shows as U+FFFD), up to a stop string."""
        self._decoded(final=True)
        return self._release(final=True)

    @property
    def text(self) -> str:
        """Everything sent so far."""
        return self.sent
