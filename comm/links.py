"""Links: stateless 2-rank process groups between one prefill rank and one decode rank, built straight from a
store, so a failing link poisons no other group. Waits poll against our own deadline: a gloo timeout would close
the connection for good, while an abandoned receive only absorbs its own late message."""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from splitserve.comm.kv_plan import LinkId  # noqa: F401 (links are named by it)

# Connections stay open across idle periods; deadlines are enforced by `wait_for`, not by the backend.
_BACKEND_TIMEOUT = timedelta(days=7)
SENDER, RECEIVER = 0, 1


class LinkTimeout(TimeoutError):
    pass


class LinkBroken(RuntimeError):
    pass


class Link:
    """One side of a link. The prefill side is rank 0 of the pair, the decode side rank 1."""

    def __init__(self, link_id: LinkId, side: int, store: dist.Store, device: torch.device, generation: int = 0):
        """`generation` names this connection in the store: a link rebuilt to a relaunched peer must not meet the
        keys its predecessor left there."""
        self.id = link_id
        self.side = side
        self.peer = 1 - side
        self.device = device
        prefixed = dist.PrefixStore(f"{link_id.key}/{generation}", store)
        if device.type == "cuda":
            self.group = dist.ProcessGroupNCCL(prefixed, side, 2)
        else:
            self.group = dist.ProcessGroupGloo(prefixed, side, 2, _BACKEND_TIMEOUT)
        self._abandoned: list[torch.Tensor] = []  # buffers of receives we stopped waiting for

    def abandon(self, buffers) -> None:
        """Keeps buffers of operations we no longer wait for alive: the backend may still write into them."""
        self._abandoned.extend(b for b in buffers if b is not None)

    def isend(self, tensor: torch.Tensor, tag: int):
        return self.group.send([tensor], self.peer, tag)

    def irecv(self, tensor: torch.Tensor, tag: int):
        return self.group.recv([tensor], self.peer, tag)

    def wait_for(self, work, buffer: torch.Tensor, deadline: float | None) -> None:
        """Waits for `work` until `deadline` (time.monotonic()); None waits without limit."""
        if deadline is None:
            try:
                work.wait()
            except RuntimeError as e:
                raise LinkBroken(f"{self.id.key}: {e}") from e
            return
        for _ in self.completions([(work, buffer)], deadline):
            pass

    def completions(self, items: list[tuple], deadline: float):
        """Yields the index of each (work, buffer) as it completes, in order; LinkTimeout at the deadline.

        Gloo reports point-to-point work as complete only from `wait()`, so a waiter thread waits on them in
        order; a transfer that stalls leaves behind only its own waiter and buffers, not a broken link."""
        done = [threading.Event() for _ in items]
        errors: list[BaseException | None] = [None] * len(items)

        def waiter():
            for i, (work, _) in enumerate(items):
                try:
                    work.wait()
                except RuntimeError as e:
                    errors[i:] = [e] * (len(items) - i)
                    for event in done[i:]:
                        event.set()
                    return
                done[i].set()

        threading.Thread(target=waiter, name="link-waiter", daemon=True).start()
        for i in range(len(items)):
            if not done[i].wait(max(0.0, deadline - time.monotonic())):
                self.abandon(buf for _, buf in items[i:])
                raise LinkTimeout(f"{self.id.key}: no data before the transfer deadline")
            if errors[i] is not None:
                raise LinkBroken(f"{self.id.key}: {errors[i]}") from errors[i]
            yield i

    def send(self, tensor: torch.Tensor, tag: int, deadline: float | None) -> None:
        self.wait_for(self.isend(tensor, tag), tensor, deadline)

    def recv(self, tensor: torch.Tensor, tag: int, deadline: float | None) -> torch.Tensor:
        self.wait_for(self.irecv(tensor, tag), tensor, deadline)
        return tensor
