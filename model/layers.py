"""Building blocks shared by the attention variants: RMSNorm, rotary embeddings (RoPE, YaRN) and the SDPA call."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: in bf16 the mean of squares loses too many bits; cast back before the gain, as Llama does.
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.to(x.dtype)


def yarn_inv_freq(dim: int, base: float, factor: float, original_max_positions: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): keep high-frequency dims, interpolate low-frequency ones by `factor`, blend linearly
    between the dims that rotate beta_fast and beta_slow times over the original context. Returns (inv_freq, mscale)."""
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)

    def dim_for_rotations(rotations: float) -> float:
        return dim * math.log(original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_for_rotations(beta_fast)), 0)
    high = min(math.ceil(dim_for_rotations(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, yarn_mscale(factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: sqrt(1/t) = 0.1 * ln(factor) + 1 (times DeepSeek's mscale knob)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape [B, T, dim] for the given position ids, in the rotate-half layout of Llama."""

    def __init__(self, dim: int, rope_parameters: dict):
        super().__init__()
        self.dim, self.rope_parameters = dim, dict(rope_parameters)
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        """Also sets attention_scaling. Not saved in checkpoints, so loaders recompute it (see _init_weights)."""
        dim, rope_parameters = self.dim, self.rope_parameters
        base = rope_parameters["rope_theta"]
        rope_type = rope_parameters.get("rope_type", "default")
        if rope_type == "default":
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.attention_scaling = 1.0
        elif rope_type == "yarn":
            inv_freq, self.attention_scaling = yarn_inv_freq(
                dim, base, rope_parameters["factor"], rope_parameters["original_max_position_embeddings"],
                rope_parameters.get("beta_fast") or 32.0, rope_parameters.get("beta_slow") or 1.0)
            factor = rope_parameters["factor"]
            mscale, mscale_all_dim = rope_parameters.get("mscale"), rope_parameters.get("mscale_all_dim")
            if rope_parameters.get("attention_factor") is not None:
                self.attention_scaling = rope_parameters["attention_factor"]
            elif mscale and mscale_all_dim:  # DeepSeek: the rest of mscale goes into MLA's softmax scale instead
                self.attention_scaling = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}: use 'default' or 'yarn'")
        return inv_freq

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in fp32 even under autocast: position * freq reaches ~1e4 and bf16 would round it by several radians.
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
            angles = torch.cat((freqs, freqs), dim=-1)
            cos, sin = angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, dim]; cos/sin: [B, T, dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None,
                   dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """q: [B, Hq, Tq, D], k/v: [B, Hkv, Tk, D] with Hq a multiple of Hkv (GQA). Returns [B, Tq, Hq * Dv].

    attention_mask is either None, meaning plain causal attention (only valid when Tq == Tk, or Tq == 1 when
    decoding one token against a cache), or a boolean [B, 1, Tq, Tk] mask (True = may attend) built by the model
    for padding, packed documents or chunked prefill. None lets SDPA pick its flash kernel on CUDA."""
    q_len = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if q_len == 1 and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # Decoding against a cache: torch's CPU kernel is several times slower in bf16 than in fp32 at this shape
        # (docs/benchmarks.md), and autocast would cast fp32 inputs straight back, so it is switched off here.
        with torch.autocast("cpu", enabled=False):
            return sdpa_attention(q.float(), k.float(), v.float(), attention_mask, dropout_p, scale).to(q.dtype)
    if attention_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale,
                                             is_causal=q_len > 1, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout_p, scale=scale,
                                             enable_gqa=gqa)
    return out.transpose(1, 2).flatten(2)


class FeedForward(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)). Also the body of each MoE expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))
