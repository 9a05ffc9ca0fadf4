"""Seconds a process spends blocked in torch.distributed communication, for `splitserve profile --layouts`: the
collectives and point-to-point calls the instance code makes are wrapped (in the profiling process only) so that
each synchronous call, and each `wait()` on an asynchronous one's handle, adds its wall time. What a rank waits for
includes its peers reaching the call (their compute, or their core being busy elsewhere), as a forward sees it."""
from __future__ import annotations

import time

# The calls the TP layers, the fused all-reduce + norm, the SP rings and the pipeline stages make.
WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "send", "recv", "isend",
           "irecv", "batch_isend_irecv")


class _TimedWork:
    """An asynchronous call's handle whose `wait` counts as blocked time."""

    def __init__(self, work, timer: "CommTimer"):
        self._work, self._timer = work, timer

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._timer.seconds += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self._work, name)


class CommTimer:
    """Install once, before the instance code is imported (a module may bind a function at import)."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0  # communication calls issued (each message or collective once)

    def install(self) -> "CommTimer":
        import torch.distributed as dist

        for name in WRAPPED:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(original))
        return self

    def _wrap(self, call):
        def timed(*args, **kwargs):
            self.calls += 1
            start = time.perf_counter()
            try:
                result = call(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
            if result is None:
                return None
            if isinstance(result, list):  # batch_isend_irecv
                return [_TimedWork(w, self) for w in result]
            return _TimedWork(result, self)

        timed.__wrapped__ = call
        return timed
