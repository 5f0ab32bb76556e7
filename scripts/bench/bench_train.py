"""Pretraining throughput: TinyMind's packed bf16 (optionally compiled) loop against the straightforward loop
MiniMind uses on a CPU (fp32, each document padded or truncated to max_seq_len on its own).

    python -m scripts.bench.bench_train                                   # small preset, batch 8, seq 340, CPU
    python -m scripts.bench.bench_train --preset base --device cuda --modes packed_bf16,packed_bf16_compile

"Useful tokens/s" counts only positions that carry a real next-token target: padding is work thrown away.
Peak memory is the process's max RSS on CPU, max allocated on CUDA. MFU is printed on a GPU. On a CPU each mode
also prints its fraction of this machine's own ceiling: the matmul rate measured here, in the mode's dtype, at the
model's [batch x seq, hidden] @ [hidden, intermediate] shape, against the FLOPs per token it trains (PaLM's 6N +
attention) times all tokens/s. `tinymind_default` is what train_pretrain.py runs without --dtype (the dtype its
probe picks on this machine); `minimind_fp32_padded` is our re-implementation of MiniMind's CPU pipeline (fp32,
one document per row, padded), not MiniMind's own code.
"""
import argparse
import time

import numpy as np
import torch

from model import PRESETS, TinyMindConfig, TinyMindForCausalLM, describe
from model.data.pretrain import PretrainDataset
from model.device import DTYPES, default_device, default_dtype, matmul_rate
from model.training.runtime import device_peak_flops, peak_memory_gb

MODES = {  # name: (packed, dtype, compile); dtype None: what TinyMind picks when no --dtype is given
    "minimind_fp32_padded": (False, torch.float32, False),
    "tinymind_default": (True, None, False),
    "packed_fp32": (True, torch.float32, False),
    "packed_bf16": (True, torch.bfloat16, False),
    "packed_bf16_compile": (True, torch.bfloat16, True),
}


def padded_batches(dataset: PretrainDataset, batch_size: int, seq_len: int, rng):
    """MiniMind's layout: one document per row, truncated or right-padded to seq_len, loss masked on padding."""
    lengths = np.asarray(dataset.summary["lengths"])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    while True:
        rows = rng.choice(len(lengths), batch_size, replace=False)
        ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        labels = torch.full((batch_size, seq_len), -100, dtype=torch.long)
        for r, doc in enumerate(rows):
            n = min(int(lengths[doc]), seq_len)
            tokens = torch.from_numpy(dataset.tokens[starts[doc]:starts[doc] + n].astype(np.int64))
            ids[r, :n], labels[r, :n] = tokens, tokens
        yield ids, labels


def packed_batches(dataset: PretrainDataset, batch_size: int, rng):
    while True:
        rows = rng.choice(len(dataset), batch_size, replace=False)
        ids = torch.stack([dataset[int(i)]["input_ids"] for i in rows])
        yield ids, ids


def run_mode(name, config, dataset, args, device, default_dtype):
    packed, dtype, compile_model = MODES[name]
    dtype = dtype or default_dtype
    torch.manual_seed(0)
    model = TinyMindForCausalLM(config).to(device).train()
    step_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    rng = np.random.default_rng(0)
    batches = packed_batches(dataset, args.batch_size, rng) if packed else \
        padded_batches(dataset, args.batch_size, args.seq_len, rng)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    useful, total = 0, 0
    compile_start = time.perf_counter()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            warmup_seconds = time.perf_counter() - compile_start
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        ids, labels = next(batches)
        ids, labels = ids.to(device), labels.to(device)
        with autocast:
            loss = step_model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            useful += int((labels[:, 1:] != -100).sum())
            total += labels[:, 1:].numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"mode": name, "dtype": dtype, "useful_tok_s": useful / seconds, "all_tok_s": total / seconds,
              "pad_fraction": 1 - useful / total, "warmup_s": warmup_seconds, "peak_mem_gb": peak_memory_gb(device)}
    result["flops_per_s"] = model.flops_per_token(args.seq_len) * result["all_tok_s"]
    peak = device_peak_flops(device)
    if peak:
        result["mfu"] = result["flops_per_s"] / peak
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS), help="model size")
    parser.add_argument("--data_path", default="dataset/demo_pretrain.jsonl", help="pretraining jsonl")
    parser.add_argument("--tokenizer_path", default="model", help="tokenizer directory")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq_len", type=int, default=340, help="max_seq_len (MiniMind's pretraining default)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: best available)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list from {list(MODES)}")
    args = parser.parse_args()
    from transformers import AutoTokenizer
    device = torch.device(args.device or default_device())
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    dataset = PretrainDataset(args.data_path, tokenizer, args.seq_len)
    config = TinyMindConfig(**PRESETS[args.preset], vocab_size=len(tokenizer))
    print(f"{describe(TinyMindForCausalLM(config))} | batch {args.batch_size} x seq {args.seq_len} | {device} "
          f"({torch.get_num_threads()} threads) | {dataset.summary['documents']:,} docs")
    shape = (args.batch_size * args.seq_len, config.hidden_size, config.intermediate_size)
    default = DTYPES[default_dtype(device.type, shape if device.type == "cpu" else None)]
    ceilings = {}  # dtype -> measured matmul FLOP/s on this machine (CPU)
    if device.type == "cpu":
        for dtype in (torch.float32, torch.bfloat16):
            ceilings[dtype] = matmul_rate(shape, dtype, seconds=1.0) * 1e9
        print(f"ceiling (measured {'x'.join(map(str, shape))} matmul): fp32 {ceilings[torch.float32] / 1e9:.0f} "
              f"GFLOP/s, bf16 {ceilings[torch.bfloat16] / 1e9:.0f} GFLOP/s; tinymind_default runs "
              f"{str(default).replace('torch.', '')}")
    results = []
    for name in args.modes.split(","):
        result = run_mode(name, config, dataset, args, device, default)
        results.append(result)
        baseline = results[0]["useful_tok_s"]
        line = (f"{name:22s} useful {result['useful_tok_s']:8,.0f} tok/s (all {result['all_tok_s']:8,.0f}, "
                f"pad {100 * result['pad_fraction']:4.1f}%)  x{result['useful_tok_s'] / baseline:.2f} vs first  "
                f"peak {result['peak_mem_gb']:.2f} GB  warmup {result['warmup_s']:.0f}s")
        if "mfu" in result:
            line += f"  MFU {100 * result['mfu']:.1f}%"
        if result["dtype"] in ceilings:
            line += f"  {100 * result['flops_per_s'] / ceilings[result['dtype']]:.0f}% of the measured ceiling"
        print(line, flush=True)


if __name__ == "__main__":
    main()
