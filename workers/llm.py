"""In-process colocated serving: one model, one KV cache, a prefill and a decode engine sharing it.
This is the single-instance baseline and the quickest way to generate text."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence as Seq


from splitserve.comm.tensor_parallel import SINGLE, TPGroup
from splitserve.workers.chat_template import ChatTemplate
from splitserve.workers.detokenizer import IncrementalDetokenizer
from splitserve.workers.engine_builder import build_engine, cache_salt, kv_cache_blocks
from splitserve.workers.engine_config import EngineConfig
from splitserve.workers.kv_cache import allocate_kv_cache
from splitserve.workers.layers.attention_backend import configure_attention
from splitserve.workers.loader import load_model, resolve_device, resolve_dtype
from splitserve.workers.model_runner import ModelRunner
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
    error: str | None = None  # why the engine failed the request (finish_reason "error")
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not computed)

    @property
    def tpot_s(self) -> float:
        n = len(self.token_ids)
        return (self.e2e_s - self.ttft_s) / (n - 1) if n > 1 else 0.0


_DEFAULTS = EngineConfig()


class LLM:
    def __init__(self, model: str = "tiny", dtype: str = "float32", device: str = "auto", tp: TPGroup = SINGLE,
                 block_size: int = _DEFAULTS.block_size, kv_cache_bytes: int = _DEFAULTS.kv_cache_bytes,
                 gpu_memory_fraction: float = _DEFAULTS.gpu_memory_fraction, max_num_seqs: int = _DEFAULTS.max_num_seqs,
                 max_num_batched_tokens: int = _DEFAULTS.max_num_batched_tokens, max_model_len: int | None = None,
                 tp_norm_method: str = _DEFAULTS.tp_norm_method, overlap_min_tokens: int | None = None,
                 chunked_prefill: bool = False, prefix_caching: bool = _DEFAULTS.prefix_caching,
                 backend: str = _DEFAULTS.backend, attention_backend: str = _DEFAULTS.attention_backend):
        """Engine options are `EngineConfig`'s, with its defaults. `chunked_prefill`: fuse prompt chunks with
        decode tokens in one forward per step (Dynamic SplitFuse) instead of alternating prompt batches and
        decode steps. `backend`: native, transformers or auto (see `EngineConfig.backend`)."""
        config = EngineConfig(block_size, kv_cache_bytes, gpu_memory_fraction, max_num_seqs, max_num_batched_tokens,
                              max_model_len, tp_norm_method, overlap_min_tokens, prefix_caching, backend,
                              attention_backend).validate()
        self.model_dir = resolve_model(model)
        self.device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype)
        self.model = load_model(self.model_dir, torch_dtype, self.device, tp, config.backend)
        self.model.configure_tp(config.tp_norm_method, config.overlap_min_tokens)
        configure_attention(self.model, config.attention_backend, self.device)
        cfg = self.model.cfg
        self.tokenizer = load_tokenizer(self.model_dir) if (self.model_dir / "tokenizer.json").is_file() else None
        self.chat_template = ChatTemplate.load(self.model_dir)
        self.max_model_len = config.context_len(cfg.max_position_embeddings)
        num_blocks = kv_cache_blocks(config, self.model, self.device, torch_dtype)
        caches = allocate_kv_cache(cfg.num_layers, num_blocks, config.block_size, self.model.num_kv_heads,
                                   cfg.head_dim, torch_dtype, self.device)
        self.eos_token_ids = cfg.eos_token_ids
        self.runner = ModelRunner(self.model, caches, self.eos_token_ids, self.device)
        self.core = build_engine("colocated", self.runner, num_blocks, config, self.max_model_len,
                                 chunked_prefill=chunked_prefill, cache_salt=cache_salt(self.model_dir, dtype))
        self.blocks = self.core.blocks
        self._ids = itertools.count()

    def encode(self, prompt: str | Seq[int] | Seq[dict]) -> list[int]:
        """Text, token ids, or a chat (a list of {role, content}) rendered with the model's chat template."""
        return encode_prompt(prompt, self.tokenizer, self.model.cfg.vocab_size, self.chat_template)

    def make_sequence(self, prompt: str | Seq[int], params: SamplingParams) -> Sequence:
        ids = self.encode(prompt)
        params.check_for_model(self.model.cfg.vocab_size, self.eos_token_ids)
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
            self.core.check_fits(seq)
        for seq in seqs:
            self.core.add(seq)
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
            ttft_s=(t.first_token or t.finished) - t.arrival, e2e_s=t.finished - t.arrival, num_preemptions=seq.num_preemptions,
            error=seq.error, cached_tokens=seq.num_cached_tokens,
        )
