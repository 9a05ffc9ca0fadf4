"""The `splitserve` command line."""
from __future__ import annotations

import argparse
import os
import sys
import time

# Ray forks helper processes while gRPC threads run; gRPC's fork handlers would only log about it. Set before any
# command imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def _add_sampling(p) -> None:
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def _add_generate(sub) -> None:
    from splitserve.cluster import serve_cli

    p = sub.add_parser("generate", help="generate text: through a running server (default), or in-process "
                                        "with --local (one engine) or --cluster (a local disaggregated cluster)")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    serve_cli.add_target_arguments(p)
    p.add_argument("--local", action="store_true", help="run an engine in this process instead of using a server")
    p.add_argument("--cluster", action="store_true",
                   help="run a disaggregated cluster on local Ray in this process (prefill and decode instances)")
    p.add_argument("--config", default=None, help="cluster YAML (with --cluster); default: 1 prefill + 1 decode")
    p.add_argument("--model", default="smollm2-135m",
                   help="with --local/--cluster: a preset (smollm2-135m, tiny, small), checkpoint dir or .gguf file")
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message, rendered with the model's chat template")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    _add_sampling(p)
    p.add_argument("--stream", action="store_true", help="print text as it is produced")
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    from splitserve.workers.llm import LLM
    from splitserve.workers.sampling_params import SamplingParams

    if args.chat:  # each prompt becomes a one-message conversation
        args.prompts = [[{"role": "user", "content": p}] for p in args.prompts]
    if not (args.local or args.cluster or args.config):
        return _generate_on_server(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    if args.cluster or args.config:
        return _generate_on_cluster(args, params)
    start = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, device=args.device)
    print(f"loaded {args.model} on {llm.device} in {time.perf_counter() - start:.2f}s "
          f"({llm.blocks.num_blocks} KV blocks of {llm.blocks.block_size} tokens)", file=sys.stderr)
    if args.stream:
        for prompt in args.prompts:
            print(f">>> {_shown(prompt)}")
            for _, delta, done in llm.stream([prompt], params):
                print(delta, end="", flush=True)
                if done is not None:
                    print()
                    _print_timing(done)
        return 0
    start = time.perf_counter()
    outputs = llm.generate(list(args.prompts), params)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(args.prompts, outputs):
        print(f">>> {_shown(prompt)}\n{out.text}")
        _print_timing(out)
    tokens = sum(len(o.token_ids) for o in outputs)
    print(f"{len(outputs)} requests, {tokens} tokens in {elapsed:.3f}s ({tokens / elapsed:.1f} tok/s)", file=sys.stderr)
    return 0


def _generate_on_cluster(args, params) -> int:
    from splitserve.cluster.cluster import Cluster
    from splitserve.cluster.config import config_from_dict, load_config

    config = load_config(args.config)
    if args.config is None:  # the embedded default, with this command's model/dtype/device
        data = config.to_dict() | {"model": args.model, "dtype": args.dtype, "device": args.device}
        config = config_from_dict(data)
    start = time.perf_counter()
    with Cluster(config) as cluster:
        layout = ", ".join(f"{n} (tp{i.spec.tp})" for n, i in cluster.instances.items())
        print(f"cluster up in {time.perf_counter() - start:.1f}s: {layout}", file=sys.stderr)
        outputs = cluster.generate(list(args.prompts), params)
    for prompt, out in zip(args.prompts, outputs):
        print(f">>> {_shown(prompt)}\n{out.text}")
        if out.error:
            print(f"    [error: {out.error}]")
            continue
        m = out.metrics
        print(f"    [{len(out.token_ids)} tokens, finish={out.finish_reason}, TTFT {m['ttft_s'] * 1e3:.1f} ms, "
              f"KV transfer {m['kv_transfer_s'] * 1e3:.1f} ms, ITL {m['mean_itl_s'] * 1e3:.2f} ms, "
              f"{m['prefill_instance']} -> {m['decode_instance']}]")
    return 0 if all(o.error is None for o in outputs) else 1


def _shown(prompt) -> str:
    """A prompt as echoed before its answer: a chat shows its last message."""
    return prompt[-1]["content"] if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict) else prompt


def _print_timing(out) -> None:
    print(f"    [{len(out.token_ids)} tokens, finish={out.finish_reason}, TTFT {out.ttft_s * 1e3:.1f} ms, "
          f"TPOT {out.tpot_s * 1e3:.2f} ms, total {out.e2e_s * 1e3:.1f} ms]")


def _generate_on_server(args) -> int:
    from splitserve.cluster import serve_cli

    return serve_cli.generate_on_server(args)


# name: (module, its add-arguments function, its run function, help). Modules load only when the parser is built.
COMMANDS = {
    "serve": ("splitserve.cluster.serve_cli", "add_serve_arguments", "run_serve",
              "serve the gRPC API (default: the embedded 1 prefill + 1 decode config)"),
    "info": ("splitserve.cluster.serve_cli", "add_target_arguments", "run_info",
             "show a running server's model, layout, queue and KV usage"),
    "scale": ("splitserve.cluster.scale_cli", "add_arguments", "run",
              "set a running server's number of prefill/decode/colocated instances (launch or drain at runtime)"),
    "chat": ("splitserve.cluster.chat_cli", "add_arguments", "run",
             "an interactive, streamed conversation through a server (or --local), rendered with the chat template"),
    "fetch": ("splitserve.cluster.chat_cli", "add_fetch_arguments", "run_fetch",
              "fetch and convert a model into the model cache ahead of serving (smollm2-135m, a .gguf file)"),
    "demo": ("splitserve.cluster.serve_cli", "add_demo_arguments", "run_demo",
             "start the default server, stream a few requests through the gRPC client, print text and TTFT/TPOT, "
             "stop the server"),
    "bench": ("splitserve.cluster.bench", "add_arguments", "run",
              "load a running server with Poisson/gamma arrivals; report TTFT/TPOT/ITL/E2E percentiles, throughput, "
              "goodput and SLO attainment"),
    "batch": ("splitserve.cluster.batch", "add_arguments", "run",
              "offline inference over a JSONL file through the cluster (resumable; runs as a Ray job)"),
    "plan": ("splitserve.placement.cli", "add_arguments", "run",
             "choose each phase's parallelism and instance counts for latency targets"),
    "profile": ("splitserve.cluster.profiler", "add_arguments", "run",
                "measure prefill/decode times here (or through a server) and fit a latency profile for `plan`"),
}


def _add_command(sub, name: str) -> None:
    import importlib

    module_name, add_arguments, run, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    p = sub.add_parser(name, help=help_text)
    getattr(module, add_arguments)(p)
    p.set_defaults(func=getattr(module, run))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description="Disaggregated prefill/decode LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_command(sub, "serve")
    _add_generate(sub)
    for name in ("chat", "info", "scale", "demo", "bench", "batch", "plan", "profile", "fetch"):
        _add_command(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad options, missing files, a model the registry could not provide
        print(f"splitserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
