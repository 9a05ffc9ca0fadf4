"""Instance choice among the serving instances: the prefill instance with the fewest pending prompt tokens, the
decode instance with the most free KV blocks after the reservations made since its last report. No Ray here."""
from __future__ import annotations


class Router:
    def __init__(self, prefill: list[str], decode: list[str], colocated: list[str]):
        self.pending_tokens = {name: 0 for name in prefill + colocated}
        self.free_blocks = {name: 0 for name in decode + colocated}
        self.reserved_since_report = {name: 0 for name in decode + colocated}
        self.prefill, self.decode, self.colocated = prefill, decode, colocated
        self.serving = set(prefill + decode + colocated)

    def add(self, role: str, name: str) -> None:
        """A new instance (scaled up at runtime), serving from now on."""
        {"prefill": self.prefill, "decode": self.decode, "colocated": self.colocated}[role].append(name)
        if role in ("prefill", "colocated"):
            self.pending_tokens[name] = 0
        if role in ("decode", "colocated"):
            self.free_blocks[name] = self.reserved_since_report[name] = 0
        self.serving.add(name)

    def remove(self, name: str) -> None:
        for names in (self.prefill, self.decode, self.colocated):
            if name in names:
                names.remove(name)
        for table in (self.pending_tokens, self.free_blocks, self.reserved_since_report):
            table.pop(name, None)
        self.serving.discard(name)

    def set_serving(self, name: str, serving: bool) -> None:
        """Out of service: never picked. Back in service: its load counts start afresh."""
        if serving:
            self.serving.add(name)
            if name in self.pending_tokens:
                self.pending_tokens[name] = 0
            if name in self.free_blocks:
                self.free_blocks[name], self.reserved_since_report[name] = 0, 0
        else:
            self.serving.discard(name)

    def available(self, names: list[str]) -> list[str]:
        return [n for n in names if n in self.serving]

    def pick_prefill(self) -> str | None:
        return min(self.available(self.prefill), key=lambda n: (self.pending_tokens[n], n), default=None)

    def pick_colocated(self) -> str | None:
        return min(self.available(self.colocated), key=lambda n: (self.pending_tokens[n] - self.free_blocks[n], n),
                   default=None)

    def decode_order(self) -> list[str]:
        return sorted(self.available(self.decode),
                      key=lambda n: (-(self.free_blocks[n] - self.reserved_since_report[n]), n))

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
