"""engine.attention_backend: which path runs where, and the Triton backend at model level under Triton's
interpreter giving transformers' greedy tokens (decode steps, prompt chunks and prompts over a cached prefix).

The interpreter works only if TRITON_INTERPRET=1 is set before a process first imports triton, so one
subprocess (this file run as a script) generates with the Triton backend and the comparisons happen here."""
import json
import os
import subprocess
import sys

import pytest
import torch

from hf_checkpoints import hf_greedy, hf_model, random_prompts, write_checkpoint
from splitserve.kernels import backend
from splitserve.workers.engine_config import ATTENTION_BACKENDS, EngineConfig
from splitserve.workers.layers.attention import PagedAttention
from splitserve.workers.layers.attention_backend import (BACKENDS, TritonPagedAttention, configure_attention,
                                                         resolve_backend)
from splitserve.workers.presets import resolve_model

PROMPTS = random_prompts([5, 40, 17, 23], seed=3)
FOLLOW_UP = PROMPTS[1] + [7, 8, 9, 10, 11]  # its first blocks are cached by then
TOKENS = 10


def test_auto_is_torch_on_cpu_and_triton_is_refused_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="attention_backend: 'triton' needs"):
        resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="attention_backend: must be one of"):
        resolve_backend("flash", cpu)


@pytest.mark.skipif(not backend.HAS_TRITON, reason="triton is not installed")
def test_auto_stays_torch_on_cpu_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_configure_torch_clears_every_layer():
    layers = torch.nn.ModuleList(PagedAttention(4, 2, 16) for _ in range(3))
    for layer in layers:
        layer.kernel = object()
    assert configure_attention(layers, "torch", torch.device("cpu")) == "torch"
    assert all(layer.kernel is None for layer in layers)


def test_engine_config_names_the_backends():
    assert ATTENTION_BACKENDS == BACKENDS == ("auto", "triton", "torch")
    assert EngineConfig().attention_backend == "auto"
    with pytest.raises(ValueError, match="engine.attention_backend"):
        EngineConfig(attention_backend="flash").validate("engine")


def test_llm_refuses_triton_on_cpu_without_the_interpreter(monkeypatch):
    from splitserve.workers.llm import LLM

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="attention_backend"):
        LLM("tiny", device="cpu", attention_backend="triton")


@pytest.fixture(scope="module")
def triton_runs(tmp_path_factory):
    if not backend.HAS_TRITON:
        pytest.skip("triton is not installed")
    tmp = tmp_path_factory.mktemp("attention_backend")
    mistral = write_checkpoint("mistral", tmp / "mistral", seed=2)
    dirs = {"tiny": resolve_model("tiny"), "mistral": mistral, "mistral-transformers-backend": mistral}
    out = tmp / "runs.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__, str(out), json.dumps({k: str(v) for k, v in dirs.items()})],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), dirs


# mistral: a sliding window shorter than the prompts; also through the transformers model backend
@pytest.mark.parametrize("model", ["tiny", "mistral", "mistral-transformers-backend"])
def test_triton_backend_gives_transformers_tokens(triton_runs, model):
    runs, dirs = triton_runs
    run = runs[model]
    assert run["backend"] == "triton"
    assert run["calls"]["decode"] > 0 and run["calls"]["prefix"] > 0  # both forms of the kernel ran
    hf = hf_model(dirs[model])
    for prompt, tokens in zip(PROMPTS + [FOLLOW_UP], run["tokens"]):
        assert tokens == hf_greedy(hf, prompt, TOKENS), f"{model}: prompt of {len(prompt)} tokens"


def generate_with_triton(model_dir: str, model_backend: str) -> dict:
    """In the interpreted subprocess: chunked prefill (chunks read their cached prefix), decode steps, and a
    follow-up prompt whose first blocks are prefix-cached; counts the kernel's calls by form."""
    from splitserve.workers.llm import LLM
    from splitserve.workers.sampling_params import SamplingParams

    calls = {"decode": 0, "prefix": 0}
    kernel_call = TritonPagedAttention.__call__

    def counted(self, q, kv_cache, meta):
        calls["decode" if meta.is_decode else "prefix"] += 1
        return kernel_call(self, q, kv_cache, meta)

    TritonPagedAttention.__call__ = counted
    try:
        llm = LLM(model_dir, device="cpu", block_size=8, chunked_prefill=True, max_num_batched_tokens=24,
                  backend=model_backend, attention_backend="triton")
        params = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
        tokens = [o.token_ids for o in llm.generate(PROMPTS, params)] + [llm.generate([FOLLOW_UP], params)[0].token_ids]
    finally:
        TritonPagedAttention.__call__ = kernel_call
    kind = "triton" if all(m.kernel is not None for m in llm.model.modules() if isinstance(m, PagedAttention)) else "torch"
    return {"backend": kind, "calls": calls, "tokens": tokens}


if __name__ == "__main__":  # the interpreted side of `triton_runs`
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    torch.set_num_threads(1)
    dirs = json.loads(sys.argv[2])
    with open(sys.argv[1], "w") as f:
        json.dump({name: generate_with_triton(path, "transformers" if "transformers" in name else "native")
                   for name, path in dirs.items()}, f)
