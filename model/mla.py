"""Multi-head Latent Attention (MLA), DeepSeek-V2 (arXiv 2405.04434, section 2.1) as used again in DeepSeek-V3.

MLA shrinks the KV cache by caching, per token and layer, one normalised latent c_kv (kv_lora_rank values) plus one
rotary key k_rope shared by all heads (qk_rope_head_dim values), instead of 2 * heads * head_dim values for MHA.
Per token h (dim d), heads n_h, head dims d_nope, d_rope, d_v, ranks r_q (q_lora_rank, 0 = none) and r_kv:

    c_q  = RMSNorm(W_DQ h)                                    q_a_proj, q_a_layernorm     [r_q]
    q    = W_UQ c_q  (or W_Q h when r_q = 0)                  q_b_proj (q_proj)           per head [q_nope; q_rope]
    [c_kv; k_rope] = W_DKV h                                  kv_a_proj_with_mqa          [r_kv + d_rope]
    c_kv = RMSNorm(c_kv)                                      kv_a_layernorm              <- cached
    k_rope = RoPE(k_rope)   one vector, shared by every head                              <- cached
    [k_nope; v] = W_UKV c_kv                                  kv_b_proj                   per head [d_nope + d_v]
    score = (q_nope . k_nope + RoPE(q_rope) . k_rope) * scale,   out = W_O concat_h(softmax(score) v)   o_proj

RoPE touches only the d_rope slice: position information cannot live in k_nope, because k_nope is a fixed linear map
of the cached latent and is folded into the query in the absorbed form below.

Two equivalent ways to compute it (both implemented, tests check they agree to fp32 rounding):
  naive     materialise per-head k = [W_UK c_kv; k_rope] and v = W_UV c_kv, then ordinary attention with head dims
            (d_nope + d_rope, d_v). Cheapest for training/prefill without a cache: the attention runs in small dims.
  absorbed  fold W_UK into the query and W_UV after the attention (official DeepSeek `attn_impl="absorb"`):
                q_lat[h] = W_UK[h]^T q_nope[h]                                  [r_kv]
                score[h, t] = (q_lat[h] . c_kv[t] + q_rope[h] . k_rope[t]) * scale
                o[h] = W_UV[h] sum_t p[h, t] c_kv[t]
            i.e. multi-query attention with one shared KV "head" [c_kv; k_rope] of width r_kv + d_rope and value c_kv,
            read straight from the cache; nothing is expanded per cached token. Used whenever a cache is given.

Softmax scale: (d_nope + d_rope)^-0.5, times mscale^2 under YaRN when rope_parameters has `mscale_all_dim`, with
mscale = 0.1 * mscale_all_dim * ln(factor) + 1 (DeepSeek-V2 / HF `yarn_apply_mscale`). The cos/sin passed in carry
YaRN's own attention factor (for DeepSeek's configs mscale(factor, mscale) / mscale(factor, mscale_all_dim), usually
1.0), as in HF DeepseekV3; this module does not rescale them.

Parameter names follow HF `DeepseekV3Attention`, so state dicts map one to one (no biases; rope_interleave=False,
because TinyMind's rotary embedding uses the rotate-half layout).
"""
import math

import torch
from torch import nn

from .layers import RMSNorm, apply_rotary, sdpa_attention


def yarn_softmax_mscale(rope_parameters: dict) -> float:
    """Extra factor on the softmax scale under YaRN: mscale(factor, mscale_all_dim)^2 (1.0 otherwise)."""
    if rope_parameters.get("rope_type", "default") == "default" or not rope_parameters.get("mscale_all_dim"):
        return 1.0
    factor = rope_parameters["factor"]
    if factor <= 1:
        return 1.0
    mscale = 0.1 * rope_parameters["mscale_all_dim"] * math.log(factor) + 1.0
    return mscale * mscale


class MultiHeadLatentAttention(nn.Module):
    """MLA with the DecoderLayer interface: forward(x [B, T, hidden], position_embeddings=(cos, sin) [B, T, d_rope],
    attention_mask=None | bool [B, 1, Tq, Tk], cache=None | transformers Cache) -> [B, T, hidden].

    The cache holds only c_kv [B, 1, T, r_kv] and k_rope [B, 1, T, d_rope] (keys and values slots of a
    DynamicCache layer). `attn_impl`: "auto" (naive without cache, absorbed with one), "naive" or "absorb"."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank or 0
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.attention_dropout = config.attention_dropout
        self.attn_impl = "auto"
        hidden, heads, eps = config.hidden_size, self.num_heads, config.rms_norm_eps

        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, heads * self.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(hidden, heads * self.qk_head_dim, bias=False)
        # "with_mqa": the same projection also produces the single rotary key shared by all heads.
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_head_dim, hidden, bias=False)
        self.scale = self.qk_head_dim ** -0.5 * yarn_softmax_mscale(config.rope_parameters)

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(batch, seq_len, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        # Single-"head" 4D views [B, 1, T, .] so that any transformers Cache layer can store them.
        c_kv = self.kv_a_layernorm(c_kv).unsqueeze(1)
        k_rope = k_rope.unsqueeze(1)
        cos, sin = position_embeddings
        q_rope = apply_rotary(q_rope, cos, sin)
        k_rope = apply_rotary(k_rope, cos, sin)
        if cache is not None:
            # RMSNorm's fp32 gain makes c_kv fp32 under autocast; store it in the compute dtype like the roped key,
            # or the latent cache costs twice what it should.
            c_kv, k_rope = cache.update(c_kv.to(k_rope.dtype), k_rope, self.layer_idx)

        dropout = self.attention_dropout if self.training else 0.0
        absorb = self.attn_impl == "absorb" or (self.attn_impl == "auto" and cache is not None)
        if absorb:
            out = self._absorbed(q_nope, q_rope, c_kv, k_rope, attention_mask, dropout)
        else:
            out = self._naive(q_nope, q_rope, c_kv, k_rope, attention_mask, dropout)
        return self.o_proj(out)

    def _naive(self, q_nope, q_rope, c_kv, k_rope, attention_mask, dropout):
        """Expand the latent into per-head keys/values and run ordinary attention. Returns [B, Tq, H * d_v]."""
        batch, _, k_len, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv.squeeze(1)).view(batch, k_len, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, self.num_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return sdpa_attention(q, k, v, attention_mask, dropout, scale=self.scale)

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, attention_mask, dropout):
        """Attention in the latent space: one shared key [c_kv; k_rope] and value c_kv. Returns [B, Tq, H * d_v]."""
        batch, heads, q_len, _ = q_nope.shape
        w_ukv = self.kv_b_proj.weight.view(heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w_ukv.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        # q_nope . (W_UK c) == (W_UK^T q_nope) . c: the key up-projection moves onto the (few) queries.
        q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
        q = torch.cat([q_latent, q_rope], dim=-1)
        k = torch.cat([c_kv, k_rope], dim=-1)
        out_latent = sdpa_attention(q, k, c_kv, attention_mask, dropout, scale=self.scale)  # 1 KV head: GQA path
        out_latent = out_latent.view(batch, q_len, heads, self.kv_lora_rank)
        return torch.einsum("bthr,hvr->bthv", out_latent, w_uv).flatten(2)


def kv_cache_values_per_token(config) -> int:
    """Cached values per token per layer: r_kv + d_rope for MLA, 2 * kv_heads * head_dim for MHA/GQA."""
    if config.use_mla:
        return config.kv_lora_rank + config.qk_rope_head_dim
    return 2 * config.num_key_value_heads * config.head_dim
