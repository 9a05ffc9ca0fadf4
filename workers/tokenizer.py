"""Loads a checkpoint's own `tokenizer.json` (the `tokenizers` library)."""
from __future__ import annotations

from pathlib import Path


def load_tokenizer(model_dir: str | Path):
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"model: no tokenizer.json in {model_dir}; pass token ids instead of text")
    return Tokenizer.from_file(str(path))
