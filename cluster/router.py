"""Instance choice: the prefill instance with the fewest pending prompt tokens, the decode
instance with the most free KV blocks after the reservations made since its last report. No Ray here."""
from __future__ import annotations


class Router:
    def __init__(self, prefill: list[str], decode: list[str], colocated: list[str]):
        self.pending_tokens = {name: 0 for name in prefill + colocated}
        self.free_blocks = {name: 0 for name in decode + colocated}
        self.reserved_since_report = {name: 0 for name in decode + colocated}
        self.prefill, self.decode, self.colocated = prefill, decode, colocated

    def pick_prefill(self) -> str:
        return min(self.prefill, key=lambda n: (self.pending_tokens[n], n))

    def pick_colocated(self) -> str:
        return min(self.colocated, key=lambda n: (self.pending_tokens[n] - self.free_blocks[n], n))

    def decode_order(self) -> list[str]:
        return sorted(self.decode, key=lambda n: (-(self.free_blocks[n] - self.reserved_since_report[n]), n))

    def report(self, name: str, stats: dict) -> None:
        if name in self.free_blocks:
            self.free_blocks[name] = stats["free_blocks"]
            self.reserved_since_report[name] = 0

    def reserved(self, name: str, blocks: int) -> None:
        self.reserved_since_report[name] += blocks

    def prompt_started(self, name: str, tokens: int) -> None:
        self.pending_tokens[name] += tokens

    def prompt_done(self, name: str, tokens: int) -> None:
        self.pending_tokens[name] = max(0, self.pending_tokens[name] - tokens)
