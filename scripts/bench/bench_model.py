"""Model benchmark: training throughput (forward + backward), peak memory, and decode speed with and without the
KV cache, for a preset on a device/dtype. MoE/MLA variants via --use_moe / --use_mla.

    python -m scripts.bench.bench_model --preset small --device cpu                  # the issue's CPU figures
    python -m scripts.bench.bench_model --preset base --device cuda --dtype bfloat16

Random weights: speed does not depend on what the model knows. Prints one line per measurement.
"""
import argparse
import time

import torch

from model import PRESETS, TinyMindConfig, TinyMindForCausalLM, describe
from model.device import DTYPES, default_device, default_dtype
from model.training.runtime import device_peak_flops, peak_memory_gb
from model.training.engine import FUSED_ADAMW_DEVICES


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_train(model, device, dtype, batch, seq, steps, warmup):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in FUSED_ADAMW_DEVICES)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        with autocast:
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return batch * seq * steps / (time.perf_counter() - start)


@torch.no_grad()
def bench_decode(model, device, dtype, prompt_len, new_tokens, use_cache, batch=1):
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=use_cache, pad_token_id=0, eos_token_id=None)
        sync(device)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=use_cache, pad_token_id=0, eos_token_id=None)
        sync(device)
    assert out.shape[1] == prompt_len + new_tokens
    return batch * new_tokens / (time.perf_counter() - start)


def kv_cache_bytes_per_token(config: TinyMindConfig, device, dtype) -> float:
    """Measured, not computed: prefill 64 tokens and count the bytes the cache holds, per token per layer."""
    model = TinyMindForCausalLM(config).to(device).eval()
    ids = torch.randint(3, config.vocab_size, (1, 64), device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        cache = model(ids, use_cache=True).cache
    total = 0
    for layer in cache.layers:
        total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total / 64 / config.num_hidden_layers


def compare_attention_caches(preset: str, device, dtype, prompt_len: int, new_tokens: int):
    """Cache bytes per token per layer, and KV-cached decode speed (batch 1) for each attention type."""
    base = PRESETS[preset]
    variants = {"MHA": dict(base, num_key_value_heads=base["num_attention_heads"]), "GQA": dict(base),
                "MLA": dict(base, use_mla=True)}
    for name, settings in variants.items():
        config = TinyMindConfig(**settings)
        torch.manual_seed(0)
        model = TinyMindForCausalLM(config).to(device).eval()
        speed = bench_decode(model, device, dtype, prompt_len, new_tokens, use_cache=True)
        print(f"KV cache {name}: {kv_cache_bytes_per_token(config, device, dtype):,.0f} bytes per token per layer "
              f"({str(dtype).replace('torch.', '')}); decode {new_tokens} new tokens: {speed:,.1f} tokens/s",
              flush=True)


def compare_moe_with_dense(preset: str, device, dtype, batch, seq, steps):
    """MoE step time against a dense model whose FFN is as wide as the MoE's active experts (equal active params)."""
    moe_config = TinyMindConfig(**PRESETS[preset], use_moe=True)
    active_width = (moe_config.num_experts_per_tok + moe_config.n_shared_experts) * moe_config.moe_intermediate_size
    dense_config = TinyMindConfig(**PRESETS[preset], intermediate_size=active_width)
    timings = {}
    for name, config in (("dense", dense_config), ("moe", moe_config)):
        torch.manual_seed(0)
        model = TinyMindForCausalLM(config).to(device).train()
        active = model.num_params(active=True)
        timings[name] = bench_train(model, device, dtype, batch, seq, steps, 2)
        print(f"{name:5s} {active / 1e6:.2f}M active params: {timings[name]:,.0f} tokens/s", flush=True)
    print(f"MoE step time / dense step time at equal active params: {timings['dense'] / timings['moe']:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model size")
    parser.add_argument("--use_moe", type=int, default=0, choices=[0, 1], help="MoE feed-forward layers")
    parser.add_argument("--use_mla", type=int, default=0, choices=[0, 1], help="multi-head latent attention")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: best available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="autocast dtype (default: fastest)")
    parser.add_argument("--batch_size", type=int, default=8, help="training micro-batch")
    parser.add_argument("--seq_len", type=int, default=340, help="training sequence length")
    parser.add_argument("--train_steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--prompt_len", type=int, default=16, help="decode benchmark prompt length")
    parser.add_argument("--new_tokens", type=int, default=256, help="tokens generated in the decode benchmark")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: train,decode,nocache")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--compare", default="", help="comma list: moe (MoE vs dense at equal active params), "
                                                      "kv (KV-cache bytes per token: MHA vs GQA vs MLA)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or default_device())
    dtype = DTYPES[args.dtype or default_dtype(device.type)]
    torch.manual_seed(0)
    config = TinyMindConfig(**PRESETS[args.preset], use_moe=bool(args.use_moe), use_mla=bool(args.use_mla))
    model = TinyMindForCausalLM(config).to(device)
    print(f"{describe(model)} | device {device} ({torch.get_num_threads()} threads) | dtype {dtype}")
    skip = set(args.skip.split(","))
    compare = set(filter(None, args.compare.split(",")))
    if "kv" in compare:
        compare_attention_caches(args.preset, device, dtype, args.prompt_len, args.new_tokens)
    if "moe" in compare:
        compare_moe_with_dense(args.preset, device, dtype, args.batch_size, args.seq_len, args.train_steps)
    if compare:
        return
    if "train" not in skip:
        model.train()
        tokens_per_sec = bench_train(model, device, dtype, args.batch_size, args.seq_len, args.train_steps, 2)
        line = (f"train  batch {args.batch_size} x seq {args.seq_len}: {tokens_per_sec:,.0f} tokens/s, "
                f"peak memory {peak_memory_gb(device):.2f} GB")
        peak = device_peak_flops(device)
        if peak:
            line += f", MFU {100 * model.flops_per_token(args.seq_len) * tokens_per_sec / peak:.1f}%"
        print(line, flush=True)
    if "decode" not in skip:
        model.eval()
        cached = bench_decode(model, device, dtype, args.prompt_len, args.new_tokens, use_cache=True)
        print(f"decode {args.new_tokens} new tokens, KV cache:    {cached:,.1f} tokens/s", flush=True)
        if "nocache" not in skip:
            uncached = bench_decode(model, device, dtype, args.prompt_len, args.new_tokens, use_cache=False)
            print(f"decode {args.new_tokens} new tokens, no cache:    {uncached:,.1f} tokens/s  "
                  f"(cache speed-up {cached / uncached:.1f}x)", flush=True)


if __name__ == "__main__":
    main()
