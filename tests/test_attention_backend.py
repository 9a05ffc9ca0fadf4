"""engine.attention_backend: which path runs where, and the Triton backend at model level under Triton's
interpreter giving transformers' greedy tokens (decode steps and prompt chunks over a cached prefix)."""
import pytest
import torch

from splitserve.kernels import backend
from splitserve.workers.layers.attention import PagedAttention
from splitserve.workers.layers.attention_backend import BACKENDS, configure_attention, resolve_backend


def test_auto_is_torch_on_cpu_and_triton_is_refused_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="attention_backend: 'triton' needs"):
        resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="attention_backend: must be one of"):
        resolve_backend("flash", cpu)
    assert BACKENDS == ("auto", "triton", "torch")


@pytest.mark.skipif(not backend.HAS_TRITON, reason="triton is not installed")
def test_auto_stays_torch_on_cpu_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_configure_torch_clears_every_layer():
    layers = torch.nn.ModuleList(PagedAttention(4, 2, 16) for _ in range(3))
    for layer in layers:
        layer.kernel = object()
    assert configure_attention(layers, "torch", torch.device("cpu")) == "torch"
    assert all(layer.kernel is None for layer in layers)
