"""The transformers backend: a checkpoint's own transformers model class, its attention routed to our paged KV cache
through transformers' attention interface, behind the same interface as the native `CausalLM`.

Packed tokens of several sequences run as one batch row with explicit position ids; no dense mask is built (the
registered mask function returns None) because `PagedAttention` knows each sequence's extent from the metadata."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from splitserve.comm.tensor_parallel import SINGLE, TPGroup
from splitserve.workers.config import ModelConfig
from splitserve.workers.hf_config import autotp_problem, hf_config, unsupported_reason
from splitserve.workers.layers.attention import AttentionMetadata, PagedAttention

ATTENTION = "splitserve_paged"
_active = threading.local()  # the HFCausalLM whose forward is running on this thread


class _Refused(ValueError):
    pass


def _paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-interface signature: query [1, H, T, d], key/value [1, Hkv, T, d] -> [1, T, H, d]."""
    model = getattr(_active, "model", None)
    if model is None:
        raise RuntimeError(f"{ATTENTION} attention runs only inside a splitserve HFCausalLM forward")
    for name in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise _Refused(f"its attention passes {name}, which the paged attention path does not support")
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    return model.attend(module, query, key, value, scaling, window), None


def _no_mask(*args, **kwargs):
    return None


def register_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, _paged_attention)
    AttentionMaskInterface.register(ATTENTION, _no_mask)


class HFCausalLM(nn.Module):
    """`forward(input_ids, positions, kv_caches, meta) -> hidden [tokens, hidden]` and `compute_logits`, like
    `CausalLM`. Layer i's K/V go to `kv_caches[i]`; i is the attention module's `layer_idx`, or its call order."""

    def __init__(self, hf: nn.Module, cfg: ModelConfig, tp: TPGroup = SINGLE):
        super().__init__()
        self.hf, self.cfg, self.tp = hf, cfg, tp
        self.body = hf.base_model
        self.softcap = getattr(hf.config, "final_logit_softcapping", None)
        self.attn = nn.ModuleList()
        self._layer_of: dict[int, int] = {}  # id(attention module) -> layer
        self._meta: AttentionMetadata | None = None
        self._caches: list[torch.Tensor] | None = None
        self._probing: list | None = None
        self._probe()

    def configure_tp(self, norm_method: str = "reference", overlap_min_tokens: int | None = None) -> None:
        """The native model's fused norm and overlap options have no counterpart here (AutoTP reduces in its own
        row-parallel layers); a request for overlap is refused rather than ignored."""
        if overlap_min_tokens is not None:
            raise ValueError("engine.overlap_min_tokens: not available with the transformers backend")
        if norm_method not in ("reference", "auto"):
            raise ValueError(f"engine.tp_norm_method: {norm_method!r} is not available with the transformers backend "
                             "(AutoTP reduces in its own layers); use reference or auto")
        self.tp_norm_method, self.overlap_min_tokens = norm_method, None

    @property
    def layers(self) -> nn.ModuleList:
        """One entry per decoder layer (its paged attention), as the engine counts layers."""
        return self.attn

    @property
    def num_kv_heads(self) -> int:
        return self.attn[0].num_kv_heads

    @contextmanager
    def _running(self, kv_caches, meta):
        self._caches, self._meta, previous = kv_caches, meta, getattr(_active, "model", None)
        _active.model = self
        try:
            yield
        finally:
            _active.model, self._caches, self._meta = previous, None, None

    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor] | None, meta: AttentionMetadata,
                residual: torch.Tensor | None = None):
        """`residual` is the native model's pipeline-stage input; this backend runs no stages (refused at start-up),
        so it is always None here."""
        if residual is not None:
            raise ValueError("pp: pipeline stages are not available with the transformers backend")
        with self._running(kv_caches, meta):
            out = self.body(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # As one batch row: AutoTP's sharded LM head slices its input as [batch, tokens, hidden].
        logits = self.hf.get_output_embeddings()(hidden[None])[0].float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def attend(self, module, query, key, value, scaling, window):
        if self._probing is not None:
            return self._probe_layer(module, query, key, value, scaling, window)
        layer = self._layer_of[id(module)]
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        cache = None if self._caches is None else self._caches[layer]
        out = self.attn[layer](q, k.contiguous(), v.contiguous(), cache, self._meta)
        return out.view(1, q.shape[0], q.shape[1], q.shape[2])

    # ------------------------------------------------------------------------------------------- start-up
    def _probe(self) -> None:
        """One tiny forward finds which module is which layer and each layer's local heads, window and scale, and
        proves that every layer's attention goes through the interface."""
        arch = self.cfg.architecture
        self._probing = []
        ids = torch.zeros(2, dtype=torch.long, device=self.hf.device)
        meta = AttentionMetadata(torch.empty(0, dtype=torch.long), [2], [2], None)
        try:
            with torch.inference_mode():
                self.forward(ids, torch.arange(2, device=ids.device), None, meta)
        except _Refused as e:
            raise ValueError(f"model: architecture {arch}: {e}") from None
        calls, self._probing = self._probing, None
        if len(calls) != self.cfg.num_layers or len({id(c[0]) for c in calls}) != len(calls):
            raise ValueError(f"model: architecture {arch}: {len(calls)} attention calls through transformers' "
                             f"attention interface for {self.cfg.num_layers} layers; the paged KV cache needs "
                             "exactly one per layer")
        order = [getattr(m, "layer_idx", None) for m, *_ in calls]
        if sorted(i for i in order if isinstance(i, int)) != list(range(len(calls))):
            order = list(range(len(calls)))
        layers: list[PagedAttention | None] = [None] * len(calls)
        for index, (module, heads, kv_heads, head_dim, scaling, window) in zip(order, calls):
            if head_dim != self.cfg.head_dim:
                raise ValueError(f"model: architecture {arch}: layer {index} has head_dim {head_dim}, the config "
                                 f"says {self.cfg.head_dim}")
            attn = PagedAttention(heads, kv_heads, head_dim, window)
            if scaling is not None:
                attn.scale = float(scaling)
            layers[index] = attn
            self._layer_of[id(module)] = index
        if len({a.num_kv_heads for a in layers}) != 1:
            raise ValueError(f"model: architecture {arch}: layers hold different numbers of KV heads; one paged "
                             "cache layout serves them all")
        self.attn.extend(layers)

    def _probe_layer(self, module, query, key, value, scaling, window):
        self._probing.append((module, query.shape[1], key.shape[1], query.shape[-1], scaling, window))
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        attn = PagedAttention(q.shape[1], k.shape[1], q.shape[2], window)
        if scaling is not None:
            attn.scale = float(scaling)
        out = attn(q, k.contiguous(), v.contiguous(), None, self._meta)
        return out.view(1, q.shape[0], q.shape[1], q.shape[2])


def load_hf_model(model_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                  tp: TPGroup = SINGLE) -> HFCausalLM:
    """Loads the checkpoint with its own transformers class; refuses what the paged path cannot run, naming the
    architecture and the reason. TP > 1 shards it with DeepSpeed AutoTP over the instance's group."""
    from transformers import AutoModelForCausalLM

    arch = cfg.architecture
    config = hf_config(model_dir, arch)
    reason = unsupported_reason(config)
    if reason:
        raise ValueError(f"model: architecture {arch}: {reason}")
    problem = autotp_problem(cfg, tp.size)
    if problem:
        raise ValueError(f"tp: {problem}")
    register_attention()
    try:
        hf, info = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation=ATTENTION,
                                                        output_loading_info=True)
    except (ValueError, KeyError, OSError, TypeError) as e:
        if "attn_implementation" in str(e) or ATTENTION in str(e):
            e = "it does not route attention through transformers' attention interface"
        raise ValueError(f"model: architecture {arch}: transformers cannot load it: {e}") from None
    missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing:
        raise ValueError(f"model: checkpoint is missing weights or has misshapen ones: {missing[:8]}")
    hf = hf.to(device).eval()
    if tp.size > 1:
        from splitserve.workers.hf_tensor_parallel import shard_with_autotp

        hf = shard_with_autotp(hf, arch, tp, dtype)
    model = HFCausalLM(hf, cfg, tp)
    if model.num_kv_heads * tp.size != cfg.num_kv_heads:  # the transfer plans route heads by an even split
        raise ValueError(f"model: architecture {arch}: rank {tp.rank} holds {model.num_kv_heads} of "
                         f"{cfg.num_kv_heads} KV heads after sharding over {tp.size} ranks; expected an even split")
    return model
