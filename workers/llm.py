"""In-process colocated serving: one model, one KV cache, a prefill and a decode engine sharing it.
This is the single-instance baseline and the quickest way to generate text."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from splitserve.comm.tensor_parallel import SINGLE, TPGroup
from splitserve.workers.block_manager import BlockManager
from splitserve.workers.detokenizer import IncrementalDetokenizer
from splitserve.workers.kv_cache import allocate_kv_cache, cuda_budget, num_blocks_for_budget
from splitserve.workers.loader import load_model, resolve_dtype
from splitserve.workers.model_runner import ModelRunner
from splitserve.workers.engine_core import EngineCore
from splitserve.workers.splitfuse_engine import SplitFuseEngine
from splitserve.workers.prefill_engine import EngineOutput
from splitserve.workers.presets import resolve_model
from splitserve.workers.sampling_params import SamplingParams, pair_with_params
from splitserve.workers.sequence import Sequence
from splitserve.workers.stop import StopChecker
from splitserve.workers.tokenizer import encode_prompt, load_tokenizer


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None
    ttft_s: float
    e2e_s: float
    num_preemptions: int

    @property
    def tpot_s(self) -> float:
        n = len(self.token_ids)
        return (self.e2e_s - self.ttft_s) / (n - 1) if n > 1 else 0.0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device: must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA device is available")
    return torch.device(device)


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return value


class LLM:
    def __init__(self, model: str = "tiny", dtype: str = "float32", device: str = "auto", tp: TPGroup = SINGLE,
                 block_size: int = 16, kv_cache_bytes: int = 256 << 20, gpu_memory_fraction: float = 0.9,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 4096, max_model_len: int | None = None,
                 tp_norm_method: str = "reference", overlap_min_tokens: int | None = None,
                 chunked_prefill: bool = False):
        """`chunked_prefill`: fuse prompt chunks with decode tokens in one forward per step (Dynamic SplitFuse)
        instead of alternating prompt batches and decode steps."""
        self.model_dir = resolve_model(model)
        self.device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype)
        self.model = load_model(self.model_dir, torch_dtype, self.device, tp)
        self.model.configure_tp(tp_norm_method, overlap_min_tokens)
        cfg = self.model.cfg
        self.tokenizer = load_tokenizer(self.model_dir) if (self.model_dir / "tokenizer.json").is_file() else None
        self.max_model_len = _positive("max_model_len", max_model_len or cfg.max_position_embeddings)
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len: {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({cfg.max_position_embeddings})")
        _positive("block_size", block_size)
        budget = cuda_budget(gpu_memory_fraction, self.device) if self.device.type == "cuda" else kv_cache_bytes
        kv_heads = self.model.num_kv_heads
        num_blocks = num_blocks_for_budget(budget, cfg.num_layers, block_size, kv_heads, cfg.head_dim, torch_dtype)
        self.blocks = BlockManager(num_blocks, block_size)
        caches = allocate_kv_cache(cfg.num_layers, num_blocks, block_size, kv_heads, cfg.head_dim, torch_dtype, self.device)
        self.eos_token_ids = cfg.eos_token_ids
        runner = ModelRunner(self.model, caches, self.eos_token_ids, self.device)
        engine = SplitFuseEngine if chunked_prefill else EngineCore
        self.core = engine(runner, self.blocks, _positive("max_num_seqs", max_num_seqs),
                           _positive("max_num_batched_tokens", max_num_batched_tokens), self.max_model_len)
        # Where prompts are queued: the prefill engine, or the fused engine itself.
        self.prefill = self.core if chunked_prefill else self.core.prefill
        self._ids = itertools.count()

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        return encode_prompt(prompt, self.tokenizer, self.model.cfg.vocab_size)

    def make_sequence(self, prompt: str | Seq[int], params: SamplingParams) -> Sequence:
        ids = self.encode(prompt)
        detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
        seq_id = str(next(self._ids))
        return Sequence(seq_id, ids, params, StopChecker(params, self.eos_token_ids, detok))

    def generate(self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        seqs = self._admit(*pair_with_params(prompts, params))
        self.run_until_done()
        return [self.output(s) for s in seqs]

    def _admit(self, prompts, plist) -> list[Sequence]:
        seqs = [self.make_sequence(p, sp) for p, sp in zip(prompts, plist)]
        for seq in seqs:  # validate every prompt before any runs, so a bad one admits nothing
            if seq.num_tokens >= self.max_model_len:
                raise ValueError(f"prompt: {seq.num_tokens} tokens leave no room to generate within "
                                 f"max_model_len={self.max_model_len}")
            self.prefill.check_fits(seq)
        for seq in seqs:
            self.prefill.add(seq)
        return seqs

    def stream(self, prompts: Seq[str | Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None):
        """Yields (prompt index, text delta, finished output or None) as tokens are produced."""
        prompts, plist = pair_with_params(prompts, params)
        seqs = self._admit(prompts, plist)
        index = {s.seq_id: i for i, s in enumerate(seqs)}
        while self.has_unfinished():
            for out in self.step():
                if out.seq.seq_id in index:
                    done = self.output(out.seq) if out.result.finished else None
                    yield index[out.seq.seq_id], out.result.text_delta, done

    def step(self) -> list[EngineOutput]:
        return self.core.step()

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def run_until_done(self) -> None:
        while self.has_unfinished():
            self.step()

    @staticmethod
    def output(seq: Sequence) -> RequestOutput:
        t = seq.timing
        return RequestOutput(
            request_id=seq.seq_id, prompt_token_ids=seq.prompt_token_ids, text=seq.stop.text,
            token_ids=seq.output_token_ids, finish_reason=seq.stop.finish_reason, stop_reason=seq.stop.stop_reason,
            ttft_s=t.first_token - t.arrival, e2e_s=t.finished - t.arrival, num_preemptions=seq.num_preemptions,
        )
