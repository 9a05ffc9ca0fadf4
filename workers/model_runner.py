"""Runs one forward of the model over a `ForwardBatch` and samples the next tokens."""
from __future__ import annotations

import torch

from splitserve.workers.batch import ForwardBatch
from splitserve.workers.layers.attention import AttentionMetadata
from splitserve.workers.model import CausalLM
from splitserve.workers.sampler import SampleRequest, Sampler, make_generator
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
        for seq in seqs:
            if seq.generator is None and seq.params.seed is not None:
                seq.generator = make_generator(seq.params.seed, self.device)
        requests = [SampleRequest(s.params, s.prompt_token_ids, s.output_token_ids, s.generator) for s in seqs]
        return self.sampler(logits, requests)

    def run(self, batch: ForwardBatch, seqs: list[Sequence]) -> list[int]:
        """Next tokens of the sequences that reach their end in this forward (all of them unless chunked)."""
        logits = self.execute(batch, seqs)
        if batch.completes is not None and not all(batch.completes):
            seqs = [s for s, done in zip(seqs, batch.completes) if done]
        return self.sample(logits, seqs) if seqs else []
