"""Incremental detokenization with stop strings: emit text as soon as it can no longer change (no
half-decoded character, no possible start of a stop string), and cut the output at the first stop.

Each step decodes only a short window of recent tokens (the prefix/read offsets of vLLM's
detokenizer): the window before the read offset gives the tokenizer its context (leading spaces,
merged bytes), the text beyond it is new. Decoding the whole output every step would cost O(n^2)."""

from __future__ import annotations


class TextStream:
    """tokenizer None (a checkpoint without one) yields no text: callers then use the token ids."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # decoded so far, cut at a stop string once one is hit
        self.emitted = 0  # characters of self.text handed out
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] were decoded last step: the context of the next
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became final. Sets self.stopped on a stop string."""
        self.ids.append(token_id)
        if self.tokenizer is None:
            return ""
        context = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        if len(window) <= len(context) or window.endswith("\ufffd"):  # nothing new, or a partial character
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, len(self.text) - longest)
        full = self.text + window[len(context) :]
        hits = [i for i in (full.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = full[: min(hits)], True
            return self._emit(len(self.text))
        self.text = full
        return self._emit(len(full) - self._pending_stop_prefix(full))

    def flush(self) -> str:
        """Everything not yet emitted (at the end of generation nothing can change any more)."""
        return self._emit(len(self.text))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

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
