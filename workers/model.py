"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) built from tensor-parallel layers; the model only chooses layers."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.comm.fused_norm import check_method
from splitserve.comm.overlap import Stage, plan_parts, run_stages
from splitserve.comm.tensor_parallel import SINGLE, TPGroup
from splitserve.workers.config import ModelConfig
from splitserve.workers.layers.attention import AttentionMetadata, PagedAttention
from splitserve.workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from splitserve.workers.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from splitserve.workers.layers.norm import RMSNorm
from splitserve.workers.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, rotary: RotaryEmbedding, dtype, device):
        super().__init__()
        d = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias, tp, dtype, device)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, cfg.o_proj_bias, tp, dtype, device)
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d, cfg.sliding_window)

    def forward(self, positions, x, kv_cache, meta: AttentionMetadata, reduce: bool = True):
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.split_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v.contiguous(), kv_cache, meta), reduce)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup, dtype, device):
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [size, size], False, tp, dtype, device)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, False, tp, dtype, device)

    def forward(self, x, reduce: bool = True):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, reduce)


class DecoderLayer(nn.Module):
    """Attention and MLP, each ending in a row-parallel layer whose reduction the model fuses with the residual
    add + RMSNorm that follows it, so a layer exposes its two halves rather than one forward."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, rotary, dtype, device):
        super().__init__()
        self.self_attn = Attention(cfg, tp, rotary, dtype, device)
        self.mlp = MLP(cfg, tp, dtype, device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def attention_partial(self, x, part, kv_cache):
        """This rank's un-reduced attention output for the rows of `part` (already input-normed)."""
        return self.self_attn(part.positions, x, kv_cache, part.meta, reduce=False)

    def mlp_partial(self, x, part):
        return self.mlp(x, reduce=False)


class CausalLM(nn.Module):
    """Forward over packed tokens of several sequences; `compute_logits` on the rows that need sampling.

    A pipeline stage holds only `layers` (a contiguous range); the first stage also holds the embedding, the last
    the final norm and LM head. Stages pass the residual stream: a later stage's forward takes it instead of token
    ids, an earlier stage's forward returns it."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE, dtype=torch.float32, device="cpu",
                 layers: range | None = None):
        super().__init__()
        self.cfg, self.tp = cfg, tp
        self.layer_range = range(cfg.num_layers) if layers is None else layers
        self.is_first, self.is_last = self.layer_range.start == 0, self.layer_range.stop == cfg.num_layers
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, device)
        if self.is_first:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp, rotary, dtype, device) for _ in self.layer_range)
        if self.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
            if cfg.tie_word_embeddings and self.is_first:
                self.lm_head.weight = self.embed_tokens.weight
        else:
            # The stage's last reduction adds the residual; its norm belongs to the next stage's first layer, which
            # normalises the residual it receives, so a unit weight stands in here (its output is not used).
            self.register_buffer("handoff_norm", torch.ones(cfg.hidden_size, dtype=dtype, device=device),
                                 persistent=False)
        self.configure_tp()

    def configure_tp(self, norm_method: str = "reference", overlap_min_tokens: int | None = None) -> None:
        """How each all-reduce + following RMSNorm runs (`comm.fused_norm` methods; at TP = 1 every method is the
        plain fused add + RMSNorm), and from how many tokens a TP > 1 forward splits its batch in two to overlap
        communication with compute (None: never)."""
        if overlap_min_tokens is not None and (isinstance(overlap_min_tokens, bool)
                                               or not isinstance(overlap_min_tokens, int) or overlap_min_tokens < 2):
            raise ValueError(f"overlap_min_tokens: must be an integer >= 2 or None, got {overlap_min_tokens!r}")
        self.tp_norm_method = check_method(norm_method)
        self.overlap_min_tokens = overlap_min_tokens

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].self_attn.num_kv_heads

    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor] | None, meta: AttentionMetadata,
                residual: torch.Tensor | None = None):
        """Each row-parallel output is reduced together with the residual add + RMSNorm that follows it (the next
        layer's input norm, or the final norm), optionally overlapped across two token parts. At TP = 1 the
        reduction is the identity, so the same path runs the fused add + RMSNorm (kernel or torch twin) alone.
        Pipeline stages: `residual` is the previous stage's output (for every stage but the first); a stage before
        the last returns its residual stream, the last the final-normed hidden states."""
        if residual is None:
            residual = self.embed_tokens(input_ids)
        hidden = self.layers[0].input_layernorm(residual)
        parts = self._parts(positions, meta, kv_caches)
        hidden, residual = run_stages(self.tp_stages(kv_caches), hidden, residual, parts, self.tp,
                                      self.tp_norm_method, with_residual=True)
        return hidden if self.is_last else residual

    def _parts(self, positions, meta, kv_caches):
        # Splitting the batch only buys overlap of communication, which a single rank does not have.
        min_tokens = self.overlap_min_tokens if self.tp.size > 1 else None
        block_size = None if kv_caches is None else kv_caches[0].shape[2]
        return plan_parts(positions, meta, min_tokens, block_size)

    def tp_stages(self, kv_caches) -> list[Stage]:
        """Two stages per layer: attention then MLP, each reduced with the norm that follows it."""
        next_norms = [(n.input_layernorm.weight, n.input_layernorm.eps) for n in self.layers[1:]]
        next_norms.append((self.norm.weight, self.norm.eps) if self.is_last else (self.handoff_norm, self.cfg.rms_norm_eps))
        stages = []
        for i, (layer, (weight, eps)) in enumerate(zip(self.layers, next_norms)):
            cache = None if kv_caches is None else kv_caches[i]
            post = layer.post_attention_layernorm
            stages.append(Stage(partial(layer.attention_partial, kv_cache=cache), post.weight, post.eps))
            stages.append(Stage(layer.mlp_partial, weight, eps))
        return stages

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def other_stage_weight(self, name: str) -> bool:
        """Whether checkpoint tensor `name` belongs to another pipeline stage (the loader skips it)."""
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) not in self.layer_range
        if name.startswith("model.embed_tokens."):
            return not self.is_first and not (self.is_last and self.cfg.tie_word_embeddings)
        if name.startswith(("model.norm.", "lm_head.")):
            return not self.is_last
        return False

    def checkpoint_params(self) -> dict[str, tuple[nn.Parameter, object, object]]:
        """Every checkpoint tensor name -> (our parameter, its owner's weight loader, shard id)."""
        fused = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                 "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
        out = {}
        for module_name, module in self.named_modules():
            loader = getattr(module, "weight_loader", None)
            if loader is None:
                continue
            for pname, param in module.named_parameters(recurse=False):
                if module is getattr(self, "lm_head", None) and self.cfg.tie_word_embeddings:
                    continue
                ours = f"{module_name}.{pname}"
                prefix, _, leaf = module_name.rpartition(".")
                names = [(f"{prefix}.{src}.{pname}", shard) for src, (dst, shard) in fused.items() if dst == leaf]
                for ckpt, shard in names or [(ours, None)]:
                    if ckpt.startswith("layers."):  # stage-local layer index -> the checkpoint's
                        _, index, rest = ckpt.split(".", 2)
                        ckpt = f"layers.{self.layer_range[int(index)]}.{rest}"
                    if not ckpt.startswith("lm_head"):
                        ckpt = "model." + ckpt
                    out[ckpt] = (param, loader, shard)
        if self.is_last and not self.is_first and self.cfg.tie_word_embeddings:  # the tied head, without the embedding
            out["model.embed_tokens.weight"] = (self.lm_head.weight, self.lm_head.weight_loader, None)
        return out
