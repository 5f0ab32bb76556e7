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

With `--minimind_path DIR` (a MiniMind checkout; nothing of it is shipped here) the script also runs MiniMind's own
`trainer/train_pretrain.py` on the same documents, in a temporary copy so the checkout stays untouched, with its
defaults except those that would change the shape or the work per step (one optimizer step per batch, no mid-run
saves). Our model then takes MiniMind's own config for that hidden size and depth (its key/value heads and MLP
width), so both train exactly the same shape. MiniMind's tokens/s is timed between its per-step log lines.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from model import PRESETS, TinyMindConfig, TinyMindForCausalLM, describe
from model.data.pretrain import PretrainDataset
from model.device import DTYPES, default_device, default_dtype, matmul_rate
from model.training.runtime import device_peak_flops, peak_memory_gb
from model.training.engine import FUSED_ADAMW_DEVICES

MODES = {  # name: (packed, dtype, compile); dtype None: what TinyMind picks when no --dtype is given
    "minimind_fp32_padded": (False, torch.float32, False),
    "minimind_bf16_padded": (False, torch.bfloat16, False),  # MiniMind on a GPU: bf16 autocast, same padding
    "tinymind_default": (True, None, False),
    "packed_fp32": (True, torch.float32, False),
    "packed_bf16": (True, torch.bfloat16, False),
    "packed_bf16_compile": (True, torch.bfloat16, True),
    "tinymind_default_compile": (True, None, True),
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


def minimind_config(minimind_path: str, hidden_size: int, num_hidden_layers: int) -> dict:
    """The shape fields of MiniMind's own config at this size, asked of its code, so both models match exactly."""
    code = ("import json; from model.model_minimind import MiniMindConfig as C; "
            f"c = C(hidden_size={hidden_size}, num_hidden_layers={num_hidden_layers}); print(json.dumps(dict("
            "num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, "
            "intermediate_size=c.intermediate_size, vocab_size=c.vocab_size, rope_theta=c.rope_theta)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=minimind_path, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: cannot read MiniMind's config in {minimind_path}: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


STEP_LINE = re.compile(r"\((\d+)/(\d+)\), loss:")  # MiniMind logs "Epoch:[1/1](12/20), loss: ..."


def minimind_useful_tokens(texts: list[str], tokenizer_path: str, batch_size: int, seq_len: int,
                           first_batch: int, last_batch: int) -> tuple[int, int]:
    """Target positions MiniMind trains on in batches first_batch+1..last_batch: its dataset wraps each document in
    bos/eos, truncates to seq_len and pads, and its first epoch's order is torch.randperm after seeding 42."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(42)
    order = torch.randperm(len(texts)).tolist()
    useful = 0
    for index in order[first_batch * batch_size:last_batch * batch_size]:
        length = min(len(tokenizer(texts[index], add_special_tokens=False).input_ids) + 2, seq_len)
        useful += length - 1  # positions 1..length-1 carry a target; padding is masked with -100
    return useful, (last_batch - first_batch) * batch_size * (seq_len - 1)


def run_minimind(minimind_path: str, texts: list[str], config: TinyMindConfig, args, device) -> dict:
    """MiniMind's own pretraining script on the same documents, timed from its per-step log lines."""
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="minimind_bench_") as work:
        for folder in ("trainer", "model", "dataset"):  # it writes ../out and ../checkpoints beside trainer/
            shutil.copytree(os.path.join(minimind_path, folder), os.path.join(work, folder))
        data_file = os.path.join(work, "pretrain.jsonl")
        with open(data_file, "w", encoding="utf-8") as out:
            for text in texts[:steps * args.batch_size]:
                out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        command = [sys.executable, "train_pretrain.py", "--data_path", data_file, "--epochs", "1",
                   "--batch_size", str(args.batch_size), "--max_seq_len", str(args.seq_len),
                   "--hidden_size", str(config.hidden_size), "--num_hidden_layers", str(config.num_hidden_layers),
                   "--accumulation_steps", "1", "--log_interval", "1", "--save_interval", str(10 ** 9),
                   "--num_workers", str(args.minimind_workers), "--device", str(device), "--dtype", "bfloat16"]
        process = subprocess.Popen(command, cwd=os.path.join(work, "trainer"), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        logged, tail = {}, []
        for line in process.stdout:  # the time each step's line arrives is when that step finished
            tail = (tail + [line])[-20:]
            match = STEP_LINE.search(line)
            if match:
                logged[int(match.group(1))] = time.perf_counter()
        if process.wait() != 0 or args.warmup not in logged or steps not in logged:
            raise SystemExit("error: MiniMind's trainer did not run to the end:\n" + "".join(tail))
        useful, total = minimind_useful_tokens(texts[:steps * args.batch_size], os.path.join(work, "model"),
                                               args.batch_size, args.seq_len, args.warmup, steps)
    seconds = logged[steps] - logged[args.warmup]
    return {"mode": "minimind_own_trainer", "dtype": torch.float32 if device.type == "cpu" else torch.bfloat16,
            "useful_tok_s": useful / seconds, "all_tok_s": total / seconds, "pad_fraction": 1 - useful / total,
            "warmup_s": float("nan"), "peak_mem_gb": float("nan")}


SCRIPT_MODES = {"train_pretrain_default": [], "train_pretrain_fp32": ["--dtype", "float32"]}


def run_train_pretrain(name: str, config: TinyMindConfig, args, device) -> dict:
    """The real train_pretrain.py (the shared loop with its logging, clipping and schedule), not a bench loop:
    tokens/s from its own per-step log after the warmup steps."""
    shape = ["--hidden_size", config.hidden_size, "--num_hidden_layers", config.num_hidden_layers,
             "--num_attention_heads", config.num_attention_heads, "--num_key_value_heads", config.num_key_value_heads,
             "--intermediate_size", config.intermediate_size]
    with tempfile.TemporaryDirectory(prefix="tinymind_bench_") as work:
        command = [sys.executable, "train_pretrain.py", "--data_path", args.data_path, "--tokenizer_path",
                   args.tokenizer_path, "--save_dir", work, "--device", str(device), "--batch_size", args.batch_size,
                   "--max_seq_len", args.seq_len, "--max_steps", args.warmup + args.steps, "--log_interval", 1,
                   "--eval_interval", 0, "--save_interval", 10 ** 9, *shape,
                   *SCRIPT_MODES[name]]
        done = subprocess.run([str(part) for part in command], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: train_pretrain.py failed:\n{done.stderr[-2000:]}")
        with open(os.path.join(work, "logs", "pretrain.jsonl"), encoding="utf-8") as log:
            records = [json.loads(line) for line in log if line.strip()]
        probed = re.search(r"^dtype (\w+):", done.stdout, re.MULTILINE)  # the probe's choice, printed when no --dtype
        dtype = DTYPES[probed.group(1)] if probed else \
            torch.float32 if "--dtype" in SCRIPT_MODES[name] else DTYPES[default_dtype(device.type)]
    timed = [r for r in records if "tokens_per_sec" in r and r["step"] > args.warmup]
    tokens_per_step = args.batch_size * args.seq_len  # packed rows: every position is a real target
    seconds = sum(tokens_per_step / r["tokens_per_sec"] for r in timed)
    rate = tokens_per_step * len(timed) / seconds
    return {"mode": name, "dtype": dtype, "useful_tok_s": rate, "all_tok_s": rate, "pad_fraction": 0.0,
            "warmup_s": float("nan"), "peak_mem_gb": max(r.get("peak_mem_gb", 0.0) for r in timed)}


def run_mode(name, config, dataset, args, device, default_dtype):
    packed, dtype, compile_model = MODES[name]
    dtype = dtype or default_dtype
    torch.manual_seed(0)
    model = TinyMindForCausalLM(config).to(device).train()
    step_model = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in FUSED_ADAMW_DEVICES)
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
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list from {list(MODES) + list(SCRIPT_MODES)}")
    parser.add_argument("--minimind_path", default=None,
                        help="a MiniMind checkout: also run its own trainer/train_pretrain.py at the same shape")
    parser.add_argument("--minimind_workers", type=int, default=0,
                        help="DataLoader workers for MiniMind's run (its default 8 oversubscribes a small CPU)")
    args = parser.parse_args()
    from transformers import AutoTokenizer
    device = torch.device(args.device or default_device())
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    dataset = PretrainDataset(args.data_path, tokenizer, args.seq_len)
    config = TinyMindConfig(**PRESETS[args.preset], vocab_size=len(tokenizer))
    if args.minimind_path:
        config = TinyMindConfig(**{**PRESETS[args.preset], **minimind_config(
            args.minimind_path, config.hidden_size, config.num_hidden_layers)})
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
    flops_per_token = TinyMindForCausalLM(config).flops_per_token(args.seq_len)
    results = []
    names = (["minimind_own_trainer"] if args.minimind_path else []) + args.modes.split(",")
    for name in names:
        if name == "minimind_own_trainer":
            with open(args.data_path, encoding="utf-8") as lines:
                texts = [json.loads(line)["text"] for line in lines if line.strip()]
            result = run_minimind(args.minimind_path, texts, config, args, device)
            result["flops_per_s"] = flops_per_token * result["all_tok_s"]
        elif name in SCRIPT_MODES:
            result = run_train_pretrain(name, config, args, device)
            result["flops_per_s"] = flops_per_token * result["all_tok_s"]
        else:
            result = run_mode(name, config, dataset, args, device, default)
        results.append(result)
        baseline = results[0]["useful_tok_s"]
        line = (f"{name:22s} useful {result['useful_tok_s']:8,.0f} tok/s (all {result['all_tok_s']:8,.0f}, "
                f"pad {100 * result['pad_fraction']:4.1f}%)  x{result['useful_tok_s'] / baseline:.2f} vs "
                f"{names[0]}  peak {result['peak_mem_gb']:.2f} GB  warmup {result['warmup_s']:.0f}s")
        if "mfu" in result:
            line += f"  MFU {100 * result['mfu']:.1f}%"
        if result["dtype"] in ceilings:
            line += f"  {100 * result['flops_per_s'] / ceilings[result['dtype']]:.0f}% of the measured ceiling"
        print(line, flush=True)
    if ceilings:
        # A shared or virtual CPU's clock wanders by ~10% over minutes: probe again after the modes and hold every
        # mode to the higher of the two probes, so a slow first probe cannot flatter the fractions.
        for dtype in ceilings:
            ceilings[dtype] = max(ceilings[dtype], matmul_rate(shape, dtype, seconds=1.0) * 1e9)
        print(f"ceiling, the higher of the probes before and after: fp32 {ceilings[torch.float32] / 1e9:.0f} GFLOP/s, "
              f"bf16 {ceilings[torch.bfloat16] / 1e9:.0f} GFLOP/s")
        for result in results:
            if result["dtype"] in ceilings:
                print(f"  {result['mode']:24s} {100 * result['flops_per_s'] / ceilings[result['dtype']]:3.0f}% of the "
                      f"{str(result['dtype'])[6:]} ceiling")

if __name__ == "__main__":
    main()
