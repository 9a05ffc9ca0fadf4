"""Health through the gRPC server tells the truth about the fleet: readiness drops when the only decode instance is
killed and returns once it is relaunched, while streams in flight finish with the right tokens; the instance's state,
restarts and last error show in GetServerInfo and the metrics; a huge prompt is refused without stalling health
checks or other streams."""
import os
import signal
import threading
import time
import urllib.request

import grpc
import pytest

from cluster_helpers import config, references, wait_for_idle, write_checkpoint
from hf_checkpoints import random_prompts
from splitserve.cluster.cluster import Cluster
from splitserve.cluster.server import BackgroundServer, ServerOptions
from splitserve.proto.client import Client
from splitserve.workers.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=29)


@pytest.fixture(scope="module")
def served(ray_runtime, ckpt):
    cfg = config(ckpt, fault_tolerance={"restart_backoff_s": 0.1, "health_interval_s": 0.5})
    with Cluster(cfg) as cluster, \
            BackgroundServer(options=ServerOptions(port=0, metrics_port=0), cluster=cluster).start() as server:
        yield cluster, server


def test_readiness_follows_the_decode_instance_through_a_kill(served, ckpt):
    cluster, server = served
    prompts = random_prompts([9, 30, 17, 44], seed=3)
    expected = references(ckpt, prompts, [SamplingParams(max_tokens=80)] * len(prompts))
    seen: list[str] = []
    results: dict[int, list[int]] = {}
    with Client(server.target, timeout=120) as client:
        assert client.health() == "SERVING"

        def run(i):
            out = client.generate(prompts[i], max_tokens=80, min_tokens=80, temperature=0.0)
            results[i] = list(out.token_ids)

        workers = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 60
        while cluster.stats()["requests"].get("decoding", 0) < 2:
            assert time.monotonic() < deadline, "no request reached decode"
            time.sleep(0.02)
        os.kill(cluster.rank_call("decode-0", 0, "pid"), signal.SIGKILL)
        deadline = time.monotonic() + 120
        while not (seen and seen[-1] == "SERVING" and "NOT_SERVING" in seen):
            assert time.monotonic() < deadline, f"readiness never went down and up again: {seen[-5:]}"
            state = client.health()
            if not seen or seen[-1] != state:
                seen.append(state)
            time.sleep(0.05)
        for w in workers:
            w.join(120)
        assert [results.get(i) for i in range(len(prompts))] == expected
        assert client.health("") == "SERVING"  # liveness never wavered
        info = client.server_info()
        decode = next(i for i in info.instances if i.name == "decode-0")
        assert decode.state == "serving" and decode.restarts == 1 and decode.last_error
        assert info.migrations >= 2
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        assert 'splitserve_instance_restarts_total{model_name=' in metrics and 'role="decode"} 1.0' in metrics
        assert 'splitserve_request_migrations_total{model_name=' in metrics
        assert 'state="serving"} 1.0' in metrics
    wait_for_idle(cluster)


def _health_latencies_during(client, request_text) -> tuple[list[float], list[grpc.RpcError]]:
    latencies, errors = [], []

    def send():
        try:
            client.generate(request_text, max_tokens=2)
        except grpc.RpcError as e:
            errors.append(e)

    sender = threading.Thread(target=send)
    sender.start()
    while sender.is_alive():
        start = time.perf_counter()
        assert client.health() == "SERVING"
        latencies.append(time.perf_counter() - start)
    sender.join()
    return latencies, errors


@pytest.mark.parametrize("text, field, why", [
    ("a" * (4 << 20), "prompt.text", "max_prompt_bytes"),  # refused before tokenising
    ("hello world " * 80000, "prompt", "leave no room"),  # 960 kB: tokenised (~0.5 s here), then too long
], ids=["4MB", "960kB"])
def test_huge_prompts_are_refused_without_stalling_health_checks(served, text, field, why):
    _, server = served
    with Client(server.target, timeout=60) as client:
        latencies, errors = _health_latencies_during(client, text)
    assert errors and errors[0].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert errors[0].details().startswith(field) and why in errors[0].details()
    print(f"health checks during the request: max {max(latencies) * 1e3:.1f} ms over {len(latencies)} checks")
    # Tokenising runs in a worker thread that releases the GIL; the bound leaves room for a busy 2-core machine.
    assert max(latencies) < 0.5, latencies


def test_poison_requests_through_the_api(served):
    """The requests that used to stop an instance for good: refused naming the field, or served; 1P1D goes on."""
    cluster, server = served
    with Client(server.target, timeout=60) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate([5, 6, 7], max_tokens=4, min_tokens=1, temperature=1.0, stop_token_ids=list(range(512)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("sampling.stop_token_ids: with min_tokens=1 every token")
        hot = client.generate([5, 6, 7], max_tokens=4, min_tokens=1, temperature=1e300, seed=3)
        assert len(hot.token_ids) == 4
        assert len(client.generate([9, 10, 11], max_tokens=6, temperature=0.0).token_ids) == 6
        assert client.health() == "SERVING"
    assert all(s["state"] == "serving" for s in cluster.stats()["instances"].values())


def test_scale_through_the_api_and_the_command_line(served, capsys):
    from splitserve.cluster.cli import main

    cluster, server = served
    with Client(server.target, timeout=300) as client:
        for kwargs, code, start in [({"decode": -1}, grpc.StatusCode.INVALID_ARGUMENT, "decode: must be an integer"),
                                    ({"prefill": 0}, grpc.StatusCode.INVALID_ARGUMENT, "prefill: at least one"),
                                    ({"decode": 50}, grpc.StatusCode.RESOURCE_EXHAUSTED, "scale: the new instances")]:
            with pytest.raises(grpc.RpcError) as err:
                client.scale(**kwargs)
            assert err.value.code() == code and err.value.details().startswith(start), err.value.details()
        result = client.scale(decode=2)
        assert list(result.added) == ["decode-1"] and {(r.role, r.instances) for r in result.roles} == {
            ("prefill", 1), ("decode", 2)}
        assert len(client.generate([4, 5, 6], max_tokens=5, temperature=0.0).token_ids) == 5
    assert main(["scale", "--server", server.target, "--decode", "1", "--drain-timeout", "5"]) == 0
    assert "removed: decode-1" in capsys.readouterr().out
    with Client(server.target, timeout=30) as client:
        assert {i.name for i in client.server_info().instances} == {"prefill-0", "decode-0"}
    wait_for_idle(cluster)
