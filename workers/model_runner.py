"""Runs one forward of the model over a `ForwardBatch` and samples the next tokens."""
from __future__ import annotations

import torch

from splitserve.workers.batch import ForwardBatch
from splitserve.workers.layers.attention import AttentionMetadata
from splitserve.workers.model import CausalLM
from splitserve.workers.sampler import FAILED_TOKEN, SampleRequest, Sampler, make_generator, position_seed
from splitserve.workers.sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], eos_token_ids, device, execute=None):
        """`execute(batch, seqs) -> logits` replaces the plain forward of one step: an instance leader passes one
        that sends the step to its follower ranks and runs this rank's shard."""
        self.model = model
        self.kv_caches = kv_caches
        self.device = torch.device(device)
        self.sampler = Sampler(eos_token_ids)
        self.execute = execute or (lambda batch, seqs: self.forward_logits(batch))

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _metadata(self, batch: ForwardBatch) -> AttentionMetadata:
        fresh = batch.query_lens == batch.context_lens
        tables = None
        if not fresh:
            width = max(len(t) for t in batch.block_tables)
            tables = self._tensor([t + [0] * (width - len(t)) for t in batch.block_tables])
        return AttentionMetadata(
            slot_mapping=self._tensor(batch.slot_mapping),
            query_lens=batch.query_lens,
            context_lens=batch.context_lens,
            block_tables=tables,
            context_lens_t=None if fresh else self._tensor(batch.context_lens),
        )

    @torch.inference_mode()
    def forward_logits(self, batch: ForwardBatch, on_kv_written=None) -> torch.Tensor:
        """Float32 logits [len(sample_rows), vocab] after writing the batch's K/V into the cache."""
        meta = self._metadata(batch)
        meta.on_kv_written = on_kv_written
        hidden = self.model(self._tensor(batch.input_ids), self._tensor(batch.positions), self.kv_caches, meta)
        return self.model.compute_logits(hidden[self._tensor(batch.sample_rows)])

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """One token per sequence. A request whose sampling fails gets FAILED_TOKEN and its reason in `seq.error`;
        the rest of the batch keeps its tokens."""
        requests = [SampleRequest(s.params, s.prompt_token_ids, s.output_token_ids, self._generator(s)) for s in seqs]
        try:
            return self.sampler(logits, requests)
        except Exception:  # find the request at fault, one row at a time
            return [self._sample_one(logits[i : i + 1], r, seq) for i, (r, seq) in enumerate(zip(requests, seqs))]

    def _sample_one(self, logits: torch.Tensor, request: SampleRequest, seq: Sequence) -> int:
        try:
            return self.sampler(logits, [request])[0]
        except Exception as e:
            seq.error = f"sampling failed: {e}"
            return FAILED_TOKEN

    def _generator(self, seq: Sequence):
        """A seeded request draws from a generator seeded by (seed, output position): its tokens do not depend on
        which process sampled the earlier ones, so a migrated request continues exactly as it would have."""
        if seq.params.seed is None:
            return None
        return make_generator(position_seed(seq.params.seed, len(seq.output_token_ids)), self.device)

    def run(self, batch: ForwardBatch, seqs: list[Sequence]) -> list[int]:
        """Next tokens of the sequences that reach their end in this forward (all of them unless chunked)."""
        logits = self.execute(batch, seqs)
        if batch.completes is not None and not all(batch.completes):
            seqs = [s for s, done in zip(seqs, batch.completes) if done]
        return self.sample(logits, seqs) if seqs else []
