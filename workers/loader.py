"""Loads a Hugging Face checkpoint directory (single or sharded safetensors) into a `CausalLM`."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from splitserve.comm.tensor_parallel import SINGLE, TPGroup
from splitserve.workers.config import load_config
from splitserve.workers.hf_config import resolve_backend
from splitserve.workers.model import CausalLM

# Checkpoint tensors we knowingly do not use (precomputed by some exporters).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown dtype {dtype!r}; supported: {sorted(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device: must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA device is available")
    return torch.device(device)


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"model: shards listed in {index.name} are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model: no *.safetensors files in {model_dir}")
    return files


def load_weights(model: CausalLM, model_dir: str | Path) -> None:
    """Cuts each rank's slices straight from the files; refuses missing, unexpected or misshapen tensors."""
    targets = model.checkpoint_params()
    seen: set[str] = set()
    for path in safetensors_files(Path(model_dir)):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and model.cfg.tie_word_embeddings):
                    continue
                if name not in targets:
                    if getattr(model, "other_stage_weight", lambda _: False)(name):  # another pipeline stage's
                        continue
                    raise ValueError(f"model: unexpected weight '{name}' in {path.name}")
                param, loader, shard = targets[name]
                tensor = f.get_tensor(name).to(device=param.device, dtype=param.dtype)
                loader(param, tensor, name, shard)
                seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing:
        raise ValueError(f"model: checkpoint is missing weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def load_model(model_dir: str | Path, dtype="float32", device="cpu", tp: TPGroup = SINGLE, backend: str = "auto",
               layers: range | None = None):
    """A `CausalLM` (native backend) or an `HFCausalLM` (transformers backend), per `resolve_backend`."""
    cfg = load_config(model_dir)
    if resolve_backend(backend, cfg) == "transformers":
        from splitserve.workers.hf_model import load_hf_model

        if layers is not None and layers != range(cfg.num_layers):
            raise ValueError(f"pp: pipeline stages are not available with the transformers backend ({cfg.architecture})")
        return load_hf_model(model_dir, cfg, resolve_dtype(dtype), torch.device(device), tp)
    with torch.device(device):
        model = CausalLM(cfg, tp, resolve_dtype(dtype), device, layers)
    load_weights(model, model_dir)
    return model.eval()
