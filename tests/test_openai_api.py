"""The OpenAI-compatible HTTP API with the official `openai` client and plain HTTP, on 127.0.0.1, over a real 1P1D
cluster: completions (streamed and not) equal the gRPC path's output; errors in OpenAI's shape and statuses; the
token; a client that leaves mid-stream frees its KV; health and model listing."""
import json
import time
import urllib.error
import urllib.request

import pytest

from cluster_helpers import config, wait_for_idle, write_checkpoint
from splitserve.cluster.cluster import Cluster
from splitserve.cluster.server import BackgroundServer, ServerOptions
from splitserve.proto.client import Client

openai = pytest.importorskip("openai")
TOKEN = "s3cret"
# A template in the style of real ones: special tokens around each turn, an error for roles it does not know.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cache and the model"}]


@pytest.fixture(scope="module")
def served(ray_runtime, tmp_path_factory):
    ckpt = write_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=61)
    (ckpt / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    options = ServerOptions(port=0, http_port=0, metrics_port=0, auth_token=TOKEN)
    with Cluster(config(ckpt)) as cluster, BackgroundServer(options=options, cluster=cluster).start() as server:
        yield cluster, server


@pytest.fixture
def client(served):
    _, server = served
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=TOKEN, max_retries=0,
                         timeout=60)


def _http(served, method, path, body=None, token=TOKEN):
    _, server = served
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"content-type": "application/json",
                                              **({"authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_and_health(served, client):
    cluster, server = served
    assert [m.id for m in client.models.list().data] == [server.server.model_name]
    assert _http(served, "GET", "/health", token=None) == (200, {"status": "ok"})


def test_completions_equal_the_grpc_path(served, client):
    _, server = served
    prompt = [5, 17, 42, 99, 7, 3]
    with Client(server.target, token=TOKEN, timeout=60) as grpc_client:
        reference = grpc_client.generate(prompt, max_tokens=12, min_tokens=12, temperature=0.0)
    out = client.completions.create(model=server.server.model_name, prompt=prompt, max_tokens=12, temperature=0.0,
                                    extra_body={"min_tokens": 12})
    assert out.choices[0].text == reference.text and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (6, 12)
    stream = client.completions.create(model=server.server.model_name, prompt=prompt, max_tokens=12, temperature=0.0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"min_tokens": 12})
    events = list(stream)
    assert "".join(e.choices[0].text for e in events if e.choices) == reference.text
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].usage.completion_tokens == 12 and not events[-1].choices
    text = client.completions.create(model=server.server.model_name, prompt="hello there", max_tokens=4,
                                     temperature=0.0)
    assert text.usage.prompt_tokens > 0 and text.usage.completion_tokens <= 4


@pytest.mark.parametrize("body, status, param, kind", [
    ({"prompt": [1, 2], "max_tokens": 0}, 400, "max_tokens", "invalid_request_error"),
    ({"prompt": [1, 2], "temperature": -1}, 400, "temperature", "invalid_request_error"),
    ({"prompt": [1, 999999]}, 400, "prompt", "invalid_request_error"),
    ({"prompt": ["a", "b"]}, 400, "prompt", "invalid_request_error"),
    ({"prompt": [1, 2], "n": 2}, 400, "n", "invalid_request_error"),
    ({"prompt": [1, 2], "logit_bias": {"5": 1}}, 400, "logit_bias", "invalid_request_error"),
    ({"prompt": [1, 2], "model": "gpt-4"}, 404, "model", "invalid_request_error"),
])
def test_errors_take_openais_shape(served, body, status, param, kind):
    code, reply = _http(served, "POST", "/v1/completions", body)
    assert code == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["param"] == param and reply["error"]["type"] == kind


def test_token_is_required(served):
    for token in (None, "wrong"):
        code, reply = _http(served, "POST", "/v1/completions", {"prompt": [1, 2]}, token=token)
        assert code == 401 and reply["error"]["code"] == "invalid_api_key"
    assert _http(served, "GET", "/v1/models", token=None)[0] == 401


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_client_leaving_mid_stream_aborts_the_request(served, client, endpoint):
    cluster, server = served
    common = dict(model=server.server.model_name, max_tokens=400, temperature=0.0, stream=True,
                  extra_body={"ignore_eos": True})
    stream = (client.completions.create(prompt=[9, 8, 7], **common) if endpoint == "completions"
              else client.chat.completions.create(messages=CHAT, **common))
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while cluster.num_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.num_requests == 0
    wait_for_idle(cluster)


def test_bench_against_the_openai_endpoint(served, tmp_path):
    """`splitserve bench --backend openai` drives any OpenAI-compatible server; here, this one."""
    from splitserve.cluster.cli import main

    _, server = served
    out = tmp_path / "bench.json"
    rc = main(["bench", "--backend", "openai", "--base-url", f"http://127.0.0.1:{server.http_port}/v1",
               "--token", TOKEN, "--dataset", "random", "--num-prompts", "6", "--input-len", "12", "--output-len", "8",
               "--vocab-size", "512", "--max-context", "1024", "--rate", "inf", "--no-progress", "--output", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    result = report["results"][0]
    assert report["model"]["model"] == server.server.model_name
    assert result["completed"] == 6 and result["failed"] == 0 and result["total_output_tokens"] == 6 * 8
    assert result["ttft_ms"]["mean"] > 0 and result["tpot_ms"]["mean"] > 0
    assert main(["bench", "--backend", "openai", "--base-url", f"http://127.0.0.1:{server.http_port}/v1",
                 "--token", "wrong", "--num-prompts", "2", "--no-progress"]) == 1


def test_chat_completions_render_the_template_and_equal_the_grpc_path(served, client):
    cluster, server = served
    ids = cluster.encode(CHAT)
    assert ids[0] == 0 and ids.count(0) == 3  # <s> per turn and before the generation prompt, no extra bos
    with Client(server.target, token=TOKEN, timeout=60) as grpc_client:
        by_ids = grpc_client.generate(ids, max_tokens=10, min_tokens=10, temperature=0.0)
        by_messages = grpc_client.generate(CHAT, max_tokens=10, min_tokens=10, temperature=0.0)
    assert by_messages.token_ids == by_ids.token_ids and by_messages.text == by_ids.text
    out = client.chat.completions.create(model=server.server.model_name, messages=CHAT, max_tokens=10,
                                         temperature=0.0, extra_body={"min_tokens": 10})
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == by_ids.text
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 10)
    stream = client.chat.completions.create(model=server.server.model_name, messages=CHAT, max_completion_tokens=10,
                                            temperature=0.0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"min_tokens": 10})
    events = list(stream)
    assert events[0].object == "chat.completion.chunk" and events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == by_ids.text
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].usage.completion_tokens == 10 and not events[-1].choices
    # text parts are joined as the content
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": "the cache "},
                                                    {"type": "text", "text": "and the model"}]}]
    again = client.chat.completions.create(model=server.server.model_name, messages=parts, max_tokens=10,
                                           temperature=0.0, extra_body={"min_tokens": 10})
    assert again.choices[0].message.content == by_ids.text


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),  # the template refuses the role
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": CHAT, "n": 3}, "n"),
    ({"messages": CHAT, "logprobs": True}, "logprobs"),
    ({"messages": CHAT, "max_tokens": 3, "max_completion_tokens": 3}, "max_tokens"),
    ({"messages": CHAT, "max_completion_tokens": 0}, "max_tokens"),
    ({"messages": CHAT, "prompt": "x"}, "prompt"),
])
def test_chat_errors_take_openais_shape(served, body, param):
    code, reply = _http(served, "POST", "/v1/chat/completions", body)
    assert code == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error", reply
