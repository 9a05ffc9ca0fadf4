"""The server-facing commands: `splitserve serve`, `splitserve info`, `splitserve demo`, and `generate` through a
server."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

DEFAULT_TARGET = "127.0.0.1:50051"


def add_target_arguments(p) -> None:
    """Where a client command finds the server, and how it authenticates."""
    p.add_argument("--server", default=os.environ.get("SPLITSERVE_SERVER", DEFAULT_TARGET),
                   help=f"gRPC server address (default: $SPLITSERVE_SERVER or {DEFAULT_TARGET})")
    p.add_argument("--token", default=os.environ.get("SPLITSERVE_AUTH_TOKEN"),
                   help="bearer token (default: $SPLITSERVE_AUTH_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="PEM file of the CA that signed the server's certificate")
    p.add_argument("--timeout", type=float, default=None, help="per-request deadline in seconds")


def add_serve_arguments(p) -> None:
    p.add_argument("--config", default=None,
                   help="cluster YAML (default: the embedded 1 prefill + 1 decode of smollm2-135m)")
    p.add_argument("--model", default=None, help="override the config's model (a preset, checkpoint dir or .gguf)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9400, help="Prometheus /metrics port (default 9400)")
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API on this port (same host and token as gRPC)")
    p.add_argument("--address", default=None,
                   help="attach to a running Ray cluster (auto, ray://host:port, or host:port); "
                        "default: $RAY_ADDRESS, else the config's ray.address, else start a local Ray")
    p.add_argument("--auth-token", default=os.environ.get("SPLITSERVE_AUTH_TOKEN"),
                   help="require `authorization: Bearer <token>` (default: $SPLITSERVE_AUTH_TOKEN; health stays open)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (TLS on; with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish before aborting them")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _server_config(args):
    from splitserve.cluster.config import config_from_dict, load_config

    config = load_config(args.config)
    data = config.to_dict()
    if args.address:  # else the launcher takes the config's ray.address, then $RAY_ADDRESS, then a local Ray
        data["ray"] = {**data["ray"], "address": args.address}
    if getattr(args, "model", None):
        data["model"] = args.model
    return config_from_dict(data) if data != config.to_dict() else config


def run_serve(args) -> int:
    from splitserve.cluster.server import ServerOptions, serve

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServerOptions(host=args.host, port=args.port, metrics_port=None if args.no_metrics else args.metrics_port,
                            auth_token=args.auth_token, tls_cert=args.tls_cert, tls_key=args.tls_key,
                            drain_timeout_s=args.drain_timeout, http_port=args.http_port)
    config = _server_config(args)

    def ready(server):
        layout = ", ".join(f"{n} (tp{i.spec.tp}" + (f" sp{i.spec.sp}" if i.spec.sp > 1 else "")
                           + (f" pp{i.spec.pp})" if i.spec.pp > 1 else ")") for n, i in server.cluster.instances.items())
        metrics = f", metrics on :{server.metrics_port}" if server.metrics_port else ""
        http = f", OpenAI HTTP on :{server.http_port}" if server.http_port else ""
        print(f"splitserve: ready on {options.host}:{server.port}{metrics}{http}: {layout}", file=sys.stderr,
              flush=True)

    asyncio.run(serve(config, options, on_ready=ready))
    print("splitserve: stopped", file=sys.stderr, flush=True)
    return 0


def _client(args):
    from splitserve.proto.client import Client

    return Client(args.server, token=args.token, tls_ca=args.tls_ca, timeout=args.timeout)


def _sampling(args) -> dict:
    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              stop=list(args.stop), ignore_eos=args.ignore_eos)
    if args.seed is not None:
        kw["seed"] = args.seed
    return kw


def _tpot(result) -> float:
    return sum(result.itl_s) / len(result.itl_s) if result.itl_s else 0.0


def print_result(result) -> None:
    t = result.server_timing
    kv = f", KV transfer {t['kv_transfer_s'] * 1e3:.1f} ms" if t.get("kv_transfer_s") is not None else ""
    cached = f", {result.cached_tokens} prompt tokens cached" if result.cached_tokens else ""
    print(f"    [{result.completion_tokens} tokens, finish={result.finish_reason}, "
          f"TTFT {result.ttft_s * 1e3:.1f} ms, TPOT {_tpot(result) * 1e3:.2f} ms{kv}, "
          f"{result.prefill_instance} -> {result.decode_instance}{cached}]", flush=True)


def generate_on_server(args) -> int:
    import grpc

    from splitserve.proto.client import ResultBuilder

    with _client(args) as client:
        try:
            for prompt in args.prompts:
                shown = prompt[-1]["content"] if isinstance(prompt, list) and isinstance(prompt[0], dict) else prompt
                print(f">>> {shown}", flush=True)
                if args.stream:
                    builder = ResultBuilder()
                    for msg in client.stream(prompt, **_sampling(args)):
                        builder.add(msg)
                        print(msg.text, end="", flush=True)
                    print()
                    result = builder.done()
                else:
                    result = client.generate(prompt, **_sampling(args))
                    print(result.text)
                print_result(result)
        except grpc.RpcError as e:
            print(f"splitserve: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def run_info(args) -> int:
    import grpc

    with _client(args) as client:
        try:
            live, ready = client.health(""), client.health()
            server = client.server_info()
            model = client.model_info() if server.ready else None
        except grpc.RpcError as e:
            print(f"splitserve: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(f"server {args.server}: version {server.version}, live={live}, ready={ready}, draining={server.draining}")
    if model is not None:
        print(f"model {model.model}: {model.architecture}, {model.num_layers} layers, hidden {model.hidden_size}, "
              f"vocab {model.vocab_size}, context {model.max_context}, dtype {model.dtype}, "
              f"eos {list(model.eos_token_ids)}, tokenizer {'yes' if model.has_tokenizer else 'no'}, "
              f"chat template {'yes' if model.has_chat_template else 'no'}, backend {model.backend}")
    for role in server.roles:
        print(f"  {role.role}: {role.instances} serving x (tp {role.tp}" + (f", sp {role.sp})" if role.sp > 1 else ")"))
    for inst in server.instances:
        health = inst.state + (f", {inst.restarts} restarts, last error: {inst.last_error}" if inst.restarts else "")
        hits = (f", prefix cache hits {inst.prefix_cache_hit_tokens}/{inst.prefix_cache_query_tokens} tokens "
                f"({inst.prefix_cache_hit_tokens / inst.prefix_cache_query_tokens:.0%})"
                if inst.prefix_cache_query_tokens else "")
        print(f"    {inst.name} [{health}]: KV {inst.num_blocks - inst.free_blocks}/{inst.num_blocks} blocks "
              f"({inst.kv_usage:.0%}), running {inst.running}, waiting {inst.waiting}, busy {inst.busy_seconds:.1f} s "
              f"over {inst.steps} steps{hits}")
    print(f"  queue {server.queue_depth}/{server.max_queue_depth}, in flight {server.requests_in_flight}, "
          f"decode KV usage {server.kv_usage:.0%}, requests migrated {server.migrations}")
    return 0


# ----------------------------------------------------------------------------------------------- demo
# Asked as chats when the model has a chat template (the default model does), else sent as text.
DEMO_PROMPTS = ("What is the capital of France?", "Name the three primary colours.",
                "In one sentence, why is the sky blue?")


def add_demo_arguments(p) -> None:
    p.add_argument("--config", default=None, help="cluster YAML for the server (default: the embedded default)")
    p.add_argument("--model", default=None, help="override the config's model (a preset, checkpoint dir or .gguf)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--startup-timeout", type=float, default=900.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(args) -> int:
    """Starts `splitserve serve` as a child process, streams a few concurrent requests through the gRPC client,
    prints their text and TTFT/TPOT, then stops the server with SIGTERM (a graceful drain)."""
    from splitserve.cluster.config import load_config
    from splitserve.proto.client import Client, ResultBuilder
    from splitserve.workers.presets import resolve_model

    # Fetched or converted once, here: a registry that cannot be reached is reported before any server starts.
    resolve_model(args.model or load_config(args.config).model)
    port = _free_port()
    extra = (["--config", args.config] if args.config else []) + (["--model", args.model] if args.model else [])
    cmd = [sys.executable, "-m", "splitserve.cluster.cli", "serve", "--port", str(port), "--no-metrics",
           "--log-level", "WARNING"] + extra
    print(f"$ splitserve serve --port {port} --no-metrics {' '.join(extra)}".rstrip(), flush=True)
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "SPLITSERVE_AUTH_TOKEN"}
    proc = subprocess.Popen(cmd, env=env)
    results: dict[int, object] = {}
    try:
        with Client(f"127.0.0.1:{port}") as client:
            client.wait_ready(args.startup_timeout)
            model = client.model_info()
            chat = model.has_chat_template
            print(f"server ready in {time.perf_counter() - start:.1f}s ({model.model}: {model.architecture}, "
                  f"{model.num_layers} layers); streaming {len(DEMO_PROMPTS)} concurrent "
                  f"{'chats' if chat else 'requests'}", flush=True)

            def one(i: int, prompt: str) -> None:
                builder = ResultBuilder()
                request = [{"role": "user", "content": prompt}] if chat else prompt
                for msg in client.stream(request, max_tokens=args.max_tokens, temperature=0.0):
                    builder.add(msg)
                results[i] = builder.done()

            threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(DEMO_PROMPTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for i, prompt in enumerate(DEMO_PROMPTS):
            if i not in results:
                print(f">>> {prompt}\n    [no result]")
                continue
            print(f">>> {prompt}\n{results[i].text}")
            print_result(results[i])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    print(f"server drained and stopped (exit code {code})", flush=True)
    return 0 if code == 0 and len(results) == len(DEMO_PROMPTS) else 1
