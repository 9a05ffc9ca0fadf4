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
        # The window of tokens decoded each step: already-emitted context, then the pending tokens.
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._read_offset = len(self._ids)  # text of tokens before this has been emitted
        self._partial = 0                   # chars after read_offset emitted ahead of a split character
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Output text emitted so far (the concatenation of all deltas)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def step(self, token_ids: Sequence[int]) -> str:
        """Add output tokens; returns the newly completed text (trailing partial characters held back)."""
        self._ids.extend(token_ids)
        pending = self._pending()
        if not pending.endswith(_INCOMPLETE):
            return self._advance(pending)
        # Emit the complete characters now; the partial one stays until its bytes arrive.
        complete = pending.rstrip(_INCOMPLETE)
        delta = complete[self._partial:]
        self._partial = max(self._partial, len(complete))
        return self._emit(delta)

    def flush(self) -> str:
        """Emit whatever is held back (incomplete characters become U+FFFD); for a finished request."""
        return self._advance(self._pending())

    def _pending(self) -> str:
        """Text of the tokens after read_offset, decoded after the context tokens before it."""
        context_text = self._decode(self._ids[:self._read_offset])
        return self._decode(self._ids)[len(context_text):]

    def _advance(self, pending: str) -> str:
        if not pending:
            return ""  # e.g. only skipped special tokens so far: keep the window as it is
        delta = pending[self._partial:]
        # The emitted tokens become the next window's context; older ones are never decoded again.
        del self._ids[:self._read_offset]
        self._read_offset, self._partial = len(self._ids), 0
        return self._emit(delta)

    def _emit(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
