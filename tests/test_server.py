"""The gRPC server on 127.0.0.1 over a real 1 prefill + 1 decode cluster: tokens equal transformers through the
streaming and unary paths; cancel, deadline and Abort free KV on both sides; every validation rule answers
INVALID_ARGUMENT naming its field; fuzzed requests never give INTERNAL/UNKNOWN; health, drain, reflection, auth,
TLS and metrics."""
import asyncio
import math
import shutil
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster_helpers import config, references, wait_for_idle, workload, write_checkpoint
from splitserve.cluster.cluster import Cluster
from splitserve.cluster.server import BackgroundServer, ServerOptions
from splitserve.proto.client import AsyncClient, Client, SERVICE_NAME, build_request
from splitserve.proto.v1 import inference_pb2 as pb

VOCAB, CONTEXT = 512, 1024  # tests/hf_checkpoints.py BASE
BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * 8  # 2 layers x K,V x 2 KV heads x 16 dims x fp32 x 8 tokens


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=51)


@pytest.fixture(scope="module")
def cluster(ray_runtime, ckpt):
    with Cluster(config(ckpt, kv_transfer={"timeout_s": 10.0})) as c:
        yield c


@pytest.fixture(scope="module")
def server(cluster):
    with BackgroundServer(options=ServerOptions(port=0, metrics_port=0), cluster=cluster).start() as s:
        yield s


@pytest.fixture
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


def _idle(cluster):
    stats = wait_for_idle(cluster, timeout=20)
    for name, s in stats.items():
        assert s["free_blocks"] == s["num_blocks"] and s["pending_transfers"] == 0, (name, s)


def _no_requests_left(server, cluster, timeout=10.0):
    deadline = time.monotonic() + timeout
    while (server.active_requests or cluster.num_requests) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.active_requests and not cluster.num_requests


# ------------------------------------------------------------------------------------------- tokens
def test_stream_and_unary_equal_transformers(client, ckpt):
    prompts, params = workload(4, seed=5)
    reference = references(ckpt, prompts, params)
    for prompt, sp, ref in zip(prompts, params, reference):
        msgs = list(client.stream(prompt, max_tokens=sp.max_tokens, temperature=0.0, ignore_eos=True))
        assert [m.finished for m in msgs] == [False] * (len(msgs) - 1) + [True]
        assert [t for m in msgs for t in m.token_ids] == ref
        final = msgs[-1]
        assert final.finish_reason == pb.FINISH_REASON_LENGTH
        assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (len(prompt), len(ref))
        assert final.timing.HasField("ttft_s") and final.timing.HasField("kv_transfer_s")
        assert (final.prefill_instance, final.decode_instance, final.attempts) == ("prefill-0", "decode-0", 1)

        unary = list(client.stub.Generate(build_request(prompt, stream=False, max_tokens=sp.max_tokens,
                                                        temperature=0.0, ignore_eos=True)))
        assert len(unary) == 1 and unary[0].finished and list(unary[0].token_ids) == ref
        assert unary[0].text == "".join(m.text for m in msgs)


def test_text_prompt_and_stop_string(client, cluster):
    out = client.generate("The KV cache moves", max_tokens=12, temperature=0.0, ignore_eos=True)
    assert out.prompt_tokens == len(cluster.encode("The KV cache moves")) and len(out.token_ids) == 12
    stop = out.text[3:6]
    assert stop and stop not in out.text[:3]
    stopped = client.generate("The KV cache moves", max_tokens=12, temperature=0.0, ignore_eos=True, stop=[stop])
    assert stopped.finish_reason == "stop" and stopped.text == out.text[:out.text.index(stop)]


def test_concurrent_async_clients(server, ckpt, cluster):
    prompts, params = workload(8, seed=6)
    reference = references(ckpt, prompts, params)

    async def run():
        async with AsyncClient(server.target, timeout=60) as c:
            return await asyncio.gather(*(c.generate(p, max_tokens=sp.max_tokens, temperature=0.0, ignore_eos=True)
                                          for p, sp in zip(prompts, params)))

    results = asyncio.run(run())
    assert [r.token_ids for r in results] == reference
    assert all(r.ttft_s is not None and r.finish_reason == "length" for r in results)
    _idle(cluster)


# --------------------------------------------------------------------------------- abort, cancel, deadline
def test_abort_rpc_ends_the_stream_and_frees_kv(client, server, cluster):
    stream = client.stream([5, 6, 7, 8] * 4, request_id="to-abort", max_tokens=900, temperature=0.0, ignore_eos=True)
    first = next(stream)
    assert first.request_id == "to-abort" and not first.finished
    assert client.abort("to-abort") is True
    rest = list(stream)
    assert rest[-1].finished and rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert client.abort("to-abort") is False
    _no_requests_left(server, cluster)
    _idle(cluster)


def test_client_cancel_frees_kv_on_both_sides(client, server, cluster):
    cluster.leader_call("decode-0", "pause", True)  # decoding stalls: the request is surely running when cancelled
    try:
        stream = client.stream([9, 10, 11] * 5, max_tokens=50, temperature=0.0, ignore_eos=True)
        assert not next(stream).finished  # the first token, from prefill
        stream.close()  # cancels the RPC
        _no_requests_left(server, cluster)
    finally:
        cluster.leader_call("decode-0", "pause", False)
    _idle(cluster)


def test_deadline_exceeded_aborts_and_frees_kv(client, server, cluster):
    cluster.leader_call("decode-0", "pause", True)
    try:
        with pytest.raises(grpc.RpcError) as err:
            client.generate([12, 13, 14] * 5, max_tokens=50, temperature=0.0, ignore_eos=True, timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _no_requests_left(server, cluster)
    finally:
        cluster.leader_call("decode-0", "pause", False)
    _idle(cluster)


# ------------------------------------------------------------------------------------------ validation
def _req(prompt=None, **sampling):
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    if isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.ids.extend(prompt)
    return req


VALIDATION = {  # name: (request, field named at the start of the message)
    "no prompt": (_req(), "prompt"),
    "empty text": (_req(""), "prompt.text"),
    "empty token ids": (pb.GenerateRequest(token_ids=pb.TokenIds()), "prompt.token_ids"),
    "token id outside vocab": (_req([3, VOCAB]), "prompt.token_ids[1]"),
    "prompt fills the context": (_req([3] * CONTEXT), "prompt"),
    "prompt + max_tokens beyond context": (_req([3] * 1000, max_tokens=30), "sampling.max_tokens"),
    "max_tokens 0": (_req([3], max_tokens=0), "sampling.max_tokens"),
    "min_tokens > max_tokens": (_req([3], max_tokens=4, min_tokens=5), "sampling.min_tokens"),
    "negative temperature": (_req([3], temperature=-0.5), "sampling.temperature"),
    "nan temperature": (_req([3], temperature=float("nan")), "sampling.temperature"),
    "top_p 0": (_req([3], top_p=0.0), "sampling.top_p"),
    "top_p > 1": (_req([3], top_p=1.5), "sampling.top_p"),
    "top_k < -1": (_req([3], top_k=-2), "sampling.top_k"),
    "min_p > 1": (_req([3], min_p=1.5), "sampling.min_p"),
    "repetition_penalty 0": (_req([3], repetition_penalty=0.0), "sampling.repetition_penalty"),
    "presence_penalty > 2": (_req([3], presence_penalty=2.5), "sampling.presence_penalty"),
    "frequency_penalty < -2": (_req([3], frequency_penalty=-3.0), "sampling.frequency_penalty"),
    "infinite frequency_penalty": (_req([3], frequency_penalty=float("inf")), "sampling.frequency_penalty"),
    "empty stop string": (_req([3], stop=["ok", ""]), "sampling.stop[1]"),
    "stop token outside vocab": (_req([3], stop_token_ids=[VOCAB + 7]), "sampling.stop_token_ids[0]"),
    "request_id too long": (pb.GenerateRequest(request_id="x" * 300, token_ids=pb.TokenIds(ids=[3])), "request_id"),
    "messages without a chat template": (pb.GenerateRequest(messages=pb.ChatMessages(
        messages=[pb.ChatMessage(role="user", content="hi")])), "prompt.messages"),
}


@pytest.mark.parametrize("case", list(VALIDATION))
def test_validation_rule(client, case):
    request, field = VALIDATION[case]
    with pytest.raises(grpc.RpcError) as err:
        list(client.stub.Generate(request, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(f"{field}: "), err.value.details()


def _raw_generate(channel):
    return channel.unary_stream(f"/{SERVICE_NAME}/Generate", request_serializer=lambda b: b,
                                response_deserializer=pb.GenerateResponse.FromString)


@pytest.mark.parametrize("payload, field", [
    # field 2 (text), length 3, bytes that are not UTF-8
    (b"\x12\x03ab\xff", "prompt.text"),
    # field 4 (sampling) holding field 10 (stop) = b"\xc3\x28"
    (b"\x22\x04\x52\x02\xc3\x28" + b"\x12\x01a", "sampling.stop[0]"),
    (b"\x12\x09ab", "request"),  # truncated
    # field 6 (messages) holding a message (field 1) whose content (field 2) is not UTF-8
    (b"\x32\x06\x0a\x04\x12\x02\xc3\x28", "prompt.messages[0].content"),
], ids=["text", "stop", "truncated", "messages"])
def test_undecodable_request_is_invalid_argument(client, payload, field):
    with pytest.raises(grpc.RpcError) as err:
        list(_raw_generate(client.channel)(payload, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: "), err.value.details()


def test_duplicate_running_request_id(client, cluster):
    cluster.leader_call("decode-0", "pause", True)
    try:
        stream = client.stream([4, 5, 6], request_id="dup", max_tokens=20, temperature=0.0)
        next(stream)
        with pytest.raises(grpc.RpcError) as err:
            client.generate([4, 5, 6], request_id="dup", max_tokens=2)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "request_id" in err.value.details()
        stream.close()
    finally:
        cluster.leader_call("decode-0", "pause", False)
    _idle(cluster)


def _sampling_strategy():
    """Each field mostly in its valid range (extremes included), sometimes anything the wire can carry."""
    def number(lo, hi):
        return st.one_of(st.floats(lo, hi), st.floats(allow_nan=True, allow_infinity=True, width=64))

    return st.fixed_dictionaries({}, optional={
        "max_tokens": st.one_of(st.integers(0, 6), st.integers(0, 2**32 - 1)),
        "min_tokens": st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)),
        "temperature": number(0, 1e300), "top_p": number(1e-300, 1), "min_p": number(0, 1),
        "top_k": st.one_of(st.integers(-1, VOCAB * 2), st.integers(-2**31, 2**31 - 1)),
        "repetition_penalty": number(1e-300, 1e300), "presence_penalty": number(-2, 2),
        "frequency_penalty": number(-2, 2),
        "stop": st.lists(st.text(max_size=4), max_size=3),
        "stop_token_ids": st.lists(st.one_of(st.integers(0, VOCAB - 1), st.integers(0, 2**32 - 1)), max_size=3),
        "ignore_eos": st.booleans(),
        "seed": st.integers(0, 2**64 - 1),
        "include_stop_str_in_output": st.booleans(),
    })


_PROMPTS = st.one_of(st.none(), st.text(max_size=40), st.lists(st.integers(0, 2**32 - 1), max_size=12),
                     st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=_PROMPTS, sampling=_sampling_strategy(), request_id=st.text(max_size=8), stream=st.booleans())
def test_fuzzed_requests_never_fail_internally(client, prompt, sampling, request_id, stream):
    req = _req(prompt, **sampling)
    req.request_id, req.stream = request_id, stream
    try:
        msgs = list(client.stub.Generate(req, timeout=30))
        assert msgs[-1].finished
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS), (e.code(), e.details())


def test_server_healthy_after_fuzz(client, ckpt, server, cluster):
    assert client.health("") == "SERVING" and client.health() == "SERVING"
    prompts, params = workload(1, seed=8)
    out = client.generate(prompts[0], max_tokens=params[0].max_tokens, temperature=0.0, ignore_eos=True)
    assert out.token_ids == references(ckpt, prompts, params)[0]
    _no_requests_left(server, cluster)
    _idle(cluster)


# --------------------------------------------------------------------------------- info, health, drain
def test_model_and_server_info(client):
    model = client.model_info()
    assert (model.vocab_size, model.max_context, list(model.eos_token_ids), model.has_tokenizer) == (
        VOCAB, CONTEXT, [1], True)
    assert model.architecture == "LlamaForCausalLM" and model.num_layers == 2 and model.backend == "native"
    info = client.server_info()
    assert info.ready and not info.draining
    assert {(r.role, r.instances, r.tp) for r in info.roles} == {("prefill", 1, 1), ("decode", 1, 1)}
    assert {i.name for i in info.instances} == {"prefill-0", "decode-0"}
    assert all(i.num_blocks > 0 for i in info.instances)
    assert info.max_queue_depth == 1024


def test_health_transitions_and_drain(cluster):
    bg = BackgroundServer(options=ServerOptions(port=0), cluster=cluster).start(load=False)
    try:
        with Client(bg.target, timeout=30) as c:
            assert c.health("") == "SERVING" and c.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as err:
                c.generate([3, 4], max_tokens=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            bg.load()
            assert c.health() == "SERVING"
            # an in-flight request finishes while the server drains
            stream = c.stream([7, 8, 9], max_tokens=40, temperature=0.0, ignore_eos=True)
            assert not next(stream).finished
            aborted = []
            drainer = threading.Thread(target=lambda: aborted.append(bg.drain(timeout=60)))
            drainer.start()
            deadline = time.monotonic() + 10
            while c.health() != "NOT_SERVING" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert c.health() == "NOT_SERVING" and c.health("") == "SERVING"
            with pytest.raises(grpc.RpcError) as err:
                c.generate([3, 4], max_tokens=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
            rest = list(stream)
            assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH and rest[-1].usage.completion_tokens == 40
            drainer.join(30)
            assert aborted == [0]
            assert c.server_info().draining
    finally:
        bg.stop()
    _idle(cluster)


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert SERVICE_NAME in db.get_services()
        service = db.FindFileContainingSymbol(SERVICE_NAME)
        assert {m.name for m in service.service[0].method} == {"Generate", "Abort", "GetModelInfo", "GetServerInfo",
                                                               "Scale"}


# ------------------------------------------------------------------------------------------- auth, TLS
def test_auth_token(cluster):
    with BackgroundServer(options=ServerOptions(port=0, auth_token="s3cret"), cluster=cluster).start() as bg:
        for token in (None, "wrong"):
            with Client(bg.target, token=token, timeout=30) as c:
                assert c.health() == "SERVING"  # probes need no token
                for call in (lambda: c.generate([3, 4], max_tokens=2), c.model_info):
                    with pytest.raises(grpc.RpcError) as err:
                        call()
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(bg.target, token="s3cret", timeout=30) as c:
            assert c.generate([3, 4], max_tokens=2, ignore_eos=True).completion_tokens == 2


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(cluster, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    options = ServerOptions(port=0, tls_cert=str(cert), tls_key=str(key))
    with BackgroundServer(options=options, cluster=cluster).start() as bg:
        with Client(bg.target, tls_ca=str(cert), timeout=30) as c:
            assert c.generate([3, 4], max_tokens=3, ignore_eos=True).completion_tokens == 3
        with Client(bg.target, timeout=5) as plain:  # plaintext to a TLS port fails, it does not hang
            with pytest.raises(grpc.RpcError) as err:
                plain.model_info()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------------------------- metrics
def test_metrics_endpoint(client, server):
    before = client.server_info()
    assert before.ready
    client.generate([3, 4, 5], max_tokens=5, temperature=0.0, ignore_eos=True)
    # Each leader's step counters: the prefill computed the prompt at least once, the decode ran 4 steps (the last
    # step's time is added after its token went out, so it reaches the frontend with a later poll).
    was = {i.role: (i.steps, i.busy_seconds) for i in before.instances}
    deadline = time.monotonic() + 10
    while True:
        now = {i.role: (i.steps, i.busy_seconds) for i in client.server_info().instances}
        if now["prefill"][0] >= was["prefill"][0] + 1 and now["decode"][0] >= was["decode"][0] + 4:
            break
        assert time.monotonic() < deadline, f"step counters {was} -> {now}"
        time.sleep(0.1)
    assert all(now[r][1] > was[r][1] for r in ("prefill", "decode")), (was, now)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    model = server.server.model_name

    def value(line_prefix):
        lines = [ln for ln in body.splitlines() if ln.startswith(line_prefix)]
        assert lines, f"{line_prefix} not exported"
        return float(lines[0].rsplit(" ", 1)[1])

    labels = f'model_name="{model}",worker_type="prefill"'
    assert value(f"splitserve_time_to_first_token_seconds_count{{{labels}}}") >= 1
    assert value(f'splitserve_kv_transfer_seconds_count{{model_name="{model}",worker_type="decode"}}') >= 1
    assert value(f'splitserve_inter_token_latency_seconds_count{{model_name="{model}",worker_type="decode"}}') >= 4
    assert value(f'splitserve_e2e_request_latency_seconds_count{{model_name="{model}",worker_type="frontend"}}') >= 1
    assert value(f'splitserve_generation_tokens_total{{model_name="{model}",worker_type="frontend"}}') >= 5
    assert value(f'splitserve_request_success_total{{finished_reason="length",model_name="{model}",'
                 f'worker_type="frontend"}}') >= 1
    assert 0 <= value(f'splitserve_kv_cache_usage_perc{{model_name="{model}",worker_type="decode"}}') <= 1
    assert value(f'splitserve_num_requests_waiting{{model_name="{model}",worker_type="frontend"}}') == 0
    assert value("splitserve_request_failure_total{code=\"INVALID_ARGUMENT\"") >= 1  # from the validation tests
    for role in ("prefill", "decode"):  # summed over incarnations: at least what the live instance reports
        assert value(f'splitserve_instance_steps_total{{model_name="{model}",worker_type="{role}"}}') >= now[role][0]
        assert value(f'splitserve_instance_busy_seconds_total{{model_name="{model}",worker_type="{role}"}}') >= \
            now[role][1] - 1e-9


# ----------------------------------------------------------------------------------------- admission
def test_full_admission_queue_is_resource_exhausted(ray_runtime, ckpt):
    # 8 blocks per instance and one queued request at most: with decode paused, the first request holds 6 blocks,
    # the second waits for room (queued), the third is refused.
    cfg = config(ckpt, engine={"kv_cache_bytes": 8 * BLOCK_BYTES}, max_queued_requests=1)
    with Cluster(cfg) as cluster, BackgroundServer(options=ServerOptions(port=0), cluster=cluster).start() as bg, \
            Client(bg.target, timeout=60) as c:
        cluster.leader_call("decode-0", "pause", True)
        try:
            first = c.stream(list(range(3, 43)), request_id="a", max_tokens=6, temperature=0.0, ignore_eos=True)
            assert not next(first).finished
            # Other tokens than the first's: a shared prefix would be found in decode's cache and need fewer blocks.
            second = c.stream(list(range(53, 93)), request_id="b", max_tokens=6, temperature=0.0, ignore_eos=True)
            got = []
            waiter = threading.Thread(target=lambda: got.extend(second))
            waiter.start()
            deadline = time.monotonic() + 10
            while c.server_info().queue_depth != 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert c.server_info().queue_depth == 1
            with pytest.raises(grpc.RpcError) as err:
                c.generate([3, 4, 5], max_tokens=2)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            cluster.leader_call("decode-0", "pause", False)
        assert [m for m in first][-1].finish_reason == pb.FINISH_REASON_LENGTH
        waiter.join(30)
        assert got[-1].finish_reason == pb.FINISH_REASON_LENGTH and sum(len(m.token_ids) for m in got) == 6
        _idle(cluster)


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_generate_and_info_through_the_server(server, capsys):
    from splitserve.cluster.cli import main

    assert main(["generate", "--server", server.target, "--max-tokens", "5", "--ignore-eos", "Hello", "KV"]) == 0
    out = capsys.readouterr().out
    assert out.count(">>> ") == 2 and out.count("[5 tokens, finish=length, TTFT") == 2
    assert main(["generate", "--server", server.target, "--stream", "--max-tokens", "4", "--ignore-eos", "Hi"]) == 0
    assert "[4 tokens, finish=length" in capsys.readouterr().out
    assert main(["generate", "--server", server.target, "--max-tokens", "0", "x"]) == 1
    assert "INVALID_ARGUMENT: sampling.max_tokens" in capsys.readouterr().err
    assert main(["info", "--server", server.target]) == 0
    out = capsys.readouterr().out
    assert "ready=SERVING" in out and "prefill: 1 serving x (tp 1)" in out and "vocab 512, context 1024" in out
    assert "decode-0 [serving]" in out and "requests migrated 0" in out


def test_bench_runs_against_the_server(server, cluster, tmp_path):
    import json

    from splitserve.cluster.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--server", server.target, "--dataset", "humaneval", "--num-prompts", "6", "--rates", "4,inf",
                 "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--seed", "3", "--no-progress",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["results"]) == 2 and report["model"]["max_context"] == CONTEXT
    for r in report["results"]:
        assert r["completed"] == 6 and r["failed"] == 0
        assert r["output_throughput"] > 0 and r["slo_attainment"] == 1.0 and r["ttft_ms"]["p99"] > 0
    _idle(cluster)


def test_decode_step_fitted_through_the_server(server, cluster):
    from splitserve.cluster import bench, profiler

    workload = bench.build_workload("humaneval", 200, max_context=CONTEXT, vocab_size=VOCAB, eos_token_ids=[1],
                                    has_tokenizer=True, seed=4)
    k, uncertainty, info = profiler.serving_decode_fit(server.target, workload, handoff_s=0.0,
                                                       max_batched_tokens=2048, timeout=120, rounds=2)
    assert len(info["points"]) == 2 * len(profiler.SERVING_DECODE_BATCHES)  # short and long prompts per size
    assert all(p["measured_ms"] > 0 and len(p["repeats_ms"]) == 2 for p in info["points"])
    assert uncertainty.samples == 2 * len(info["points"])
    for c in "abc":
        assert 0 <= getattr(uncertainty.low, c) <= getattr(uncertainty.high, c) < math.inf
    batches = [p["batch"] for p in info["points"]]
    assert all(1 <= b <= size for b, size in zip(batches, sorted(profiler.SERVING_DECODE_BATCHES * 2)))
    assert max(batches) >= 8  # decode batches grow even where long prompts cap a prefill batch
    assert all(math.isfinite(v) for v in (k.a, k.b, k.c)) and k.a + k.c > 0  # a one-sequence step takes time
    _idle(cluster)
