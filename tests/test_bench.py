"""`splitserve bench`: arrivals, workloads and statistics checked by hand, and whole runs through the command-line
path against a small fake InferenceService on 127.0.0.1."""
import argparse
import asyncio
import io
import json
import math
import statistics
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitserve.cluster import bench
from splitserve.cluster.bench import RequestRecord
from splitserve.placement.percentiles import percentile
from splitserve.proto.client import SERVICE_NAME
from splitserve.proto.v1 import inference_pb2 as pb
from splitserve.proto.v1 import inference_pb2_grpc as pb_grpc


# ---------------------------------------------------------------------------------------------------- arrivals

@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_arrivals_have_the_rate_and_the_burstiness(burstiness):
    times = bench.arrival_times(20000, rate=5.0, burstiness=burstiness, seed=3)
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    mean = statistics.fmean(gaps)
    cv = statistics.pstdev(gaps) / mean
    assert mean == pytest.approx(1 / 5.0, rel=0.05)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)  # gamma: CV = 1/sqrt(shape)
    assert times == sorted(times)


def test_arrivals_are_seeded_and_scale_with_the_rate():
    a = bench.arrival_times(50, rate=2.0, seed=7)
    assert a == bench.arrival_times(50, rate=2.0, seed=7)
    assert a != bench.arrival_times(50, rate=2.0, seed=8)
    assert bench.arrival_times(50, rate=4.0, seed=7) == pytest.approx([t / 2 for t in a])
    assert bench.arrival_times(5, rate=math.inf) == [0.0] * 5


def test_rates_parse_and_bad_values_name_the_field():
    assert bench.parse_rates("0.5, 2,inf") == [0.5, 2.0, math.inf]
    for bad in ("0", "-1", "fast", ""):
        with pytest.raises(ValueError, match="rate"):
            bench.parse_rates(bad)
    with pytest.raises(ValueError, match="burstiness"):
        bench.arrival_times(3, 1.0, burstiness=0)


# ---------------------------------------------------------------------------------------------------- workloads

@pytest.mark.parametrize("dataset,mean_in,mean_out", [("sharegpt", 755, 200), ("humaneval", 171, 98),
                                                      ("longbench", 1738, 91)])
def test_synthetic_lengths_have_the_published_means(dataset, mean_in, mean_out):
    pairs = bench.synthetic_lengths(dataset, 20000, max_context=1 << 20, seed=1)
    assert statistics.fmean(p for p, _ in pairs) == pytest.approx(mean_in, rel=0.05)
    assert statistics.fmean(o for _, o in pairs) == pytest.approx(mean_out, rel=0.05)
    assert min(min(p, o) for p, o in pairs) >= 1


def test_means_scale_down_to_the_context_by_one_factor():
    assert bench.scaled_means(755, 200, 4096) == (755, 200)  # 955 <= 0.5 * 4096
    scaled_in, scaled_out = bench.scaled_means(755, 200, 1024)
    assert scaled_in == pytest.approx(755 * 512 / 955) and scaled_out == pytest.approx(200 * 512 / 955)
    pairs = bench.synthetic_lengths("humaneval", 20000, max_context=128, seed=2)  # 269 -> 64 tokens of means
    assert statistics.fmean(p for p, _ in pairs) == pytest.approx(171 * 64 / 269, rel=0.05)
    assert statistics.fmean(o for _, o in pairs) == pytest.approx(98 * 64 / 269, rel=0.05)
    pairs = bench.synthetic_lengths("sharegpt", 5000, max_context=64, seed=2)  # wide spread: many are clipped
    assert all(p >= 1 and o >= 1 and p + o <= 64 for p, o in pairs)


def test_lengths_are_clipped_to_the_context():
    assert bench.clip_lengths(100, 20, 128) == (100, 20)  # fits
    assert bench.clip_lengths(100, 1000, 1024) == (100, 924)  # output keeps what fits beside the prompt
    assert bench.clip_lengths(800, 800, 1024) == (512, 512)  # output cut to half the context, prompt the rest
    assert bench.clip_lengths(2000, 10, 1024) == (1014, 10)
    assert bench.clip_lengths(0, 0, 16) == (1, 1)
    with pytest.raises(ValueError, match="max_context"):
        bench.clip_lengths(1, 1, 1)


def test_workloads_are_seeded_token_ids_inside_the_vocab():
    kwargs = dict(max_context=256, vocab_size=50, eos_token_ids=[11, 12], seed=4)
    work = bench.build_workload("longbench", 200, **kwargs)
    assert work == bench.build_workload("longbench", 200, **kwargs)
    ids = {t for r in work for t in r.prompt}
    assert ids <= set(range(bench.LOW_TOKEN_ID, 50)) - {11, 12} and len(ids) > 20
    assert all(len(r.prompt) == r.prompt_len and r.prompt_len + r.output_len <= 256 for r in work)
    rand = bench.build_workload("random", 100, max_context=1000, vocab_size=500, input_len=40, output_len=10,
                                range_ratio=0.5, seed=1)
    assert all(20 <= r.prompt_len <= 60 and 5 <= r.output_len <= 15 for r in rand)


def test_multiturn_workload_shares_a_system_prompt_and_must_fit_the_context():
    kwargs = dict(max_context=200, vocab_size=300, eos_token_ids=[11], seed=2, input_len=30, output_len=8,
                  turns=3, message_len=6)
    work = bench.build_workload("multiturn", 4, **kwargs)
    assert work == bench.build_workload("multiturn", 4, **kwargs) and len(work) == 4
    assert len({c.system for c in work}) == 1 and len(work[0].system) == 30
    assert all(c.turns == 3 and c.output_len == 8 and all(len(m) == 6 for m in c.messages) for c in work)
    assert len({c.messages for c in work}) == 4 and all(11 not in m for c in work for m in c.messages)
    with pytest.raises(ValueError, match="turns: must be an integer >= 1"):
        bench.build_workload("multiturn", 4, **{**kwargs, "turns": 0})
    with pytest.raises(ValueError, match=r"input_len/message_len/output_len/turns: .* 242 tokens"):
        bench.build_workload("multiturn", 4, **{**kwargs, "input_len": 200})


def test_shared_prefix_workload_is_k_prefixes_times_suffixes():
    kwargs = dict(max_context=100, vocab_size=300, seed=1, input_len=20, message_len=5, output_len=7, num_prefixes=3)
    work = bench.build_workload("shared-prefix", 9, **kwargs)
    assert work == bench.build_workload("shared-prefix", 9, **kwargs)
    assert all(r.prompt_len == len(r.prompt) == 25 and r.output_len == 7 for r in work)
    assert len({r.prompt[:20] for r in work}) == 3 and len({r.prompt for r in work}) == 9
    assert all(work[i].prompt[:20] == work[i + 3].prompt[:20] for i in range(6))
    with pytest.raises(ValueError, match="num_prefixes: must be an integer >= 1"):
        bench.build_workload("shared-prefix", 9, **{**kwargs, "num_prefixes": 0})
    with pytest.raises(ValueError, match="input_len/message_len/output_len: 112 tokens exceed"):
        bench.build_workload("shared-prefix", 9, **{**kwargs, "input_len": 100})


def test_prefix_hit_rate_of_records():
    records = [RequestRecord(ok=True, prompt_tokens=40, output_tokens=2, ttft_s=0.1, e2e_s=0.2, cached_tokens=32),
               RequestRecord(ok=True, prompt_tokens=60, output_tokens=2, ttft_s=0.1, e2e_s=0.2, cached_tokens=0),
               RequestRecord(ok=False, error="UNAVAILABLE", cached_tokens=0)]
    s = bench.summarize(records, 1.0)
    assert s["cached_input_tokens"] == 32 and s["prefix_hit_rate"] == pytest.approx(0.32)


def test_jsonl_workload(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "hello", "max_tokens": 5}\n\n{"prompt_token_ids": [3, 4, 5], "output_len": 100}\n'
                    '{"prompt_token_ids": [7]}\n')
    work = bench.build_workload("jsonl", 4, dataset_path=str(path), max_context=50, vocab_size=100, output_len=9)
    assert [(r.prompt, r.prompt_len, r.output_len) for r in work] == [
        ("hello", 0, 5), ((3, 4, 5), 3, 47), ((7,), 1, 9), ("hello", 0, 5)]  # clipped to the context; cycles
    with pytest.raises(ValueError, match="no tokenizer"):
        bench.build_workload("jsonl", 1, dataset_path=str(path), max_context=50, vocab_size=100, has_tokenizer=False)
    path.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"w.jsonl:1 needs"):
        bench.build_workload("jsonl", 1, dataset_path=str(path), max_context=50, vocab_size=100)


# ---------------------------------------------------------------------------------------------------- statistics

def test_percentile_interpolates_linearly():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)  # rank 0.9 * 3 = 2.7
    assert percentile([10, 20, 30, 40, 50], 99) == pytest.approx(49.6)
    assert percentile([7], 99) == 7


def _records():
    return [
        # ttft 0.1 s, 5 tokens over 0.5 s: TPOT (0.5 - 0.1) / 4 = 0.1 s
        RequestRecord(ok=True, prompt_tokens=10, output_tokens=5, ttft_s=0.1, e2e_s=0.5, itl_s=[0.1, 0.1, 0.1, 0.1]),
        # ttft 0.3 s, TPOT (0.9 - 0.3) / 3 = 0.2 s
        RequestRecord(ok=True, prompt_tokens=20, output_tokens=4, ttft_s=0.3, e2e_s=0.9, itl_s=[0.2, 0.2, 0.2]),
        # one output token: TPOT 0
        RequestRecord(ok=True, prompt_tokens=30, output_tokens=1, ttft_s=0.2, e2e_s=0.2),
        RequestRecord(ok=False, error="UNAVAILABLE"),
        RequestRecord(ok=False, error="RESOURCE_EXHAUSTED"),
        RequestRecord(ok=False, error="UNAVAILABLE"),
    ]


def test_tpot_of_records():
    tpots = [r.tpot_s for r in _records()]
    assert tpots[:3] == pytest.approx([0.1, 0.2, 0.0]) and tpots[3:] == [None, None, None]


def test_summary_of_hand_built_records():
    s = bench.summarize(_records(), duration_s=2.0, slo_ttft_s=0.25, slo_tpot_s=0.15)
    assert (s["num_requests"], s["completed"], s["failed"]) == (6, 3, 3)
    assert s["errors"] == {"UNAVAILABLE": 2, "RESOURCE_EXHAUSTED": 1}
    assert s["request_throughput"] == 1.5  # 3 / 2 s
    assert s["output_throughput"] == 5.0  # (5 + 4 + 1) / 2 s
    assert s["total_token_throughput"] == 35.0  # (60 + 10) / 2 s
    # Inside both SLOs: request 1 (0.1 <= 0.25, 0.1 <= 0.15) and the one-token request 3 (0.2, TPOT 0);
    # request 2 misses both; failed requests count as missing.
    assert s["good_requests"] == 2 and s["goodput"] == 1.0 and s["slo_attainment"] == pytest.approx(2 / 6)
    assert s["ttft_ms"]["mean"] == pytest.approx(200) and s["ttft_ms"]["p50"] == pytest.approx(200)
    assert s["ttft_ms"]["p90"] == pytest.approx(280)  # 200 + 0.8 * (300 - 200)
    assert s["tpot_ms"]["count"] == 2 and s["tpot_ms"]["mean"] == pytest.approx(150)  # one-token output left out
    assert s["itl_ms"]["count"] == 7 and s["itl_ms"]["mean"] == pytest.approx((0.4 + 0.6) / 7 * 1e3)
    assert s["itl_ms"]["p50"] == pytest.approx(100)  # sorted [100 x4, 200 x3], rank 3
    assert s["e2e_ms"]["p99"] == pytest.approx(500 + 0.98 * 400)  # sorted [200, 500, 900], rank 1.98


def test_slos_one_at_a_time_and_none():
    recs = _records()
    assert bench.summarize(recs, 2.0, slo_ttft_s=0.25)["good_requests"] == 2  # TTFT only: 0.1 and 0.2
    assert bench.summarize(recs, 2.0, slo_tpot_s=0.15)["good_requests"] == 2  # TPOT only: 0.1 and 0.0
    assert bench.summarize(recs, 2.0, slo_tpot_s=0.21)["good_requests"] == 3
    assert bench.summarize(recs, 2.0)["slo_attainment"] == 0.5  # no SLO: every completed request is good
    empty = bench.summarize([RequestRecord(ok=False, error="UNAVAILABLE")], 1.0, 0.1, 0.1)
    assert empty["slo_attainment"] == 0.0 and empty["ttft_ms"]["mean"] is None and empty["completed"] == 0
    assert "TTFT" in bench.format_report({"rate": "inf", "burstiness": 1.0, **empty})


# ---------------------------------------------------------------------------------------------------- end to end

FIRST_TOKEN_S = 0.03
TOKEN_GAP_S = 0.003
MAX_CONTEXT = 256
TOKEN = "s3cret"


class FakeInference(pb_grpc.InferenceServiceServicer):
    """Streams max_tokens tokens, one message each, after a first-token delay; refuses max_tokens > 150."""

    def __init__(self):
        self.requests = []

    async def Generate(self, request, context):
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {TOKEN}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        self.requests.append(request)
        n = request.sampling.max_tokens
        if n > 150:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens: too many for this test")
        prompt_len = len(request.token_ids.ids) if request.HasField("token_ids") else len(request.text.split())
        await asyncio.sleep(FIRST_TOKEN_S)
        for i in range(n):
            if i:
                await asyncio.sleep(TOKEN_GAP_S)
            yield pb.GenerateResponse(request_id=request.request_id, token_ids=[100 + i], text="x")
        yield pb.GenerateResponse(request_id=request.request_id, finished=True,
                                  finish_reason=pb.FINISH_REASON_LENGTH,
                                  usage=pb.Usage(prompt_tokens=prompt_len, completion_tokens=n))

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(model="fake", max_context=MAX_CONTEXT, vocab_size=300, eos_token_ids=[1],
                            has_tokenizer=True)


@pytest.fixture(scope="module")
def server():
    """(address, servicer) of a grpc.aio server on its own event loop in a thread."""
    loop = asyncio.new_event_loop()
    servicer = FakeInference()
    started = threading.Event()
    box = {}

    async def serve():
        srv = grpc.aio.server()
        pb_grpc.add_InferenceServiceServicer_to_server(servicer, srv)
        health_servicer = health.aio.HealthServicer()
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, srv)
        box["port"] = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
        box["stopping"] = asyncio.Event()
        started.set()
        await box["stopping"].wait()
        await srv.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"127.0.0.1:{box['port']}", servicer
    loop.call_soon_threadsafe(box["stopping"].set)
    thread.join(10)
    assert not thread.is_alive()
    loop.close()


def _bench(argv):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(argv))


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so the progress bar draws."""

    def isatty(self):
        return True


def _run(server_address, tmp_path, *extra, name="out.json"):
    out = tmp_path / name
    rc = _bench(["--server", server_address, "--token", TOKEN, "--no-progress", "--output", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_bench_end_to_end_with_a_rate_sweep_and_slos(server, tmp_path, capsys):
    address, servicer = server
    servicer.requests.clear()
    rc, data = _run(address, tmp_path, "--dataset", "random", "--num-prompts", "6", "--input-len", "12",
                    "--output-len", "8", "--range-ratio", "0.5", "--rates", "40,inf", "--slo-ttft-ms", "5000",
                    "--slo-tpot-ms", "1000", "--wait-ready", "5", "--seed", "3")
    assert rc == 0
    assert data["arguments"]["rates"] == "40,inf" and "token" not in data["arguments"]
    assert data["model"]["max_context"] == MAX_CONTEXT
    sent = servicer.requests[:6]
    assert len(servicer.requests) == 12 and all(r.sampling.ignore_eos and r.sampling.temperature == 0 for r in sent)
    expected_out = sum(r.sampling.max_tokens for r in sent)
    assert [res["rate"] for res in data["results"]] == [40.0, "inf"]
    for res in data["results"]:
        assert (res["completed"], res["failed"]) == (6, 0)
        assert res["total_output_tokens"] == expected_out
        assert res["total_input_tokens"] == sum(len(r.token_ids.ids) for r in sent)
        assert res["request_throughput"] > 0 and res["output_throughput"] > 0 and res["total_token_throughput"] > 0
        assert res["slo_attainment"] == 1.0 and res["goodput"] == pytest.approx(res["request_throughput"])
        assert res["ttft_ms"]["p50"] >= FIRST_TOKEN_S * 1e3 and res["itl_ms"]["count"] == expected_out - 6
        assert 0 < res["tpot_ms"]["mean"] < 1000
    # The same seeded requests at each rate.
    prompts = sorted(tuple(r.token_ids.ids) for r in sent)
    assert sorted(tuple(r.token_ids.ids) for r in servicer.requests[6:]) == prompts and len(set(prompts)) == 6
    table = capsys.readouterr().out
    assert table.count("Successful requests:") == 2 and "rate inf" in table and "SLO attainment (%):" in table

    # A TTFT target below the fake server's first-token delay is never met.
    rc, tight = _run(address, tmp_path, "--dataset", "humaneval", "--num-prompts", "4", "--rate", "inf",
                     "--slo-ttft-ms", str(FIRST_TOKEN_S * 1e3 / 3), name="tight.json")
    res = tight["results"][0]
    assert rc == 0 and res["completed"] == 4 and res["slo_attainment"] == 0.0 and res["goodput"] == 0.0


def test_bench_multiturn_resends_the_history_with_the_servers_answers(server, tmp_path, capsys):
    address, servicer = server
    servicer.requests.clear()
    rc, data = _run(address, tmp_path, "--dataset", "multiturn", "--num-prompts", "2", "--turns", "3",
                    "--input-len", "10", "--message-len", "4", "--output-len", "5", "--rate", "inf", name="mt.json")
    res = data["results"][0]
    assert rc == 0 and (res["completed"], res["failed"]) == (6, 0)
    by_conversation = {}
    for r in servicer.requests:
        conversation, turn = r.request_id.rsplit("-t", 1)
        by_conversation.setdefault(conversation, {})[int(turn)] = list(r.token_ids.ids)
    assert len(by_conversation) == 2
    systems = set()
    for turns in by_conversation.values():
        assert sorted(turns) == [0, 1, 2] and len(turns[0]) == 14
        systems.add(tuple(turns[0][:10]))
        for t in (1, 2):  # the previous prompt, the fake server's answer (100..104), then 4 new tokens
            assert turns[t][: len(turns[t - 1]) + 5] == turns[t - 1] + [100, 101, 102, 103, 104]
            assert len(turns[t]) == len(turns[t - 1]) + 5 + 4
    assert len(systems) == 1
    assert res["total_input_tokens"] == 2 * (14 + 23 + 32)
    assert "Prefix cache hit rate (%):" in capsys.readouterr().out


def test_bench_counts_failures_by_status_code(server, tmp_path, monkeypatch, capsys):
    address, _ = server
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "a b c", "max_tokens": 3}\n{"prompt_token_ids": [20, 21], "max_tokens": 200}\n')
    monkeypatch.setenv("SPLITSERVE_AUTH_TOKEN", TOKEN)  # the default token
    out = tmp_path / "fail.json"
    terminal = _Terminal()
    with monkeypatch.context() as m:
        m.setattr(sys, "stderr", terminal)
        rc = _bench(["--server", address, "--dataset", "jsonl", "--dataset-path", str(path), "--num-prompts", "4",
                     "--rate", "100", "--max-concurrency", "2", "--output", str(out), "--save-requests"])
    res = json.loads(out.read_text())["results"][0]
    assert rc == 0 and (res["completed"], res["failed"]) == (2, 2) and res["errors"] == {"INVALID_ARGUMENT": 2}
    assert res["total_output_tokens"] == 6 and res["total_input_tokens"] == 6 and res["slo_attainment"] == 0.5
    assert [r["ok"] for r in res["requests"]] == [True, False, True, False]
    bar = terminal.getvalue()
    assert "rate 100 req/s" in bar and "4/4" in bar and "2 failed" in bar  # the progress bar, on a terminal

    monkeypatch.setenv("SPLITSERVE_AUTH_TOKEN", "wrong")
    capsys.readouterr()
    rc = _bench(["--server", address, "--dataset", "jsonl", "--dataset-path", str(path), "--num-prompts", "2",
                 "--output", str(out)])
    res = json.loads(out.read_text())["results"][0]
    assert rc == 1 and res["errors"] == {"UNAUTHENTICATED": 2}  # GetModelInfo is not checked by the fake
    assert "rate" not in capsys.readouterr().err  # stderr is not a terminal here: no bar


def test_bench_reports_an_unreachable_server_and_bad_options(capsys):
    assert _bench(["--server", "127.0.0.1:1", "--wait-ready", "0.3", "--no-progress"]) == 1
    assert "not ready" in capsys.readouterr().err
    assert _bench(["--server", "127.0.0.1:1", "--no-progress"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    with pytest.raises(ValueError, match="slo_ttft_ms"):
        _bench(["--slo-ttft-ms", "0"])
    with pytest.raises(ValueError, match="dataset_path"):
        _bench(["--dataset", "jsonl"])
    with pytest.raises(ValueError, match="dataset: multiturn resends each answer's token ids"):
        _bench(["--dataset", "multiturn", "--backend", "openai", "--base-url", "http://127.0.0.1:1/v1"])
