"""Which sequences run in the next forward: FCFS prompt batching under a token budget, and continuous
batching of decodes with preemption (recompute) when the cache runs out of blocks. No torch."""
from __future__ import annotations

from collections import deque

from splitserve.workers.block_manager import BlockManager
from splitserve.workers.sequence import Sequence, SequenceStatus


class PrefillScheduler:
    def __init__(self, blocks: BlockManager, max_batched_tokens: int, max_seqs: int):
        self.blocks = blocks
        self.max_batched_tokens = max_batched_tokens
        self.max_seqs = max_seqs
        self.waiting: deque[Sequence] = deque()

    def check_fits(self, seq: Sequence) -> None:
        if self.blocks.blocks_needed(seq.num_tokens + 1) > self.blocks.num_blocks:
            raise ValueError(
                f"prompt: {seq.num_tokens} tokens do not fit the KV cache "
                f"({self.blocks.num_blocks * self.blocks.block_size} token slots)"
            )

    def add(self, seq: Sequence, front: bool = False) -> None:
        self.check_fits(seq)
        seq.status = SequenceStatus.WAITING
        (self.waiting.appendleft if front else self.waiting.append)(seq)

    def schedule(self, reserve_blocks: int = 0) -> list[Sequence]:
        """FCFS; a prompt longer than the budget still runs, alone, so it cannot starve. `reserve_blocks`
        stay free so that admitting prompts does not force running decodes into preemption. A prompt starts on
        the cached blocks of its longest cached prefix and computes (and counts against the budget) only the rest."""
        batch, tokens = [], 0
        while self.waiting and len(batch) < self.max_seqs:
            seq = self.waiting[0]
            prefix = seq.prompt_prefix()
            new_tokens = seq.num_tokens - len(self.blocks.match(prefix)) * self.blocks.block_size
            if batch and tokens + new_tokens > self.max_batched_tokens:
                break
            if not self.blocks.can_allocate(seq.num_tokens, prefix, reserve_blocks):
                break
            self.blocks.allocate(seq.seq_id, seq.num_tokens, prefix)
            seq.start_from_cache(self.blocks.num_cached_tokens(seq.seq_id))
            self.blocks.count_lookup(seq.num_tokens, seq.num_computed_tokens)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            batch.append(seq)
            tokens += new_tokens
        return batch

    def abort(self, seq_id: str) -> Sequence | None:
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                return seq
        return None


class DecodeScheduler:
    def __init__(self, blocks: BlockManager, max_seqs: int):
        self.blocks = blocks
        self.max_seqs = max_seqs
        self.waiting: deque[Sequence] = deque()  # KV present, not yet admitted to the running batch
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        assert self.blocks.has(seq.seq_id), "a decode sequence arrives with its KV blocks"
        self.waiting.append(seq)

    def schedule(self, busy: frozenset[str] = frozenset(), limit: int | None = None
                 ) -> tuple[list[Sequence], list[Sequence]]:
        """The batch for one decode step, and the sequences preempted to make room (their blocks are freed).
        `busy`: sequences still in a pipeline (their step is not done): they are neither scheduled nor preempted;
        a sequence that finds no room while others are busy waits for them instead of giving up its own KV.
        `limit`: at most this many sequences."""
        while self.waiting and len(self.running) < self.max_seqs:
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        preempted: list[Sequence] = []
        batch: list[Sequence] = []
        for seq in list(self.running):
            if seq in preempted or seq.seq_id in busy:
                continue
            if limit is not None and len(batch) >= limit:
                break
            while not self.blocks.can_append(seq.seq_id):
                later = self.running[self.running.index(seq) + 1:]  # the newest sequences go first
                victim = next((s for s in reversed(later) if s.seq_id not in busy), None)
                if victim is None:
                    break
                preempted.append(self._preempt(victim))
            if not self.blocks.can_append(seq.seq_id):
                if not busy:
                    preempted.append(self._preempt(seq))
                continue
            self.blocks.append(seq.seq_id)
            batch.append(seq)
        return batch, preempted

    def _preempt(self, seq: Sequence) -> Sequence:
        # The newest sequence loses its cache and is recomputed from its tokens later.
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        return seq

    def retire(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)

    def abort(self, seq_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    self.blocks.free(seq_id)
                    return seq
        return None

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)


class SplitFuseScheduler:
    """Dynamic SplitFuse: every step runs each decoding sequence's next token plus prompt chunks that fill the
    rest of the token budget; a long prompt is split over steps, short ones are fused whole."""

    def __init__(self, blocks: BlockManager, max_batched_tokens: int, max_seqs: int):
        self.blocks = blocks
        self.max_batched_tokens = max_batched_tokens
        self.max_seqs = max_seqs
        self.prompts = PrefillScheduler(blocks, max_batched_tokens, max_seqs)  # its queue and admission checks
        self.decoding = DecodeScheduler(blocks, max_seqs)

    @property
    def waiting(self):
        return self.prompts.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.decoding.running

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """[(sequence, tokens to compute now)] and the sequences preempted to make room (back in the queue)."""
        decodes, preempted = self.decoding.schedule()
        for seq in reversed(preempted):
            self.prompts.add(seq, front=True)
        batch = [(seq, 1) for seq in decodes]
        budget = self.max_batched_tokens - len(batch)
        while self.waiting and budget > 0 and len(batch) < self.max_seqs:
            seq = self.waiting[0]
            if not self.blocks.has(seq.seq_id) and not self._begin(seq):
                break
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._make_room(seq, n):
                break
            batch.append((seq, n))
            budget -= n
            if seq.num_computed_tokens + n < seq.num_tokens:
                break  # a chunk in progress stays at the head of the queue
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
        return batch, preempted

    def _begin(self, seq: Sequence) -> bool:
        """A prompt's first chunk: it takes the cached blocks of its longest cached prefix (none without caching)
        and computes from there."""
        prefix = seq.prompt_prefix()
        cached = len(self.blocks.match(prefix)) * self.blocks.block_size
        if not self.blocks.can_allocate(cached, prefix, reserve=len(self.running)):
            return False
        self.blocks.allocate(seq.seq_id, cached, prefix)
        seq.start_from_cache(self.blocks.num_cached_tokens(seq.seq_id))
        self.blocks.count_lookup(seq.num_tokens, seq.num_computed_tokens)
        return True

    def _make_room(self, seq: Sequence, n: int) -> bool:
        # Running decodes keep a block each of headroom so a prompt chunk does not force their preemption.
        needed = self.blocks.blocks_needed(seq.num_computed_tokens + n)
        have = len(self.blocks.block_table(seq.seq_id))
        if needed - have + len(self.running) > self.blocks.num_free_blocks:
            return False
        self.blocks.append(seq.seq_id, seq.num_computed_tokens + n - self.blocks.num_tokens(seq.seq_id))
        return True

    def started(self, seq: Sequence) -> None:
        """A prompt finished and sampled its first token: it decodes from the next step on."""
        self.decoding.running.append(seq)

    def retire(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.free(seq.seq_id)

    def abort(self, seq_id: str) -> Sequence | None:
        seq = self.prompts.abort(seq_id) or self.decoding.abort(seq_id)
        self.blocks.free(seq_id)
        return seq
