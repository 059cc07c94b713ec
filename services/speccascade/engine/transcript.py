"""Transcript: the generated tokens and text of one request, and its stop conditions.

It turns committed token ids into text deltas that are safe to stream: text that might still be the
beginning of a stop string, or an incomplete UTF-8 character, is held back until it is decided, so
the concatenation of streamed deltas always equals the unary response.
"""
from __future__ import annotations


class Transcript:
    def __init__(self, tokenizer, max_new_tokens: int, stop: tuple[str, ...] = (),
                 eos_token_ids: frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(s for s in stop if s)
        self.eos_token_ids = eos_token_ids
        self.token_ids: list[int] = []
        self.text = ""          # final text so far (stop string excluded)
        self._sent = 0          # characters of text already handed out as deltas
        self.finish_reason: str | None = None

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.token_ids)

    def commit(self, tokens: list[int]) -> tuple[list[int], str]:
        """Append tokens (stopping at EOS or the token limit); return (new ids, new text)."""
        new_ids: list[int] = []
        for token in tokens:
            if token in self.eos_token_ids:
                self.finish_reason = "eos"
                break
            new_ids.append(token)
            if len(self.token_ids) + len(new_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
                break
        self.token_ids.extend(new_ids)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut is not None:
            text, self.finish_reason = text[:cut], "stop"
        self.text = text
        return new_ids, self._release_text()

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _release_text(self) -> str:
        end = len(self.text)
        if self.finish_reason is None:
            # Hold back what a later token could still change: a partial UTF-8 character, or a
            # suffix that is the beginning of a stop string.
            while end > self._sent and self.text[end - 1] == "\ufffd":
                end -= 1
            for stop in self.stop:
                for size in range(min(len(stop) - 1, end - self._sent), 0, -1):
                    if self.text[end - size: end] == stop[:size]:
                        end -= size
                        break
        delta, self._sent = self.text[self._sent: end], max(self._sent, end)
        return delta
