"""Loads a checkpoint's own `tokenizer.json` (the `tokenizers` library)."""
from __future__ import annotations

from pathlib import Path


def load_tokenizer(model_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"model: no tokenizer.json in {model_dir}; pass token ids instead of text")
    return Tokenizer.from_file(str(path))


def encode_chat(messages, tokenizer, chat_template) -> list[int]:
    """A conversation rendered with the model's chat template (with the generation prompt), then tokenised as the
    template wrote it: the template places every special token itself."""
    if chat_template is None:
        raise ValueError("messages: this model has no chat template; send a text prompt or token ids")
    if tokenizer is None:
        raise ValueError("messages: this model has no tokenizer.json")
    text = chat_template.render(messages)
    return tokenizer.encode_batch([text], add_special_tokens=False)[0].ids


def encode_prompt(prompt, tokenizer, vocab_size: int, chat_template=None) -> list[int]:
    """Text through the tokenizer, a chat (a list of {role, content}) through the chat template, or token ids
    checked against the vocabulary; errors name the field."""
    from splitserve.workers.chat_template import is_messages

    if is_messages(prompt):
        return encode_chat(prompt, tokenizer, chat_template)
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt: must not be empty")
        if tokenizer is None:
            raise ValueError("prompt: this model has no tokenizer.json; send token ids")
        # encode_batch releases the GIL while it works: a long prompt does not stall the other threads.
        return tokenizer.encode_batch([prompt])[0].ids
    ids = list(prompt)
    if not ids:
        raise ValueError("prompt_token_ids: must not be empty")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"prompt_token_ids: {t!r} is not a token id in [0, {vocab_size})")
    return ids
