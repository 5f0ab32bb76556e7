"""Attention kernel: bf16 vs fp32 on this device, at the demo's decode and training shapes.

    python -m scripts.bench.bench_attention                          # CPU, one thread (a pipeline lane)
    python -m scripts.bench.bench_attention --num_threads 2 --rounds 5

Why it exists: under bf16 autocast the model hands SDPA bf16 q/k/v, and on a CPU torch's attention kernel can be
slower in bf16 than in fp32. `model/layers.sdpa_attention` therefore computes a decoding step (one query against the
KV cache) in fp32 on the CPU; training shapes stay in bf16. This script times the kernel alone both ways (forward
for decoding, forward + backward for training), rounds alternating, and prints the median of each.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def time_attention(dtype, batch, query_len, key_len, heads, kv_heads, head_dim, backward, repeats) -> float:
    """Milliseconds per call of SDPA (GQA, causal when query_len == key_len), inputs stored in bf16 as the model
    holds them and cast to `dtype` inside the timed call, as sdpa_attention does."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, query_len, head_dim, generator=generator).bfloat16().requires_grad_(backward)
    k = torch.randn(batch, kv_heads, key_len, head_dim, generator=generator).bfloat16().requires_grad_(backward)
    v = torch.randn(batch, kv_heads, key_len, head_dim, generator=generator).bfloat16().requires_grad_(backward)

    def call():
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), is_causal=query_len > 1,
                                             enable_gqa=True).bfloat16()
        if backward:
            out.float().sum().backward()

    with torch.set_grad_enabled(backward):
        call()
        start = time.perf_counter()
        for _ in range(repeats):
            call()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is printed")
    parser.add_argument("--heads", type=int, default=8, help="query heads (the demo model: 8)")
    parser.add_argument("--kv_heads", type=int, default=2, help="key/value heads (the demo model: 2)")
    parser.add_argument("--head_dim", type=int, default=32, help="per-head width (the demo model: 256 / 8)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    shapes = [  # name, batch, query_len, key_len, backward, repeats
        ("decode: 16 rows, 1 query vs 200 cached keys", 16, 1, 200, False, 200),
        ("decode: 128 rows, 1 query vs 100 cached keys", 128, 1, 100, False, 100),
        ("training: 8 rows x 512, forward + backward", 8, 512, 512, True, 3),
    ]
    print(f"torch {torch.__version__}, {args.num_threads} thread(s); heads {args.heads}/{args.kv_heads} x "
          f"{args.head_dim}; median of {args.rounds} alternating rounds")
    for name, batch, query_len, key_len, backward, repeats in shapes:
        times = {torch.bfloat16: [], torch.float32: []}
        for _ in range(args.rounds):
            for dtype in times:
                times[dtype].append(time_attention(dtype, batch, query_len, key_len, args.heads, args.kv_heads,
                                                   args.head_dim, backward, repeats))
        bf16, fp32 = (statistics.median(times[d]) for d in (torch.bfloat16, torch.float32))
        print(f"{name:48s} bf16 {bf16:8.3f} ms | fp32 {fp32:8.3f} ms | fp32 is {bf16 / fp32:.2f}x as fast")


if __name__ == "__main__":
    main()
