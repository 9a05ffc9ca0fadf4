"""A prefill and a decode engine sharing one model and one KV cache: the colocated instance, and the decode
instance (which recomputes preempted sequences itself)."""
from __future__ import annotations

from splitserve.workers.block_manager import BlockManager
from splitserve.workers.decode_engine import DecodeEngine
from splitserve.workers.model_runner import ModelRunner
from splitserve.workers.prefill_engine import EngineOutput, PrefillEngine
from splitserve.workers.sequence import Sequence


class EngineCore:
    def __init__(self, runner: ModelRunner, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, decode: DecodeEngine | None = None):
        """`decode`: the decode engine to use (e.g. a pipelined one); a plain `DecodeEngine` by default."""
        self.blocks = blocks
        self.prefill = PrefillEngine(runner, blocks, max_num_batched_tokens, max_num_seqs, max_model_len)
        self.decode = decode or DecodeEngine(runner, blocks, max_num_seqs, max_model_len)
        self.num_preemptions = 0  # decodes sent back to be recomputed, for the instance's stats

    def step(self) -> list[EngineOutput]:
        """One round: a prompt batch if any can be admitted, then one decode step."""
        if self.prefill.num_waiting:
            self.decode.flush()  # a prompt forward runs through a pipeline alone
        outputs = self.prefill.step(reserve_blocks=self.decode.num_running)
        for out in outputs:
            if not out.result.finished:
                self.decode.add(out.seq)
        decode = self.decode.step()
        self.num_preemptions += len(decode.preempted)
        for seq in decode.preempted:
            self.prefill.add(seq, front=True)
        return outputs + decode.outputs

    def add(self, seq: Sequence, front: bool = False) -> None:
        self.prefill.add(seq, front)

    def admit(self, seq: Sequence) -> None:
        """A sequence whose KV arrived from elsewhere (a prefill instance) joins the running batch."""
        self.decode.add(seq)

    def check_fits(self, seq: Sequence) -> None:
        self.prefill.check_fits(seq)

    @property
    def num_waiting(self) -> int:
        return self.prefill.num_waiting

    @property
    def num_running(self) -> int:
        return self.decode.num_running

    def has_unfinished(self) -> bool:
        return self.prefill.num_waiting > 0 or self.decode.num_unfinished > 0

    def abort(self, seq_id: str) -> Sequence | None:
        """Removes a sequence wherever it is and frees its blocks."""
        seq = self.prefill.abort(seq_id) or self.decode.abort(seq_id)
        self.blocks.free(seq_id)
        return seq
