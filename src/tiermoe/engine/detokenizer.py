"""Incremental detokenization with stop strings: emit text as soon as it can no longer change (no
half-decoded character, no possible start of a stop string), and cut the output at the first stop."""

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

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became final. Sets self.stopped on a stop string."""
        self.ids.append(token_id)
        if self.tokenizer is None:
            return ""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return ""
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, len(self.text) - longest)
        hits = [i for i in (full.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = full[: min(hits)], True
            return self._emit(len(self.text))
        self.text = full
        return self._emit(len(full) - self._pending_stop_prefix(full))

    def flush(self) -> str:
        """Everything not yet emitted (at the end of generation nothing can change any more)."""
        return self._emit(len(self.text))

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
