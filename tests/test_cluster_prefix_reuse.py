"""Prefix reuse across disaggregation on a real (local) Ray cluster: multi-turn conversations whose every turn
resends the whole history. Prefill computes only the uncached suffix, the decode side keeps the earlier turns'
prompt and answer blocks and receives only the blocks it lacks, and every turn's tokens equal transformers."""
import pytest

from cluster_helpers import config, wait_for_idle, write_checkpoint
from hf_checkpoints import hf_greedy, hf_model, random_prompts
from splitserve.cluster.cluster import Cluster
from splitserve.cluster.request import RequestState
from splitserve.workers.sampling_params import SamplingParams

BS = 8
TURNS = 4
PARAMS = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10)  # min_tokens: as transformers' reference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=41)


@pytest.fixture(scope="module")
def hf(checkpoint):
    return hf_model(checkpoint)


@pytest.fixture(scope="module")
def mqa(tmp_path_factory):
    """(checkpoint, transformers model) with one KV head: replicated over TP ranks on both sides."""
    path = write_checkpoint("llama_mqa", tmp_path_factory.mktemp("mqa"), seed=42)
    return path, hf_model(path)


def converse(cluster, hf, conversations: int, seed: int):
    """`conversations` concurrent conversations of TURNS turns (a shared system prompt, then a new message per
    turn), submitted in reverse order on odd turns (so load-only routing would swap their instances); every turn
    checked against transformers. Returns per turn the (prompt, output) of every conversation."""
    system = random_prompts([19], seed=seed)[0]
    messages = random_prompts([5 + c + t for t in range(TURNS) for c in range(conversations)], seed=seed + 1)
    histories = [system + random_prompts([3 + c], seed=seed + 2 + c)[0] for c in range(conversations)]
    turns = []
    for t in range(TURNS):
        prompts = [h + messages[t * conversations + c] for c, h in enumerate(histories)]
        order = list(range(conversations))[::-1 if t % 2 else 1]
        submitted = cluster.generate([prompts[c] for c in order], [PARAMS] * conversations, timeout=120)
        outs = [submitted[order.index(c)] for c in range(conversations)]
        assert [o.error for o in outs] == [None] * conversations
        for c, (prompt, out) in enumerate(zip(prompts, outs)):
            assert out.token_ids == hf_greedy(hf, prompt, PARAMS.max_tokens), f"turn {t}, conversation {c}"
            histories[c] = prompt + out.token_ids
        turns.append(list(zip(prompts, outs)))
    return turns


def _blocks(n: int) -> int:
    return -(-n // BS)


LAYOUTS = {
    "1p1d": {},
    "prefill_tp2_decode_tp1": {"prefill": {"tp": 2}},
    "prefill_tp1_decode_tp2_shm": {"decode": {"tp": 2}, "kv_transfer": {"transport": "shm"}},
    "sp2_prefill": {"prefill": {"sp": 2}},  # SP prefill caches nothing; its decode side still gets only deltas
    "after_prefill": {"kv_transfer": {"mode": "after_prefill"}},
    "mqa_tp2_both": {"prefill": {"tp": 2}, "decode": {"tp": 2}},
    "prefill_pp2_decode_pp2": {"prefill": {"pp": 2}, "decode": {"pp": 2}},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_multiturn_reuses_prefill_and_decode_cache_and_sends_only_the_delta(ray_runtime, checkpoint, hf, mqa, layout):
    if layout.startswith("mqa"):
        checkpoint, hf = mqa
    with Cluster(config(checkpoint, **LAYOUTS[layout])) as cluster:
        turns = converse(cluster, hf, conversations=1, seed=3)
        stats = wait_for_idle(cluster)
        counters = cluster.stats()["counters"]
    (_, first), = turns[0]
    assert first.metrics["cached_tokens"] == 0
    sp = "sp" in layout
    for t, [(prompt, out)] in enumerate(turns[1:], start=1):
        cached = out.metrics["cached_tokens"]
        # Prefill reuses the previous turn's prompt blocks (its answer was decoded elsewhere).
        assert cached == (0 if sp else (len(turns[t - 1][0][0]) // BS) * BS), (t, cached)
    # Decode received only what it lacked: its hits are exactly the bytes not sent.
    full_blocks = sum(_blocks(len(p)) for [(p, _)] in turns)
    decode_hits = counters["prefix_hit_tokens"]["decode"]
    assert decode_hits > 0 and decode_hits % BS == 0
    block_bytes = counters["kv_received_bytes"]["decode"] / (full_blocks - decode_hits // BS)
    assert block_bytes == int(block_bytes) and block_bytes > 0
    # Later turns' histories are on the decode side already (its own answers included): most blocks stay put.
    assert decode_hits // BS >= sum(_blocks(len(p)) for [(p, _)] in turns[:-1]) - TURNS
    assert counters["kv_received_bytes"]["decode"] < 0.6 * full_blocks * block_bytes
    assert counters["prefix_query_tokens"]["decode"] == sum(len(p) for [(p, _)] in turns)
    assert all(s["free_blocks"] == s["num_blocks"] for s in stats.values())


def test_caching_off_sends_every_block_with_the_same_tokens(ray_runtime, checkpoint, hf):
    with Cluster(config(checkpoint, engine={"prefix_caching": False})) as cluster:
        turns = converse(cluster, hf, conversations=1, seed=3)
        wait_for_idle(cluster)
        counters = cluster.stats()["counters"]
    assert all(out.metrics["cached_tokens"] == 0 for turn in turns for _, out in turn)
    assert counters["prefix_hit_tokens"] == {"prefill": 0, "decode": 0}
    full_blocks = sum(_blocks(len(p)) for [(p, _)] in turns)
    assert counters["kv_received_bytes"]["decode"] % full_blocks == 0


def test_grpc_usage_server_info_and_metrics_report_the_cache(ray_runtime, checkpoint, capsys, tmp_path):
    import json
    import urllib.request

    from splitserve.cluster.server import BackgroundServer, ServerOptions
    from splitserve.proto.client import Client

    system = random_prompts([40], seed=9)[0]
    with Cluster(config(checkpoint)) as cluster, \
            BackgroundServer(options=ServerOptions(port=0, metrics_port=0, http_port=0), cluster=cluster).start() as bg, \
            Client(bg.target, timeout=60) as client:
        first = client.generate(system + [7, 8], max_tokens=4, temperature=0.0, ignore_eos=True)
        second = client.generate(system + [9, 10, 11], max_tokens=4, temperature=0.0, ignore_eos=True)
        assert (first.cached_tokens, second.cached_tokens) == (0, 40)
        wait_for_idle(cluster)
        info = client.server_info()
        by_role = {i.role: i for i in info.instances}
        assert (by_role["prefill"].prefix_cache_hit_tokens, by_role["prefill"].prefix_cache_query_tokens) == (40, 85)
        assert by_role["decode"].prefix_cache_hit_tokens == 40
        from splitserve.cluster.cli import main
        from splitserve.cluster.serve_cli import print_result

        assert main(["info", "--server", bg.target]) == 0
        print_result(second)
        out = capsys.readouterr().out
        assert "prefix cache hits 40/85 tokens (47%)" in out and ", 40 prompt tokens cached]" in out
        body = urllib.request.urlopen(f"http://127.0.0.1:{bg.metrics_port}/metrics", timeout=10).read().decode()
        report = tmp_path / "bench.json"
        assert main(["bench", "--server", bg.target, "--dataset", "multiturn", "--num-prompts", "2", "--turns", "3",
                     "--input-len", "24", "--message-len", "8", "--output-len", "4", "--no-progress",
                     "--output", str(report)]) == 0
        result = json.loads(report.read_text())["results"][0]
        # A first turn finds the shared 24-token system prompt's full blocks once another conversation computed
        # them; later turns find their whole history.
        assert result["completed"] == 6 and result["prefix_hit_rate"] > 0.5
        # K prefixes x suffixes through the OpenAI-compatible API (its usage carries
        # prompt_tokens_details.cached_tokens): one at a time, all but the first request of each prefix hit it
        # (another seed than the run above, whose prompts would share tokens with these).
        assert main(["bench", "--backend", "openai", "--base-url", f"http://127.0.0.1:{bg.http_port}/v1",
                     "--dataset", "shared-prefix", "--num-prompts", "6", "--num-prefixes", "2", "--input-len", "32",
                     "--message-len", "4", "--output-len", "2", "--vocab-size", "512", "--max-context", "1024",
                     "--max-concurrency", "1", "--seed", "7", "--no-progress", "--output", str(report)]) == 0
        result = json.loads(report.read_text())["results"][0]
        assert result["completed"] == 6 and result["cached_input_tokens"] == 4 * 32
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
              if line.startswith(("splitserve_prefix_cache", "splitserve_kv_transfer_bytes"))}
    model = bg.server.model_name
    assert values[f'splitserve_prefix_cache_hit_tokens_total{{model_name="{model}",worker_type="prefill"}}'] == 40
    assert values[f'splitserve_prefix_cache_queries_tokens_total{{model_name="{model}",worker_type="prefill"}}'] == 85
    assert values[f'splitserve_prefix_cache_hit_tokens_total{{model_name="{model}",worker_type="decode"}}'] == 40
    # 6 + 6 blocks of 8 tokens sent without reuse; the second request's first 5 blocks stayed on the decode side.
    sent = values[f'splitserve_kv_transfer_bytes_total{{model_name="{model}"}}']
    assert sent > 0 and sent / (6 + 6 - 5) == int(sent / 7)


@pytest.mark.parametrize("policy", ["kv_aware", "least_loaded"])
def test_2p2d_conversations_follow_their_cache(ray_runtime, checkpoint, hf, policy):
    """Two conversations on two prefill and two decode instances: KV-aware routing keeps each on the instances that
    hold its history (every later turn reuses all of it on both sides); load-only routing swaps them each turn."""
    cfg = config(checkpoint, prefill={"instances": 2}, decode={"instances": 2}, routing={"policy": policy})
    with Cluster(cfg) as cluster:
        turns = converse(cluster, hf, conversations=2, seed=5)
        stats = wait_for_idle(cluster)
        counters = cluster.stats()["counters"]
    assert all(s["free_blocks"] == s["num_blocks"] for s in stats.values())
    later = [(t, c, prompt, out) for t, turn in enumerate(turns) if t for c, (prompt, out) in enumerate(turn)]
    full_history = [(len(turns[t - 1][c][0]) // BS) * BS for t, c, _, _ in later]
    cached = [out.metrics["cached_tokens"] for _, _, _, out in later]
    if policy == "kv_aware":
        assert cached == full_history
        for c in range(2):  # each conversation stays on its pair
            assert len({turn[c][1].metrics["prefill_instance"] for turn in turns}) == 1
            assert len({turn[c][1].metrics["decode_instance"] for turn in turns}) == 1
        assert counters["prefix_hit_tokens"]["decode"] >= sum(full_history)
    else:  # moved between instances, a conversation finds only part of its history
        assert sum(cached) < sum(full_history)


def test_colocated_instance_reuses_prompts_and_answers(ray_runtime, checkpoint, hf):
    """One colocated instance holds each turn's prompt and answer: the next turn computes only its new tokens."""
    cfg = config(checkpoint, prefill={"instances": 0}, decode={"instances": 0}, colocated={"instances": 1})
    with Cluster(cfg) as cluster:
        turns = converse(cluster, hf, conversations=1, seed=7)
        stats = wait_for_idle(cluster)
    for t, [(prompt, out)] in enumerate(turns[1:], start=1):
        (before, answer), = [(p, o.token_ids) for p, o in turns[t - 1]]
        history_kv = len(before) + len(answer) - 1  # the last answer token was never fed back
        assert out.metrics["cached_tokens"] == min(history_kv // BS, (len(prompt) - 1) // BS) * BS, t
    assert all(s["free_blocks"] == s["num_blocks"] and s["cached_blocks"] > 0 for s in stats.values())


def test_abort_and_transfer_retry_on_shared_blocks_free_what_they_own(ray_runtime, checkpoint, hf):
    """Requests that share cached blocks: one aborted mid-decode, one whose first transfer stalls and is retried.
    Both instances come back to idle (no referenced block), the cached history survives, and the next turn is
    still exact."""
    import time

    cfg = config(checkpoint, kv_transfer={"timeout_s": 3.0, "retries": 1})
    with Cluster(cfg) as cluster:
        history = random_prompts([33], seed=21)[0]
        first = cluster.generate([history], [PARAMS], timeout=60)[0]
        assert first.token_ids == hf_greedy(hf, history, PARAMS.max_tokens)
        history += first.token_ids
        # Aborted while decoding on top of the shared history's blocks.
        long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        cluster.submit(history + [7, 8, 9], long, "aborted")
        deadline = time.monotonic() + 30
        while cluster.request_state("aborted") is not RequestState.DECODING and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cluster.request_state("aborted") is RequestState.DECODING
        assert cluster.abort("aborted")
        wait_for_idle(cluster)
        # The first transfer of a request reusing the history stalls; the retry resumes and completes.
        cluster.rank_call("prefill-0", 0, "inject_transfer_faults", 1)
        prompt = history + random_prompts([5], seed=22)[0]
        out = cluster.generate([prompt], [PARAMS], timeout=60)[0]
        assert out.error is None and out.metrics["attempts"] == 2
        assert out.token_ids == hf_greedy(hf, prompt, PARAMS.max_tokens)
        stats = wait_for_idle(cluster)
        counters = cluster.stats()["counters"]
    assert all(s["free_blocks"] == s["num_blocks"] and s["cached_blocks"] > 0 for s in stats.values())
    assert out.metrics["cached_tokens"] > 0 and counters["prefix_hit_tokens"]["decode"] > 0
