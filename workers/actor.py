"""The Ray actor that hosts one rank: one verb, `call(method, *args)`, forwards to the rank or its leader."""
from __future__ import annotations

import ray


@ray.remote(max_concurrency=16)
class RankActor:
    def __init__(self, spec, rank: int):
        from splitserve.workers.instance import RankWorker

        self.worker = RankWorker(spec, rank)

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def call(self, method: str, *args, **kwargs):
        return getattr(self.worker, method)(*args, **kwargs)

    def lead(self, method: str, *args, **kwargs):
        """Leader-only commands (submit, reserve, poll, ...)."""
        if self.worker.leader is None:
            raise RuntimeError(f"rank {self.worker.rank} of {self.worker.spec.name} is not the leader")
        return getattr(self.worker.leader, method)(*args, **kwargs)
