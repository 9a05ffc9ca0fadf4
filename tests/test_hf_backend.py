"""The transformers backend: architectures the native model does not cover give Hugging Face's own greedy tokens and
logits on our paged KV cache (float32, CPU); the two backends agree on the Llama family; what the paged path cannot
run is refused at load, naming the architecture and the reason."""
import json

import pytest
import torch

from hf_checkpoints import HF_VARIANTS, hf_greedy, hf_model, random_prompts, write_checkpoint
from splitserve.cluster.config import config_from_dict
from splitserve.workers.config import load_config
from splitserve.workers.hf_model import HFCausalLM
from splitserve.workers.layers.attention import AttentionMetadata
from splitserve.workers.llm import LLM
from splitserve.workers.loader import load_model
from splitserve.workers.sampling_params import SamplingParams

# min_tokens masks eos as the reference (min_new_tokens) does
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, min_tokens=16)
LENGTHS = [5, 17, 40, 3, 29]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    kinds = [*HF_VARIANTS, "llama", "mistral"]
    return {k: write_checkpoint(k, tmp_path_factory.mktemp(k), seed=i) for i, k in enumerate(kinds)}


def _full_logits(model, ids):
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long), [len(ids)], [len(ids)], None)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), None, meta))


@pytest.mark.parametrize("kind", list(HF_VARIANTS))
def test_logits_match_transformers(checkpoints, kind):
    ids = random_prompts([50], seed=7)[0]
    model = load_model(checkpoints[kind])
    assert isinstance(model, HFCausalLM)  # auto picks the transformers backend
    with torch.no_grad():
        ref = hf_model(checkpoints[kind])(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_full_logits(model, ids), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunked", [False, True], ids=["alternating", "splitfuse"])
@pytest.mark.parametrize("kind", list(HF_VARIANTS))
def test_greedy_tokens_match_transformers_batched(checkpoints, kind, chunked):
    """Mixed prompt lengths in one batch; SplitFuse with a small token budget also runs prompt chunks after a
    cached prefix and decode rows in the same forward."""
    prompts = random_prompts(LENGTHS, seed=3)
    llm = LLM(str(checkpoints[kind]), device="cpu", block_size=8, chunked_prefill=chunked,
              max_num_batched_tokens=32 if chunked else 4096)
    outs = llm.generate(prompts, GREEDY)
    hf = hf_model(checkpoints[kind])
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens), f"{kind}: prompt of {len(prompt)} tokens"
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_native_and_transformers_backends_agree(checkpoints, kind):
    prompts = random_prompts(LENGTHS, seed=5)
    tokens = {}
    for backend in ("native", "transformers"):
        llm = LLM(str(checkpoints[kind]), device="cpu", block_size=8, backend=backend)
        assert isinstance(llm.model, HFCausalLM) == (backend == "transformers")
        tokens[backend] = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert tokens["native"] == tokens["transformers"]


def test_generic_config_of_opt(checkpoints):
    cfg = load_config(checkpoints["opt"])
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size,
            cfg.intermediate_size, cfg.eos_token_ids) == ("OPTForCausalLM", 2, 4, 4, 16, 512, 128, (1,))


def _write(tmp_path, config_cls, model_cls, kwargs):
    import transformers

    base = dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    getattr(transformers, model_cls)(getattr(transformers, config_cls)(**base, **kwargs)).save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case, pattern", [
    (("FalconConfig", "FalconForCausalLM", dict(alibi=True)), r"FalconForCausalLM: ALiBi"),
    (("FalconConfig", "FalconForCausalLM", dict(alibi=False)),
     r"FalconForCausalLM: .*does not route attention through transformers' attention interface"),
    (("Gemma2Config", "Gemma2ForCausalLM", dict(intermediate_size=64, head_dim=16, attn_logit_softcapping=50.0)),
     r"Gemma2ForCausalLM: attention logit softcapping"),
])
def test_refusals_name_architecture_and_reason(tmp_path, case, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_model(_write(tmp_path, *case))


def test_backend_option_is_checked(checkpoints, tmp_path):
    with pytest.raises(ValueError, match=r"engine.backend: native runs only .*LlamaForCausalLM.*OPTForCausalLM"):
        load_model(checkpoints["opt"], backend="native")
    with pytest.raises(ValueError, match=r"'backend' must be one of"):
        LLM(str(checkpoints["opt"]), device="cpu", backend="vllm")
    with pytest.raises(ValueError, match=r"'engine.backend' must be one of"):
        config_from_dict({"engine": {"backend": "vllm"}})


@pytest.mark.parametrize("feature", [{"mlp_bias": True}, {"hidden_act": "gelu"},
                                     {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}],
                         ids=["mlp_bias", "gelu", "linear_rope"])
def test_llama_features_the_native_model_lacks_run_on_transformers(tmp_path, feature):
    """`auto` falls back to the transformers backend for a Llama checkpoint the native model cannot run; `native`
    refuses it naming the feature."""
    ckpt = write_checkpoint("llama", tmp_path, seed=4, **feature)
    cfg = load_config(ckpt)
    assert cfg.architecture == "LlamaForCausalLM" and cfg.native_refusal
    prompts = random_prompts([7, 21], seed=5)
    llm = LLM(str(ckpt), device="cpu", block_size=8)
    assert isinstance(llm.model, HFCausalLM)
    hf = hf_model(ckpt)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == [hf_greedy(hf, p, GREEDY.max_tokens)
                                                                    for p in prompts]
    name = next(iter(feature))
    with pytest.raises(ValueError, match=rf"engine.backend: native cannot run this LlamaForCausalLM checkpoint "
                                         rf"\(config.json: {name}.*\); use backend transformers"):
        load_model(ckpt, backend="native")


def test_unknown_model_type_is_refused_naming_it(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch"}))
    with pytest.raises(ValueError, match=r"architecture NoSuchForCausalLM: transformers cannot load it"):
        load_config(tmp_path)


def _tp2_generate(rank, world, dirs, prompts):
    from splitserve.comm.tensor_parallel import TPGroup

    tp = TPGroup.from_group()
    tokens = {}
    for kind, directory in dirs.items():
        try:
            llm = LLM(str(directory), device="cpu", block_size=8, tp=tp, chunked_prefill=True, max_num_batched_tokens=32)
            tokens[kind] = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        except ValueError as e:
            tokens[kind] = str(e)
    return tokens


def test_autotp_tp2_matches_transformers_and_refuses_what_it_cannot_split(checkpoints):
    """Two gloo ranks, SplitFuse (prompt chunks, decode rows, mixed batches) on AutoTP shards."""
    from distributed import run_distributed

    prompts = random_prompts(LENGTHS, seed=9)
    dirs = {k: checkpoints[k] for k in ("phi3", "gpt_neox", "gemma", "gpt2")}
    ranks = run_distributed(_tp2_generate, 2, dirs, prompts)
    assert ranks[0] == ranks[1]
    for kind in ("phi3", "gpt_neox"):
        hf = hf_model(checkpoints[kind])
        assert ranks[0][kind] == [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts], kind
    assert "GemmaForCausalLM: AutoTP would split 4 attention heads and 1 KV heads unevenly" in ranks[0]["gemma"]
    assert "GPT2LMHeadModel: DeepSpeed AutoTP cannot shard GPT-2-style" in ranks[0]["gpt2"]
