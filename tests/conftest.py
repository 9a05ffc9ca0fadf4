"""Shared test setup: one preset cache per checkout, single-threaded torch (2 cores are shared), and one local Ray
for the whole run where tests can share it."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("SPLITSERVE_CACHE", str(Path(__file__).resolve().parent.parent / ".splitserve-cache"))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only

import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_RAY = dict(num_cpus=2, num_gpus=8, include_dashboard=False, namespace="splitserve-tests", log_to_driver=False)


@pytest.fixture(scope="module")
def ray_runtime():
    """The shared local Ray (127.0.0.1, 8 logical GPUs): started by the first module that needs it and kept for the
    next ones; a module that needs a Ray of its own stops it (`own_ray`), and the next user starts it again."""
    import ray

    if not ray.is_initialized():
        ray.init(**SHARED_RAY)
    yield ray


@pytest.fixture(scope="module")
def own_ray():
    """For modules that start a Ray of their own (other resources, or through the launcher): none is running on
    entry, and whatever they started is stopped on exit."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield ray
    if ray.is_initialized():
        ray.shutdown()


def pytest_sessionfinish(session, exitstatus):
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
