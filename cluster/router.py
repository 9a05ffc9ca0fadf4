"""Instance choice among the serving instances. `least_loaded`: the prefill instance with the fewest pending prompt
tokens, the decode instance with the most free KV blocks after the reservations made since its last report.
`kv_aware` adds what each instance holds in its prefix cache (mirrored from the block-hash events the instances
report): prefill is scored by the prompt tokens it would compute plus its pending tokens, decode by its free blocks
plus the prompt's blocks it already holds (which it neither reserves nor receives). No Ray here."""
from __future__ import annotations

ROUTING_POLICIES = ("kv_aware", "least_loaded")


class Router:
    def __init__(self, prefill: list[str], decode: list[str], colocated: list[str], policy: str = "least_loaded",
                 overlap_weight: float = 1.0):
        self.pending_tokens = {name: 0 for name in prefill + colocated}
        self.free_blocks = {name: 0 for name in decode + colocated}
        self.reserved_since_report = {name: 0 for name in decode + colocated}
        self.cached: dict[str, set[int]] = {name: set() for name in prefill + decode + colocated}
        self.prefill, self.decode, self.colocated = prefill, decode, colocated
        self.serving = set(prefill + decode + colocated)
        self.policy, self.overlap_weight = policy, overlap_weight

    @property
    def kv_aware(self) -> bool:
        return self.policy == "kv_aware"

    def add(self, role: str, name: str) -> None:
        """A new instance (scaled up at runtime), serving from now on."""
        {"prefill": self.prefill, "decode": self.decode, "colocated": self.colocated}[role].append(name)
        if role in ("prefill", "colocated"):
            self.pending_tokens[name] = 0
        if role in ("decode", "colocated"):
            self.free_blocks[name] = self.reserved_since_report[name] = 0
        self.cached[name] = set()
        self.serving.add(name)

    def remove(self, name: str) -> None:
        for names in (self.prefill, self.decode, self.colocated):
            if name in names:
                names.remove(name)
        for table in (self.pending_tokens, self.free_blocks, self.reserved_since_report, self.cached):
            table.pop(name, None)
        self.serving.discard(name)

    def set_serving(self, name: str, serving: bool) -> None:
        """Out of service: never picked. Back in service: its load counts and cache mirror start afresh."""
        if serving:
            self.serving.add(name)
            if name in self.pending_tokens:
                self.pending_tokens[name] = 0
            if name in self.free_blocks:
                self.free_blocks[name], self.reserved_since_report[name] = 0, 0
        else:
            self.serving.discard(name)
        if name in self.cached:
            self.cached[name] = set()  # a relaunched instance starts with an empty cache

    def available(self, names: list[str]) -> list[str]:
        return [n for n in names if n in self.serving]

    def overlap(self, name: str, hashes: list[int]) -> int:
        """Leading blocks of a prompt (its chained block hashes) that the instance holds."""
        held, n = self.cached.get(name, ()), 0
        while n < len(hashes) and hashes[n] in held:
            n += 1
        return n

    def pick_prefill(self, hashes: list[int] = (), block_size: int = 1) -> str | None:
        if not self.kv_aware or not hashes:
            return min(self.available(self.prefill), key=lambda n: (self.pending_tokens[n], n), default=None)
        # Tokens this instance would compute (the prompt less its cached prefix) on top of those already pending.
        credit = self.overlap_weight * block_size
        return min(self.available(self.prefill),
                   key=lambda n: (self.pending_tokens[n] - credit * self.overlap(n, hashes), n), default=None)

    def pick_colocated(self, hashes: list[int] = (), block_size: int = 1) -> str | None:
        credit = self.overlap_weight * block_size if self.kv_aware else 0
        return min(self.available(self.colocated),
                   key=lambda n: (self.pending_tokens[n] - self.free_blocks[n] - credit * self.overlap(n, hashes), n),
                   default=None)

    def decode_order(self, hashes: list[int] = ()) -> list[str]:
        weight = self.overlap_weight if self.kv_aware else 0
        return sorted(self.available(self.decode),
                      key=lambda n: (-(self.free_blocks[n] - self.reserved_since_report[n]
                                       + weight * self.overlap(n, hashes)), n))

    def report(self, name: str, stats: dict) -> None:
        if name in self.free_blocks:
            self.free_blocks[name] = stats["free_blocks"]
            self.reserved_since_report[name] = 0

    def cache_events(self, name: str, events) -> None:
        """Mirrors an instance's prefix cache: (True, hash) stored, (False, hash) evicted, in order."""
        held = self.cached.get(name)
        if held is None:
            return
        for stored, h in events:
            (held.add if stored else held.discard)(h)

    def reserved(self, name: str, blocks: int) -> None:
        self.reserved_since_report[name] += blocks

    def prompt_started(self, name: str, tokens: int) -> None:
        self.pending_tokens[name] += tokens

    def prompt_done(self, name: str, tokens: int) -> None:
        self.pending_tokens[name] = max(0, self.pending_tokens[name] - tokens)
