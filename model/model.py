"""The TinyMind decoder: a Llama/Qwen3-shaped transformer, with DeepSeek's MoE and MLA as drop-in options.

    tokens -> embed_tokens -> N x [x + attn(RMSNorm(x)); x + mlp(RMSNorm(x))] -> RMSNorm -> lm_head -> logits

Attention is grouped-query (num_key_value_heads KV heads shared by groups of query heads) with rotary position
embeddings (RoPE, optional YaRN scaling), optional per-head q/k RMSNorm (Qwen3), and PyTorch's
scaled_dot_product_attention. The MLP is SwiGLU. Both can be swapped: `use_mla` replaces attention by
Multi-head Latent Attention (model/mla.py), `use_moe` replaces the MLP by a DeepSeekMoE layer (model/moe.py).
MoE layers also get a per-token mask of the real (non-padding) tokens, so their expert-load counts and balancing
losses leave padding out (`token_mask_for_moe`); a dense model never computes it.

State-dict keys follow transformers' Llama/Qwen3 names, so a dense checkpoint loads into `LlamaForCausalLM`
(or `Qwen3ForCausalLM` with q/k norm) unchanged. The KV cache is a transformers `Cache`, so `model.generate`
(greedy, sampling, beam search, streaming) works as for any transformers model.

Initialisation: every weight matrix ~ N(0, 0.02); the two projections that write into the residual stream
(o_proj, down_proj) use 0.02 / sqrt(2 * num_layers) so the residual's variance does not grow with depth
(GPT-2 / nanoGPT); RMSNorm gains start at 1. With tied embeddings the LM head shares the embedding matrix, so
the initial logits have std ~0.02 * sqrt(hidden) * ... small, and the loss at init is close to ln(vocab_size).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import TinyMindConfig
from .layers import FeedForward, RMSNorm, RotaryEmbedding, apply_rotary, sdpa_attention
from .mla import MultiHeadLatentAttention
from .moe import MoEFeedForward, collect_moe_aux_loss, count_active_params


class Attention(nn.Module):
    """Grouped-query attention with RoPE and optional q/k RMSNorm."""

    def __init__(self, config: TinyMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.use_qk_norm = config.use_qk_norm
        if self.use_qk_norm:  # Qwen3: normalise each head's q and k before RoPE, keeps attention logits bounded
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache: Cache | None = None) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq_len, self.num_kv_heads, self.head_dim)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # the cache keeps roped keys, so past tokens are never rotated again
            k, v = cache.update(k, v, self.layer_idx)
        out = sdpa_attention(q, k, v, attention_mask, dropout_p=self.attention_dropout if self.training else 0.0)
        return self.resid_dropout(self.o_proj(out))


class DecoderLayer(nn.Module):
    def __init__(self, config: TinyMindConfig, layer_idx: int):
        super().__init__()
        if config.use_mla:
            self.self_attn = MultiHeadLatentAttention(config, layer_idx)
        else:
            self.self_attn = Attention(config, layer_idx)
        if config.use_moe and layer_idx >= config.first_k_dense_replace:
            self.mlp = MoEFeedForward(config)
        else:
            self.mlp = FeedForward(config.hidden_size, config.intermediate_size, config.dropout)
        self.is_moe = isinstance(self.mlp, MoEFeedForward)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, position_embeddings, attention_mask=None, cache=None, token_mask=None):
        """token_mask [B, T] bool (True = real token, None = all are): only a MoE layer's balancing counts use it."""
        x = x + self.self_attn(self.input_layernorm(x), position_embeddings=position_embeddings,
                               attention_mask=attention_mask, cache=cache)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, token_mask) if self.is_moe else self.mlp(h))


def build_attention_mask(attention_mask: torch.Tensor | None, query_len: int, past_len: int,
                         device: torch.device) -> torch.Tensor | None:
    """Turn a [B, past+T] 0/1 padding mask into the boolean [B, 1, T, past+T] mask SDPA takes, or return None
    when plain causal attention is exact (no padding, and no queries that start after a cached prefix).

    Each query may also see its own key even when that key is padding: a fully masked row would make softmax
    produce NaN, and a pad query's output is never used (its label is -100 and its logits are ignored)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool()  # already built by the caller, e.g. a block-diagonal mask for packed samples
    key_len = past_len + query_len
    has_padding = attention_mask is not None and not bool(attention_mask[:, -key_len:].all())
    if not has_padding and (past_len == 0 or query_len == 1):
        return None
    query_positions = torch.arange(past_len, key_len, device=device)[:, None]
    key_positions = torch.arange(key_len, device=device)[None, :]
    mask = (key_positions <= query_positions)[None, None]  # [1, 1, T, past+T]
    if has_padding:
        mask = mask & attention_mask[:, None, None, -key_len:].bool()
        mask = mask | (key_positions == query_positions)[None, None]
    return mask


def token_mask_for_moe(attention_mask: torch.Tensor | None, query_len: int) -> torch.Tensor | None:
    """Which of the T query positions are real tokens, [B, T] bool, for the MoE layers' load counts and balancing
    losses; None when every position is. A 2D padding mask says it directly (1 = real). A 4D mask built by the
    caller (packed rows: block-diagonal, with position ids) carries no padding flag, so all its positions count
    (the tail that pads a packed row to the batch's longest one included)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -query_len:].bool()


def positions_from_mask(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """With left padding, position 0 is each row's first real token, not column 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -query_len:]


class TinyMindPreTrainedModel(PreTrainedModel):
    config_class = TinyMindConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True
    _keys_to_ignore_on_load_unexpected = [r"expert_load"]

    def _init_weights(self, module):
        """Weights are initialised once, by name, in `TinyMindForCausalLM.reset_parameters` (see module doc). The
        one thing to redo here: `from_pretrained` builds modules on empty tensors, and RoPE's frequencies are not
        in any checkpoint, so they must be recomputed."""
        if isinstance(module, RotaryEmbedding):
            with torch.no_grad():
                module.inv_freq.copy_(module.compute_inv_freq().to(module.inv_freq.device))


class TinyMindModel(TinyMindPreTrainedModel):
    def __init__(self, config: TinyMindConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope_dim, config.rope_parameters)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=False):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache()
        query_len = inputs_embeds.shape[1]
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = positions_from_mask(attention_mask, query_len)
            else:
                position_ids = torch.arange(past_len, past_len + query_len, device=inputs_embeds.device)[None]
        mask = build_attention_mask(attention_mask, query_len, past_len, inputs_embeds.device)
        token_mask = token_mask_for_moe(attention_mask, query_len) if self.config.use_moe else None
        # Under autocast the projections come out in bf16/fp16: rotate in that dtype too, so roped keys (and the
        # KV cache that holds them) are not silently promoted back to fp32.
        device_type = inputs_embeds.device.type
        rope_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) \
            else inputs_embeds.dtype
        position_embeddings = self.rotary_emb(position_ids, rope_dtype)
        hidden = self.dropout(inputs_embeds)
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings, mask, cache, token_mask)
        return self.norm(hidden), cache


@dataclass
class TinyMindOutput(CausalLMOutputWithPast):
    aux_loss: torch.Tensor | None = None  # MoE balancing loss, already scaled by its coefficient; add it to `loss`


class TinyMindForCausalLM(TinyMindPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TinyMindConfig):
        super().__init__(config)
        self.model = TinyMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self):
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                nn.init.ones_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            elif "o_proj" in name or "down_proj" in name:
                nn.init.normal_(param, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(param, mean=0.0, std=std)
        for name, buffer in self.named_buffers():
            if name.endswith("e_score_correction_bias") or name.endswith("expert_load"):
                buffer.zero_()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep: int = 0, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else (cache is not None)
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache)
        # During generation only the last position's logits are needed: skip the [B, T, vocab] matmul for the rest.
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            # Position t predicts token t+1; labels == -100 (prompt, padding) are ignored. The labels are shifted,
            # not the logits: slicing [B, T, vocab] logits copies them, and its backward fills and copies them again.
            next_tokens = F.pad(labels[:, 1:], (0, 1), value=-100)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), next_tokens.flatten(), ignore_index=-100)
        aux_loss = None
        if self.config.use_moe:
            aux_loss = collect_moe_aux_loss(self)
        return TinyMindOutput(loss=loss, logits=logits, cache=cache if use_cache else None, aux_loss=aux_loss)

    # ---- sizes and FLOPs -------------------------------------------------------------------------------------
    def num_params(self, active: bool = False) -> int:
        """Unique parameter count (a tied LM head counts once); `active`: per token, only k routed experts count."""
        total = sum(p.numel() for p in self.parameters())
        if active and self.config.use_moe:
            return count_active_params(self)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6 * N + 12 * L * H * Q * T, where N counts
        the parameters used in matmuls (active ones for MoE; the LM head too, even when tied, since it does a
        matmul; not the embedding lookup) and the second term is the attention scores and weighted sum."""
        cfg = self.config
        # Tied: the one matrix is a lookup (free) and the head (a matmul), so it counts once. Untied: drop the lookup.
        matmul_params = self.num_params(active=True)
        if not cfg.tie_word_embeddings:
            matmul_params -= cfg.vocab_size * cfg.hidden_size
        if cfg.use_mla:
            qk_dim, v_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        else:
            qk_dim = v_dim = cfg.head_dim
        attention_flops = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (qk_dim + v_dim) * seq_len
        return 6 * matmul_params + attention_flops


def describe(model: TinyMindForCausalLM) -> str:
    """One line for the logs: the size that matters to the reader."""
    total = model.num_params()
    text = f"TinyMind {total / 1e6:.2f}M parameters"
    if model.config.use_moe:
        text += f" ({model.num_params(active=True) / 1e6:.2f}M active per token)"
    parts = ["MoE" if model.config.use_moe else "dense", "MLA" if model.config.use_mla else "GQA"]
    cfg = model.config
    return f"{text}; {cfg.num_hidden_layers} layers x {cfg.hidden_size}, {'/'.join(parts)}, vocab {cfg.vocab_size}"


def active_params_of(config: TinyMindConfig) -> int:
    """Parameters used per token by a model of this config, counted on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return TinyMindForCausalLM(config).num_params(active=True)


def _register_with_auto_classes():
    """AutoConfig / AutoModelForCausalLM know model_type "tinymind", so a saved directory loads by name."""
    from transformers import AutoConfig, AutoModelForCausalLM
    AutoConfig.register("tinymind", TinyMindConfig, exist_ok=True)
    AutoModelForCausalLM.register(TinyMindConfig, TinyMindForCausalLM, exist_ok=True)


_register_with_auto_classes()
