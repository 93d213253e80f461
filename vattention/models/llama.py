"""`LlamaForCausalLM`: one implementation for Llama 2/3, Mistral, Qwen2, Qwen3 (dense) and Yi.

Inputs are token-flattened: `input_ids [T]` and `positions [T]` (normally
`meta.token_positions`) of every new token of a mixed prefill/decode batch. Attention layer `i`
hands `q [T, Hq, D]`, `k`/`v [T, Hkv, D]` (already rotated) to `attn.forward(i, q, k, v, meta)`,
which writes the KV cache and attends. Parameter names follow the Hugging Face checkpoint names,
except the fused `qkv_proj` (= [q; k; v]) and `gate_up_proj` (= [gate; up]).
Qwen3 (`config.qk_norm`): `self_attn.q_norm`/`k_norm` RMSNorm each q/k head (over head_dim) after
the projection and before RoPE, as HF does; with the fused RoPE kernel the normed q and k are
written with v into a new qkv-shaped tensor that `rope_qkv` reads (one extra copy of the row).
Invariant: `forward` has no data-dependent Python control flow, so it can be CUDA-graph captured.
Not applied here: `config.sliding_window` (the engine caps `max_model_len` at the window, within
which full causal attention is the windowed attention; longer sequences would need a windowed
attention backend).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from vattention.attention.base import AttentionBackend, AttentionMetadata
from vattention.models.config import ModelConfig
from vattention.models.layers import FusedLinear, RMSNorm, silu_and_mul
from vattention.models.rope import RopeInputs, RotaryEmbedding, apply_rotary


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.sizes = [config.q_size, config.kv_size, config.kv_size]
        self.qkv_proj = FusedLinear(config.hidden_size, self.sizes, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_bias)
        # Qwen3: per-head RMSNorm of q and k before RoPE (None for the other models)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeInputs,
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.q_norm is not None and self.k_norm is not None and rope.fused:
            qkv = self._norm_qk(qkv)  # a new [T, q + 2 kv] tensor: normed q, normed k, v
        if rope.fused:
            from vattention.models.fused import rope_qkv

            q, k, v = rope_qkv(
                qkv, rope.cos_sin, rope.positions, self.num_heads, self.num_kv_heads, self.head_dim
            )
        else:
            assert rope.cos is not None and rope.sin is not None
            q, k, v = qkv.split(self.sizes, dim=-1)
            q = q.view(t, self.num_heads, self.head_dim)
            k = k.view(t, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q = apply_rotary(q, rope.cos, rope.sin)
            k = apply_rotary(k, rope.cos, rope.sin)
            v = v.view(t, self.num_kv_heads, self.head_dim)
        out = attn.forward(self.layer_idx, q, k, v, meta)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))

    def _norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """`qkv [T, q + 2 kv]` -> a new tensor of the same shape with q and k RMSNormed per head
        (v copied): the input of the fused RoPE kernel, which reads q and k from one qkv row."""
        assert self.q_norm is not None and self.k_norm is not None
        t = qkv.shape[0]
        q, k, v = qkv.split(self.sizes, dim=-1)
        q = self.q_norm(q.view(t, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(t, self.num_kv_heads, self.head_dim))
        return torch.cat([q.reshape(t, self.sizes[0]), k.reshape(t, self.sizes[1]), v], dim=-1)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = FusedLinear(config.hidden_size, [inter, inter], bias=config.mlp_bias)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if fused:
            from vattention.models.fused import silu_and_mul as fused_silu_and_mul

            return self.down_proj(fused_silu_and_mul(gate_up))
        return self.down_proj(silu_and_mul(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeInputs,
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); the caller adds them (the
        next layer's norm does, fused). `residual` None: `x` is the embedding (layer 0)."""
        fused = rope.fused
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add_forward(x, residual, fused)
        h = self.self_attn(h, rope, meta, attn)
        h, residual = self.post_attention_layernorm.add_forward(h, residual, fused)
        return self.mlp(h, fused), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        # Fused Triton kernels (RoPE, SiLU-and-mul, residual add + RMSNorm) on CUDA; the torch
        # path is the reference.
        head_dim = config.head_dim
        pow2 = head_dim >= 16 and not head_dim & (head_dim - 1)
        self.fused_kernels = pow2 and os.environ.get("VATTENTION_FUSED", "1") != "0"

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary_emb.inputs(positions, x.dtype, fused=self.fused_kernels and x.is_cuda)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            x, residual = layer(x, residual, rope, meta, attn)
        if residual is None:
            return self.norm(x)
        return self.norm.add_forward(x, residual, rope.fused)[0]


class LlamaForCausalLM(nn.Module):
    """Decoder stack plus LM head (tied to the embedding when `tie_word_embeddings`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head: nn.Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def init_buffers(self) -> None:
        """Compute non-parameter state (the RoPE cache) on the model's device."""
        self.model.rotary_emb.init_cache()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        attn: AttentionBackend,
    ) -> torch.Tensor:
        """Hidden states `[T, hidden]` (final-normed) of every new token."""
        return self.model(input_ids, positions, meta, attn)

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, hidden]` -> float32 logits `[N, vocab]` (pass only the rows to sample)."""
        return F.linear(hidden, self.head_weight()).float()


def last_token_indices(meta: AttentionMetadata) -> torch.Tensor:
    """Row of each request's last new token in the flattened batch (for `compute_logits`)."""
    return (meta.query_start_loc[1:] - 1).long()
