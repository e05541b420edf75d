"""Incremental detokenization with stop strings: emit text as soon as it can no longer change (no
half-decoded character, no possible start of a stop string), and cut the output at the first stop.

Each step decodes only a short window of recent tokens (the prefix/read offsets of vLLM's
detokenizer): the window before the read offset gives the tokenizer its context (leading spaces,
merged bytes), the text beyond it is new. Decoding the whole output every step would cost O(n^2).

A window whose decode ends in U+FFFD ends in an unfinished UTF-8 sequence (a byte-level token can
stop mid-character): it is held until the character completes. At the end of the stream (flush)
the held text is emitted up to those trailing replacement characters. decode() gives text, not
bytes, so a replacement character the model produced for a genuinely invalid byte is dropped too
when it is the very last thing generated."""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    """tokenizer None (a checkpoint without one) yields no text: callers then use the token ids."""

    def __init__(self, tokenizer, stop: list[str], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # decoded so far, cut at a stop string once one is hit
        self.emitted = 0  # characters of self.text handed out
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] were decoded last step: the context of the next
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became final. Sets self.stopped on a stop string."""
        self.ids.append(token_id)
        if self.tokenizer is None or self.stopped:
            return ""
        new, partial = self._new_text()
        if not new:
            return ""
        full = self._cut(self.text + new)
        if self.stopped:  # a stop string in the settled text ends the stream, unfinished bytes or not
            self.text = full
            return self._emit(len(full))
        if partial:  # the window ends mid-character: wait for the rest of its bytes
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        self.text = full
        return self._emit(len(full) - self._pending_stop_prefix(full))

    def flush(self) -> str:
        """Everything not yet emitted: the stream has ended, so held text that only began a stop
        string is final, and so is a held window, up to the bytes of a character left unfinished."""
        if self.tokenizer is not None and not self.stopped:
            new, _ = self._new_text()
            if new:
                self.text = self._cut(self.text + new)
            self._prefix = self._read = len(self.ids)
        return self._emit(len(self.text))

    def _new_text(self) -> tuple[str, bool]:
        """The window's text beyond its context, less trailing replacement characters, and whether
        there were any (an unfinished character)."""
        context = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        settled = window.rstrip(REPLACEMENT)
        return settled[len(context) :], len(settled) < len(window)

    def _cut(self, full: str) -> str:
        """full cut at the first stop string that ends beyond self.text (sets self.stopped)."""
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, len(self.text) - longest)
        hits = [i for i in (full.find(s, search_from) for s in self.stop) if i >= 0]
        if not hits:
            return full
        self.stopped = True
        return full[: min(hits)]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _pending_stop_prefix(self, text: str) -> int:
        """Length of the longest suffix of text that begins some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out, self.emitted = self.text[self.emitted : upto], upto
        return out
