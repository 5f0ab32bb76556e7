"""SFT benchmark: training throughput in real (non-padding) tokens per second when conversations are packed into
shared rows (train_full_sft.py --packing 1) vs padded one per row, either to max_seq_len (MiniMind) or to the
longest in the batch (--packing 0); then LoRA's step time and trainable-parameter share vs full SFT.

    python scripts/bench_sft.py                                 # demo SFT set, tiny model, max_seq_len 512, CPU
    python scripts/bench_sft.py --preset small --device cuda --batch_size 16

Every mode runs full training steps (forward, backward, AdamW) of the same model on the same conversations. The
modes take turns for --rounds rounds of --steps steps each and the median round counts, so a machine whose load
changes during the run slows all modes alike. Random weights: speed does not depend on what the model knows.
"""
import argparse
import copy
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from transformers import AutoTokenizer  # noqa: E402

from model import PRESETS, TinyMindConfig, TinyMindForCausalLM, describe  # noqa: E402
from model.dataset import PackedDataset, SFTDataset, packed_collate, pad_collate  # noqa: E402
from model.lora import apply_lora  # noqa: E402
from model.train_utils import DTYPES, default_device, default_dtype, init_runtime  # noqa: E402
from train_full_sft import sft_loss  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", default="dataset/demo_sft.jsonl", help="SFT conversations to batch")
    parser.add_argument("--tokenizer_path", default="model", help="directory with the tokenizer")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size")
    parser.add_argument("--max_seq_len", type=int, default=512, help="row length (MiniMind's sft_512 uses 512)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="rows per step of max_seq_len positions: packed rows, or conversations padded to "
                             "max_seq_len. Padding to the batch max takes as many conversations per step as the "
                             "packed rows hold on average, so both modes see the same data per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each mode's median round is reported")
    parser.add_argument("--lora_r", type=int, default=8, help="LoRA rank for the LoRA comparison")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="autocast dtype (default: the fastest)")
    parser.add_argument("--num_threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and batch order")
    return parser.parse_args(argv)


def batches_for(mode: str, dataset: SFTDataset, batch_size: int, max_seq_len: int, seed: int):
    """An endless stream of collated batches of one mode, in a seeded random order."""
    rng = np.random.default_rng(seed)
    if mode == "packed":
        rows = PackedDataset(dataset, max_seq_len, seed=seed)
        collate = packed_collate
    else:
        rows = dataset
        pad_to = max_seq_len if mode == "pad_to_max_seq_len" else None
        collate = lambda items: pad_collate(items, pad_to=pad_to)  # noqa: E731
    while True:
        order = rng.permutation(len(rows))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            items = [rows[int(i)] for i in order[start:start + batch_size]]
            batch = collate(items)
            batch["tokens"] = sum(len(item["input_ids"]) for item in items)
            yield batch


class Runner:
    """One model + optimizer + batch stream; `run(steps)` -> (seconds, real tokens, positions)."""

    def __init__(self, model, batches, runtime):
        self.model, self.batches, self.runtime = model.train(), batches, runtime
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=runtime.device.type == "cuda")

    def step(self):
        batch = next(self.batches)
        batch = {k: v.to(self.runtime.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with self.runtime.autocast():
            loss, _ = sft_loss(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return batch["tokens"], batch["input_ids"].numel()

    def run(self, steps: int):
        sync(self.runtime.device)
        start, tokens, positions = time.perf_counter(), 0, 0
        for _ in range(steps):
            t, p = self.step()
            tokens, positions = tokens + t, positions + p
        sync(self.runtime.device)
        return time.perf_counter() - start, tokens, positions


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(runners: dict, steps: int, rounds: int) -> dict:
    """Round-robin timing; per mode the median round's tokens/s, positions/s and step time."""
    for runner in runners.values():
        runner.run(1)  # warm-up: allocator, autocast caches, optimizer state
    measured = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            measured[name].append(runner.run(steps))
    results = {}
    for name, rows in measured.items():
        seconds, tokens, positions = sorted(rows, key=lambda r: r[1] / r[0])[len(rows) // 2]  # the median round
        results[name] = {"tokens_per_sec": tokens / seconds, "positions_per_sec": positions / seconds,
                         "pad_share": 1 - tokens / positions, "step_seconds": seconds / steps}
    return results


def main(argv=None):
    args = parse_args(argv)
    device = args.device or default_device()
    runtime = init_runtime(device, args.dtype or default_dtype(device.split(":")[0]), args.seed, args.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    dataset = SFTDataset(args.data_path, tokenizer, args.max_seq_len, show_progress=False)
    lengths = dataset.lengths()
    torch.manual_seed(args.seed)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS[args.preset])).to(runtime.device)
    print(f"{describe(model)}; {runtime.device}, {str(runtime.dtype).replace('torch.', '')}, "
          f"{torch.get_num_threads()} threads; {len(dataset):,} conversations, mean {lengths.mean():.0f} tokens, "
          f"max_seq_len {args.max_seq_len}, batch {args.batch_size} rows")

    per_row = len(dataset) / len(PackedDataset(dataset, args.max_seq_len, seed=args.seed))
    batch_sizes = {"packed": args.batch_size, "pad_to_batch_max": max(1, round(args.batch_size * per_row)),
                   "pad_to_max_seq_len": args.batch_size}
    print("batch per step: " + ", ".join(f"{mode} {size} {'rows' if mode == 'packed' else 'conversations'}"
                                          for mode, size in batch_sizes.items()))
    runners = {mode: Runner(copy.deepcopy(model), batches_for(mode, dataset, size, args.max_seq_len, args.seed),
                            runtime) for mode, size in batch_sizes.items()}
    lora_model = apply_lora(copy.deepcopy(model), r=args.lora_r, alpha=2 * args.lora_r, verbose=False)
    runners["lora_packed"] = Runner(lora_model, batches_for("packed", dataset, args.batch_size, args.max_seq_len,
                                                            args.seed), runtime)
    results = compare(runners, args.steps, args.rounds)
    for mode, r in results.items():
        print(f"{mode:>20}: {r['tokens_per_sec']:8,.0f} real tokens/s | {r['positions_per_sec']:8,.0f} positions/s | "
              f"padding {100 * r['pad_share']:4.1f}% | {r['step_seconds']:.3f} s/step")
    packed = results["packed"]["tokens_per_sec"]
    results["speedup_vs_pad_to_max_seq_len"] = packed / results["pad_to_max_seq_len"]["tokens_per_sec"]
    results["speedup_vs_pad_to_batch_max"] = packed / results["pad_to_batch_max"]["tokens_per_sec"]
    print(f"packing: {results['speedup_vs_pad_to_max_seq_len']:.2f}x the real tokens/s of padding to max_seq_len "
          f"(MiniMind), {results['speedup_vs_pad_to_batch_max']:.2f}x padding to the batch max")
    trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in lora_model.parameters())
    results["lora_trainable_share"] = trainable / total
    results["lora_step_time_ratio"] = results["lora_packed"]["step_seconds"] / results["packed"]["step_seconds"]
    print(f"LoRA r={args.lora_r}: {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%), "
          f"step time {results['lora_step_time_ratio']:.2f}x full SFT's on the same packed batches")
    return results


if __name__ == "__main__":
    main()
