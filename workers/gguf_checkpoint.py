"""GGUF checkpoints: checked with the `gguf` package, dequantised and converted by transformers' GGUF support into
a Hugging Face directory (config, float32 safetensors, tokenizer, chat template, generation config), once per file,
in the model cache. The engine then loads that directory like any other checkpoint."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# GGUF `general.architecture` values whose converted checkpoints the native model runs.
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")
# Tensor types the `gguf` package dequantises (what transformers calls to load them).
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_CONVERTER_VERSION = "v1"


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def inspect_gguf(path: str | Path) -> dict:
    """Architecture and tensor types of a GGUF file; refuses what cannot be converted, naming it."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model: GGUF file {str(path)!r} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # a truncated or foreign file: numpy/struct errors of every kind
        raise ValueError(f"model: {path.name} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"model: GGUF architecture {arch!r} in {path.name} is not supported "
                         f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    bad = [t for t in types if t not in SUPPORTED_GGUF_TYPES]
    if bad:
        raise ValueError(f"model: GGUF tensor type(s) {', '.join(bad)} in {path.name} are not supported "
                         f"(supported: {', '.join(SUPPORTED_GGUF_TYPES)})")
    return {"architecture": arch, "tensor_types": types, "has_chat_template":
            _field(reader, "tokenizer.chat_template") is not None}


def _clean_config(config: dict) -> dict:
    config = {k: v for k, v in config.items() if k not in ("quantization_config", "_name_or_path", "_model_name_or_path")}
    config["torch_dtype"] = "float32"
    config.pop("dtype", None)
    return config


def convert_gguf(path: str | Path, target: str | Path) -> None:
    """Writes the Hugging Face directory of a GGUF file into `target` (which must not exist yet)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path, target = Path(path), Path(target)
    inspect_gguf(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = _clean_config(model.config.to_dict())
    config["architectures"] = [type(model).__name__]
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    target.mkdir(parents=True)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(target))
    generation = GenerationConfig(bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id"),
                                  pad_token_id=config.get("pad_token_id"))
    generation.save_pretrained(str(target))
    if tokenizer.chat_template and not (target / "chat_template.jinja").is_file():
        (target / "chat_template.jinja").write_text(tokenizer.chat_template)
    (target / "gguf_source.json").write_text(json.dumps({"file": path.name, "converter": _CONVERTER_VERSION}))


def _file_key(path: Path) -> str:
    stat = path.stat()
    text = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{_CONVERTER_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def materialise(path: Path, target: Path) -> Path:
    """Converts `path` into `target` once; concurrent callers race on an atomic rename, the loser's copy is dropped."""
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        log.info("converting %s into %s (dequantised to float32)", path, target)
        convert_gguf(path, tmp / "out")
        try:
            (tmp / "out").rename(target)
        except OSError:  # another process finished first; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_gguf(path: str | Path, cache: Path) -> Path:
    """The converted directory of a GGUF file, made once under `cache/gguf/`."""
    path = Path(path)
    inspect_gguf(path)
    return materialise(path, cache / "gguf" / f"{path.stem}-{_file_key(path)}")
