"""Streaming detokenisation: turns output token ids into text deltas, decoding only a short window of
recent tokens per step and holding back bytes of a UTF-8 character that is not complete yet."""
from typing import Sequence

from tokenizers import Tokenizer

_INCOMPLETE = "\ufffd"  # what a byte-level decoder yields for a partial UTF-8 sequence
_PROMPT_CONTEXT = 5     # prompt tokens decoded with the first output so word-start rules see context


class IncrementalDetokenizer:

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Only the prompt's tail is kept: the window never reaches further back.
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0            # window start: decoded text before read_offset is known
        self._read_offset = len(self._ids)  # tokens before this have been emitted
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Output text emitted so far (the concatenation of all deltas)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def step(self, token_ids: Sequence[int]) -> str:
        """Add output tokens; returns the text they complete (may be empty while a character is split)."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(prefix_text) or new_text.endswith(_INCOMPLETE):
            return ""
        return self._advance(new_text[len(prefix_text):])

    def flush(self) -> str:
        """Emit whatever is held back (incomplete characters become U+FFFD); for a finished request."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset, len(self._ids))
        if len(new_text) <= len(prefix_text):
            return ""
        return self._advance(new_text[len(prefix_text):])

    def _advance(self, delta: str) -> str:
        # Tokens before the new window are never decoded again, so drop them.
        del self._ids[:self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pieces.append(delta)
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)
