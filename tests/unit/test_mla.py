"""Multi-head Latent Attention against transformers' DeepseekV3Attention with copied weights (plain RoPE and YaRN),
the absorbed form against the naive one, cached decoding against full forwards, and the RoPE/shared-key structure."""
import pytest
import torch
from transformers import DeepseekV3Config, DynamicCache
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from model.config import TinyMindConfig
from model.layers import RotaryEmbedding
from model.mla import MultiHeadLatentAttention, kv_cache_values_per_token

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


DIMS = dict(hidden_size=64, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16)
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "mscale": 1.0, "mscale_all_dim": 0.8}


def build(q_lora_rank=32, rope=ROPE, seed=0):
    """Our module with random non-trivial weights (norm gains too) and the config it came from."""
    torch.manual_seed(seed)
    config = TinyMindConfig(use_mla=True, q_lora_rank=q_lora_rank, rope_parameters=dict(rope),
                            max_position_embeddings=256, **DIMS)
    attn = MultiHeadLatentAttention(config, layer_idx=0).eval()
    with torch.no_grad():
        for name, param in attn.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if "layernorm" in name else 0.15 * torch.randn_like(param))
    return attn, config


def hf_twin(attn, q_lora_rank, rope=ROPE):
    hf_config = DeepseekV3Config(num_key_value_heads=DIMS["num_attention_heads"], q_lora_rank=q_lora_rank or None,
                                 rope_interleave=False, attention_bias=False, rope_parameters=dict(rope),
                                 max_position_embeddings=256, **DIMS)
    hf_config._attn_implementation = "eager"
    ref = DeepseekV3Attention(hf_config, layer_idx=0).eval()
    ref.load_state_dict(attn.state_dict(), strict=True)  # same parameter names, no key mapping
    return ref, hf_config


def rope_for(config, batch, seq_len, offset=0):
    positions = torch.arange(offset, offset + seq_len)[None].expand(batch, -1)
    return RotaryEmbedding(config.rope_dim, config.rope_parameters)(positions, torch.float32)


def causal_and_padding(batch_pad: list[int], seq_len: int) -> torch.Tensor:
    """Boolean [B, 1, T, T]: causal, and row b cannot see its first batch_pad[b] (left-padding) keys."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    keys = torch.stack([torch.arange(seq_len) >= pad for pad in batch_pad])
    return causal[None, None] & keys[:, None, None, :]


def additive(mask: torch.Tensor) -> torch.Tensor:
    """HF eager attention adds the mask; finfo.min rather than -inf keeps fully padded rows finite."""
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_matches_transformers_deepseek_v3_attention(q_lora_rank):
    attn, config = build(q_lora_rank)
    ref, _ = hf_twin(attn, q_lora_rank)
    x = torch.randn(3, 11, 64)
    cos_sin = rope_for(config, 3, 11)
    mask = causal_and_padding([0, 4, 9], 11)
    with torch.no_grad():
        ours_causal = attn(x, cos_sin, attention_mask=None)
        ref_causal = ref(x, cos_sin, additive(causal_and_padding([0, 0, 0], 11)))[0]
        ours_padded = attn(x, cos_sin, attention_mask=mask)
        ref_padded = ref(x, cos_sin, additive(mask))[0]
    torch.testing.assert_close(ours_causal, ref_causal, atol=1e-5, rtol=0)
    real = mask[:, 0].any(-1)  # query rows that see at least one key (fully padded rows are undefined)
    torch.testing.assert_close(ours_padded[real], ref_padded[real], atol=1e-5, rtol=0)


def test_yarn_scale_and_output_match_transformers():
    attn, _ = build(32, rope=YARN)
    ref, hf_config = hf_twin(attn, 32, rope=YARN)
    assert attn.scale == pytest.approx(ref.scaling, rel=1e-12)
    mscale = 0.1 * 0.8 * torch.log(torch.tensor(4.0)).item() + 1
    assert attn.scale == pytest.approx((16 + 8) ** -0.5 * mscale ** 2, rel=1e-6)
    x = torch.randn(2, 100, 64)  # beyond original_max_position_embeddings, where YaRN matters
    positions = torch.arange(100)[None].expand(2, -1)
    cos_sin = DeepseekV3RotaryEmbedding(hf_config)(x, positions)  # carries YaRN's attention factor, as HF does
    with torch.no_grad():
        ours = attn(x, cos_sin, attention_mask=None)
        expected = ref(x, cos_sin, additive(causal_and_padding([0, 0], 100)))[0]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_rotary_embedding_yarn_attention_factor_matches_deepseek():
    _, config = build(32, rope=YARN)
    hf_config = DeepseekV3Config(rope_interleave=False, rope_parameters=dict(YARN), max_position_embeddings=256,
                                 num_key_value_heads=4, **DIMS)
    x = torch.zeros(1, 50, 64)
    positions = torch.arange(50)[None]
    expected = DeepseekV3RotaryEmbedding(hf_config)(x, positions)
    ours = RotaryEmbedding(config.rope_dim, config.rope_parameters)(positions, torch.float32)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_absorbed_equals_naive_outputs_and_gradients(q_lora_rank):
    attn, config = build(q_lora_rank)
    x = torch.randn(2, 9, 64, requires_grad=True)
    cos_sin = rope_for(config, 2, 9)
    mask = causal_and_padding([0, 3], 9)
    results = {}
    for impl in ("naive", "absorb"):
        attn.attn_impl = impl
        attn.zero_grad()
        x.grad = None
        causal = attn(x, cos_sin)
        padded = attn(x, cos_sin, attention_mask=mask)
        (causal.pow(2).sum() + padded[1, 3:].pow(2).sum()).backward()
        results[impl] = (causal, padded[1, 3:], x.grad.clone(), attn.kv_b_proj.weight.grad.clone())
    for naive, absorbed in zip(results["naive"], results["absorb"]):
        torch.testing.assert_close(absorbed, naive, atol=1e-5, rtol=1e-5)


def test_absorbed_equals_naive_in_bf16():
    attn, config = build(32)
    x = torch.randn(2, 9, 64)
    cos_sin = rope_for(config, 2, 9)
    outs = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for impl in ("naive", "absorb"):
            attn.attn_impl = impl
            outs.append(attn(x, cos_sin).float())
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_prefill_then_decode_equals_full_forward(q_lora_rank):
    attn, config = build(q_lora_rank)
    batch, seq_len, prefix = 2, 12, 5
    x = torch.randn(batch, seq_len, 64)
    with torch.no_grad():
        full = attn(x, rope_for(config, batch, seq_len))
        cache = DynamicCache()
        steps = [attn(x[:, :prefix], rope_for(config, batch, prefix), cache=cache)]
        for t in range(prefix, seq_len):
            steps.append(attn(x[:, t:t + 1], rope_for(config, batch, 1, offset=t), cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    # Only the latent and the shared rotary key are cached: [B, 1, T, r_kv] and [B, 1, T, d_rope].
    c_kv, k_rope = cache.layers[0].keys, cache.layers[0].values
    assert c_kv.shape == (batch, 1, seq_len, config.kv_lora_rank)
    assert k_rope.shape == (batch, 1, seq_len, config.qk_rope_head_dim)
    assert cache.get_seq_length() == seq_len


def test_decode_with_padding_mask_and_chunked_prefill_equal_full_forward():
    attn, config = build(32)
    batch, seq_len = 2, 10
    x = torch.randn(batch, seq_len, 64)
    mask = causal_and_padding([0, 3], seq_len)
    with torch.no_grad():
        full = attn(x, rope_for(config, batch, seq_len), attention_mask=mask)
        cache = DynamicCache()
        chunks = [attn(x[:, :4], rope_for(config, batch, 4), attention_mask=mask[:, :, :4, :4], cache=cache),
                  attn(x[:, 4:7], rope_for(config, batch, 3, 4), attention_mask=mask[:, :, 4:7, :7], cache=cache)]
        for t in range(7, seq_len):
            step_mask = mask[:, :, t:t + 1, :t + 1]
            chunks.append(attn(x[:, t:t + 1], rope_for(config, batch, 1, t), attention_mask=step_mask, cache=cache))
    decoded = torch.cat(chunks, dim=1)
    real = mask[:, 0].any(-1)
    torch.testing.assert_close(decoded[real], full[real], atol=1e-5, rtol=0)


def test_cache_uses_the_absorbed_form(monkeypatch):
    attn, config = build(32)
    used = []
    monkeypatch.setattr(attn, "_absorbed", lambda *a: used.append("absorb") or attn._naive(*a))
    with torch.no_grad():
        attn(torch.randn(1, 3, 64), rope_for(config, 1, 3))
        assert used == []
        attn(torch.randn(1, 3, 64), rope_for(config, 1, 3), cache=DynamicCache())
    assert used == ["absorb"]


def heads_before_o_proj(attn, x, cos_sin):
    captured = {}
    hook = attn.o_proj.register_forward_pre_hook(lambda _, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        attn(x, cos_sin)
    hook.remove()
    return captured["x"].view(*x.shape[:2], attn.num_heads, attn.v_head_dim)


def test_query_rope_rows_of_one_head_only_change_that_head():
    attn, config = build(32)
    x = torch.randn(2, 7, 64)
    cos_sin = rope_for(config, 2, 7)
    before = heads_before_o_proj(attn, x, cos_sin)
    rope_rows = slice(attn.qk_nope_head_dim, attn.qk_head_dim)  # head 0's rotary query rows in q_b_proj
    with torch.no_grad():
        attn.q_b_proj.weight[rope_rows] += 0.5 * torch.randn_like(attn.q_b_proj.weight[rope_rows])
    after = heads_before_o_proj(attn, x, cos_sin)
    assert (after[:, 1:, 0] - before[:, 1:, 0]).abs().max() > 1e-3  # position 0 attends only to itself
    torch.testing.assert_close(after[:, :, 1:], before[:, :, 1:], atol=1e-6, rtol=0)


def test_rope_only_on_the_rope_slice_and_one_rotary_key_for_all_heads():
    attn, config = build(32)
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        # RoPE encodes relative position: shifting every position by the same amount changes nothing...
        base = attn(x, rope_for(config, 2, 7))
        torch.testing.assert_close(attn(x, rope_for(config, 2, 7, offset=37)), base, atol=1e-5, rtol=0)
        # ...and with the rotary query channels zeroed, positions cannot matter at all: the nope slice is unrotated.
        for head in range(attn.num_heads):
            start = head * attn.qk_head_dim + attn.qk_nope_head_dim
            attn.q_b_proj.weight[start:start + attn.qk_rope_head_dim] = 0
        no_rope = attn(x, rope_for(config, 2, 7))
        reversed_positions = rope_for(config, 2, 7)[0].flip(1), rope_for(config, 2, 7)[1].flip(1)
        torch.testing.assert_close(attn(x, reversed_positions), no_rope, atol=1e-6, rtol=0)
        # The rotary key is one vector per token shared by all heads: the cache holds a single "head" of it.
        cache = DynamicCache()
        attn(x, rope_for(config, 2, 7), cache=cache)
    assert cache.layers[0].values.shape[1] == 1


def test_kv_cache_values_per_token():
    _, config = build(32)
    assert kv_cache_values_per_token(config) == 32 + 8
    gqa = TinyMindConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    assert kv_cache_values_per_token(gqa) == 2 * 2 * 16
