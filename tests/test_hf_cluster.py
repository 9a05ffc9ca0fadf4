"""The transformers backend in a Ray cluster gives exactly the transformers tokens in every role: colocated,
disaggregated with layer-wise KV push, prefill TP 2 (DeepSpeed AutoTP on gloo) feeding decode TP 1, and
sequence-parallel prefill."""
import pytest

from cluster_helpers import config, references, wait_for_idle, workload, write_checkpoint
from splitserve.cluster.cluster import Cluster
from splitserve.workers.sampling_params import SamplingParams

KINDS = ("opt", "phi3", "gpt_neox", "qwen3", "gpt2")
COLOCATED = {"prefill": {"instances": 0}, "decode": {"instances": 0}, "colocated": {"instances": 1}}
PREFILL_TP2 = {"prefill": {"tp": 2}}  # decode TP 1: each decode rank gathers its heads from both prefill ranks
LAYOUTS = {
    "opt_colocated": ("opt", COLOCATED),
    "opt_prefill_tp2_decode_tp1": ("opt", PREFILL_TP2),
    "phi3_prefill_tp2_decode_tp1": ("phi3", PREFILL_TP2),
    "gpt_neox_prefill_tp2_decode_tp1": ("gpt_neox", PREFILL_TP2),
    "qwen3_prefill_tp2_decode_tp1_after_prefill": ("qwen3", {**PREFILL_TP2, "kv_transfer": {"mode": "after_prefill"}}),
    "gpt2_1p1d": ("gpt2", {}),  # AutoTP cannot shard GPT-2: TP 1 only
    "opt_prefill_sp2": ("opt", {"prefill": {"sp": 2}}),  # ring attention over zigzag shards of the prompts
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {k: write_checkpoint(k, tmp_path_factory.mktemp(k), seed=40 + i) for i, k in enumerate(KINDS)}


@pytest.fixture(scope="module")
def expected(checkpoints):
    prompts, params = workload(8, seed=2)
    # min_tokens masks eos as the reference (min_new_tokens) does: a tiny random model may rank eos first
    params = [SamplingParams(temperature=0.0, max_tokens=p.max_tokens, min_tokens=p.max_tokens) for p in params]
    return {kind: (prompts, params, references(path, prompts, params)) for kind, path in checkpoints.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_transformers(ray_runtime, checkpoints, expected, layout):
    kind, sections = LAYOUTS[layout]
    prompts, params, reference = expected[kind]
    with Cluster(config(checkpoints[kind], **sections)) as cluster:
        outputs = cluster.generate(prompts, params, timeout=120)
        assert [o.error for o in outputs] == [None] * len(prompts)
        assert [o.token_ids for o in outputs] == reference
        wait_for_idle(cluster)
        if layout == "opt_colocated":  # the backend the instances run, as the API reports it
            from splitserve.cluster.server import BackgroundServer, ServerOptions
            from splitserve.proto.client import Client

            options = ServerOptions(port=0, metrics_port=None)
            with BackgroundServer(options=options, cluster=cluster).start() as server, \
                    Client(server.target, timeout=60) as client:
                info = client.model_info()
            assert (info.architecture, info.backend) == ("OPTForCausalLM", "transformers")


def test_autotp_refusal_comes_before_any_process_starts(checkpoints):
    with pytest.raises(ValueError, match=r"prefill.tp: GPT2LMHeadModel: DeepSpeed AutoTP cannot shard GPT-2-style"):
        Cluster(config(checkpoints["gpt2"], **PREFILL_TP2))
    with pytest.raises(ValueError, match=r"engine.backend: native runs only"):
        Cluster(config(checkpoints["opt"], engine={"backend": "native"}))
    with pytest.raises(ValueError, match=r"engine.tp_norm_method .*not available with the transformers backend"):
        Cluster(config(checkpoints["opt"], engine={"overlap_min_tokens": 32}))
    with pytest.raises(ValueError, match=r"prefill.pp: pipeline stages are not available with the transformers"):
        Cluster(config(checkpoints["opt"], prefill={"pp": 2}))
