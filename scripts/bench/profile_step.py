"""Where one pretraining step spends its time: torch.profiler over a few packed steps (forward, backward, clip, AdamW),
self time grouped into matmuls, attention, the optimizer and the rest, plus the ops that cost most.

    python -m scripts.bench.profile_step                           # MiniMind's 512 x 8 shape, batch 8, seq 340, CPU
    python -m scripts.bench.profile_step --optimizer loop          # AdamW as torch runs it on a CPU unless asked
    python -m scripts.bench.profile_step --dtype bfloat16 --top 20

The matmul share is the part a faster loop cannot win back on this machine; everything else (norms, softmax,
element-wise ops, the optimizer, casts) is what "non-matmul time" means in docs/benchmarks.md. `--optimizer fused`
is what the training scripts use (one fused kernel per parameter group); `loop` is torch's default on a CPU, one
tensor at a time; `foreach` batches tensors in lists.
"""
import argparse
import time
from collections import defaultdict

import numpy as np
import torch

from model import TinyMindConfig, TinyMindForCausalLM, describe
from model.device import DTYPES, default_dtype

KERNELS = (  # op names (self time, so a parent is not counted with its children)
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
)
OTHER = "other (norms, element-wise, casts, loss)"


def category(event) -> str:
    """The optimizer and clipping by the region that ran the op (a loop AdamW's muls are the optimizer's), the rest
    by the op's name."""
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "optimizer"
        if parent.name == "clip_grad_norm":
            return "gradient clipping"
        parent = parent.cpu_parent
    for name, patterns in KERNELS:
        if any(p in event.name for p in patterns):
            return name
    return OTHER


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=512, help="model width (MiniMind's small: 512)")
    parser.add_argument("--num_hidden_layers", type=int, default=8, help="depth")
    parser.add_argument("--num_key_value_heads", type=int, default=4, help="KV heads (MiniMind: 4 of 8)")
    parser.add_argument("--intermediate_size", type=int, default=1664, help="MLP width (MiniMind's for 512)")
    parser.add_argument("--vocab_size", type=int, default=6400, help="vocabulary (our tokenizer's)")
    parser.add_argument("--batch_size", type=int, default=8, help="rows per step")
    parser.add_argument("--seq_len", type=int, default=340, help="tokens per row")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="autocast dtype (default: what the training scripts pick on this machine)")
    parser.add_argument("--optimizer", default="fused", choices=["fused", "loop", "foreach"],
                        help="AdamW implementation (the training scripts use fused)")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled steps first")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=12, help="how many of the costliest ops to list")
    args = parser.parse_args()

    config = TinyMindConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                            num_attention_heads=8, num_key_value_heads=args.num_key_value_heads,
                            intermediate_size=args.intermediate_size, vocab_size=args.vocab_size)
    shape = (args.batch_size * args.seq_len, config.hidden_size, config.intermediate_size)
    dtype = DTYPES[args.dtype or default_dtype("cpu", shape)]
    torch.manual_seed(0)
    model = TinyMindForCausalLM(config).train()
    kwargs = {"fused": True} if args.optimizer == "fused" else {"foreach": args.optimizer == "foreach"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **kwargs)
    rng = np.random.default_rng(0)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    print(f"{describe(model)} | batch {args.batch_size} x seq {args.seq_len} | {str(dtype)[6:]} | AdamW "
          f"{args.optimizer} | {torch.get_num_threads()} threads")

    def step():
        ids = torch.from_numpy(rng.integers(0, args.vocab_size, (args.batch_size, args.seq_len)))
        with autocast:
            loss = model(ids, labels=ids).loss
        loss.backward()
        with torch.profiler.record_function("clip_grad_norm"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(args.steps):
            with torch.profiler.record_function("train_step"):
                step()
    wall = (time.perf_counter() - start) / args.steps
    by_category, by_op = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for event in profile.events():
        if event.name == "train_step":
            continue
        kind = category(event)
        by_category[kind] += event.self_cpu_time_total
        op = by_op[event.name, kind]
        op[0], op[1] = op[0] + event.self_cpu_time_total, op[1] + 1
    total = sum(by_category.values())
    tokens = args.batch_size * args.seq_len
    print(f"step {1000 * wall:.0f} ms under the profiler ({tokens / wall:,.0f} tok/s); self time by kind:")
    for name, micros in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"  {name:40s} {micros / 1e3 / args.steps:8.1f} ms  {100 * micros / total:5.1f}%")
    print(f"the {args.top} costliest ops (self time per step):")
    for (name, kind), (micros, count) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"  {name[:48]:48s} {micros / 1e3 / args.steps:8.1f} ms  x{count // args.steps:<5d} {kind}")


if __name__ == "__main__":
    main()
