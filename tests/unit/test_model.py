"""The dense model against transformers' Llama/Qwen3 with copied weights, the KV cache against full forwards,
generation, YaRN, and the basic learning invariants."""
import math

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from model import TinyMindConfig, TinyMindForCausalLM
from model.layers import RotaryEmbedding

VOCAB = 97


def tiny_config(**overrides) -> TinyMindConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256, rope_theta=10000.0)
    settings.update(overrides)
    return TinyMindConfig(**settings)


def reference_model(config: TinyMindConfig):
    """The transformers model our config describes: Llama, or Qwen3 when q/k RMSNorm is on."""
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                  num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                  head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
                  rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
                  rope_parameters=dict(config.rope_parameters), attention_bias=False)
    if config.use_qk_norm:
        ref = Qwen3ForCausalLM(Qwen3Config(**common))
    else:
        ref = LlamaForCausalLM(LlamaConfig(mlp_bias=False, **common))
    return ref


def pair(**overrides):
    torch.manual_seed(0)
    ours = TinyMindForCausalLM(tiny_config(**overrides)).eval()
    ref = reference_model(ours.config).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in key for key in missing), missing
    return ours, ref


def left_padded_batch():
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # row 1: 8 real tokens after 4 pads
    mask[2, :9] = 0  # row 2: 3 real tokens
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers(qk_norm, tied):
    ours, ref = pair(use_qk_norm=qk_norm, tie_word_embeddings=tied)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
        ours_padded = ours(ids, attention_mask=mask).logits
        ref_padded = ref(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours_padded[real], ref_padded[real], atol=1e-5, rtol=0)


def test_dense_checkpoint_loads_into_llama_without_key_mapping():
    ours, ref = pair()
    ref_keys = set(ref.state_dict()) - {k for k in ref.state_dict() if "rotary" in k}
    assert set(ours.state_dict()) == ref_keys


def test_padding_does_not_change_real_tokens():
    ours, _ = pair()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask).logits
        alone = ours(ids[2:3, 9:]).logits  # row 2 without its padding
    torch.testing.assert_close(padded[2, 9:], alone[0], atol=1e-5, rtol=0)


def test_kv_cache_decode_equals_full_forward_with_left_padding():
    ours, _ = pair()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        prefix = 6
        cache = DynamicCache()
        out = ours(ids[:, :prefix], attention_mask=mask[:, :prefix], cache=cache, use_cache=True)
        steps = [out.logits]
        for t in range(prefix, ids.shape[1]):
            out = ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    decoded = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(decoded[real], full[real], atol=1e-5, rtol=0)
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("with_mask", [False, True])
def test_bf16_decode_attention_runs_in_fp32_on_cpu(with_mask):
    """One query against a cache under bf16 autocast: the attention is computed in fp32 (the CPU's bf16 kernel is
    slower there), so it equals the fp32 result rounded once to bf16, and comes back in bf16."""
    from model.layers import sdpa_attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, t, 16, generator=gen) for h, t in ((4, 1), (2, 9), (2, 9)))
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool) if with_mask else None
    if with_mask:
        mask[0, ..., :4] = False  # a left-padded row
    q16, k16, v16 = q.bfloat16(), k.bfloat16(), v.bfloat16()
    expected = sdpa_attention(q16.float(), k16.float(), v16.float(), mask).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_attention(q16, k16, v16, mask)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_chunked_prefill_with_cache_equals_full_forward():
    ours, _ = pair()
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        full = ours(ids).logits
        first = ours(ids[:, :4], use_cache=True)
        second = ours(ids[:, 4:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=1e-5, rtol=0)


def test_generate_with_and_without_cache_and_batched_left_padding():
    ours, ref = pair()
    ids, mask = left_padded_batch()
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = ours.generate(ids, attention_mask=mask, use_cache=True, **settings)
        uncached = ours.generate(ids, attention_mask=mask, use_cache=False, **settings)
        reference = ref.generate(ids, attention_mask=mask, **settings)
        alone = ours.generate(ids[2:3, 9:], **settings)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)
    assert torch.equal(cached[2, 9:], alone[0])


def test_generate_sampling_beam_and_streaming():
    from transformers import TextIteratorStreamer  # noqa: F401  (import is the API check; streaming tested in eval)
    ours, _ = pair()
    ids = torch.randint(3, VOCAB, (1, 5))
    torch.manual_seed(0)
    sampled = ours.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                            repetition_penalty=1.1, pad_token_id=0)
    beams = ours.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert sampled.shape == (1, 11) and beams.shape[1] <= 11


def test_loss_at_init_is_near_uniform():
    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config(vocab_size=6400, hidden_size=128))
    ids = torch.randint(0, 6400, (4, 64))
    loss = model(ids, labels=ids).loss.item()
    assert abs(loss - math.log(6400)) < 0.1, loss


def test_labels_minus_100_are_ignored():
    ours, ref = pair()
    ids = torch.randint(3, VOCAB, (2, 8))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 7] = -100  # the last position's label is never a target anyway; an ignored one inside must not count
    logits = ours(ids).logits
    kept = labels[:, 1:] != -100
    expected = torch.nn.functional.cross_entropy(logits[:, :-1][kept], labels[:, 1:][kept])
    torch.testing.assert_close(ours(ids, labels=labels).loss, expected)
    torch.testing.assert_close(ours(ids, labels=labels).loss, ref(ids, labels=labels).loss)  # transformers' shift


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = TinyMindForCausalLM(tiny_config())
    ids = torch.randint(3, VOCAB, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, loss.item()


def test_yarn_off_equals_unscaled_and_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    plain, _ = pair()
    default_rope = RotaryEmbedding(plain.config.head_dim, {"rope_type": "default", "rope_theta": 10000.0})
    torch.testing.assert_close(default_rope.inv_freq, plain.model.rotary_emb.inv_freq)

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    ours = RotaryEmbedding(16, yarn)
    hf_config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=256,
                            rope_parameters=dict(yarn))
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    torch.testing.assert_close(ours.inv_freq, inv_freq)
    assert ours.attention_scaling == pytest.approx(scaling)

    # and the whole model with YaRN on matches Llama with the same rope_parameters
    scaled, ref = pair(rope_parameters=dict(yarn))
    ids = torch.randint(3, VOCAB, (2, 100))
    with torch.no_grad():
        torch.testing.assert_close(scaled(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_flops_and_param_counts():
    model = TinyMindForCausalLM(tiny_config())
    n = model.num_params()
    assert n == sum(p.numel() for p in set(model.parameters()))
    cfg = model.config
    expected = 6 * n + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * 128
    assert model.flops_per_token(128) == expected
