"""SFT benchmark: training throughput in real (non-padding) tokens per second when conversations are packed into
shared rows (train_full_sft.py --packing 1) vs padded one per row, either to max_seq_len (MiniMind) or to the
longest in the batch (--packing 0); then LoRA's step time and trainable-parameter share vs full SFT. First it
prints the share of padding each way of batching leaves, on the data and on synthetic MiniMind-like lengths.

    python -m scripts.bench.bench_sft                                 # demo SFT set, tiny model, max_seq_len 512, CPU
    python -m scripts.bench.bench_sft --preset small --device cuda --batch_size 16

Every mode runs full training steps (forward, backward, AdamW) of the same model on the same conversations. The
modes take turns for --rounds rounds of --steps steps each and the median round counts, so a machine whose load
changes during the run slows all modes alike. Random weights: speed does not depend on what the model knows.
"""
import argparse
import copy
import math
import time

import numpy as np
import torch
from transformers import AutoTokenizer

from model import PRESETS, TinyMindConfig, TinyMindForCausalLM, describe
from model.data.chat import SFTDataset
from model.data.packing import PackedDataset, packed_collate, pad_collate
from model.device import DTYPES, default_device, default_dtype
from model.lora import apply_lora
from model.training.engine import FUSED_ADAMW_DEVICES
from model.training.evaluation import chat_token_losses
from model.training.losses import with_aux_loss
from model.training.runtime import init_runtime


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


# ============================================================================================ padding shares


class LengthsOnly:
    """Stands in for a dataset when only its sample lengths matter (PackedDataset bins by length)."""

    def __init__(self, lengths):
        self._lengths = np.asarray(lengths)

    def lengths(self):
        return self._lengths


def padding_fractions(lengths, max_seq_len: int, batch_size: int, seed: int = 0) -> dict:
    """Share of the positions in a training batch that are padding, for the three ways of batching chats:
    each padded to max_seq_len (MiniMind), padded to the longest in its random batch, or packed (PackedDataset's
    bins, a batch padded to its longest bin). Packed batches hold batch_size rows of up to max_seq_len tokens."""
    lengths = np.minimum(np.asarray(lengths), max_seq_len)
    real = lengths.sum()
    rng = np.random.default_rng(seed)

    def padded_positions(row_lengths, rows_per_batch):
        order = rng.permutation(len(row_lengths))
        batches = [row_lengths[order[i:i + rows_per_batch]] for i in range(0, len(order), rows_per_batch)]
        return sum(len(b) * b.max() for b in batches)

    bins = PackedDataset(LengthsOnly(lengths), max_seq_len, seed=seed).bins
    bin_lengths = np.asarray([lengths[b].sum() for b in bins])
    return {"pad_to_max_seq_len": float(1 - real / (len(lengths) * max_seq_len)),
            "pad_to_batch_max": float(1 - real / padded_positions(lengths, batch_size)),
            "packed": float(1 - real / padded_positions(bin_lengths, batch_size)),
            "conversations_per_row": len(lengths) / len(bins)}


def minimind_like_lengths(count: int = 4000, seed: int = 0) -> np.ndarray:
    """Synthetic token lengths shaped like MiniMind's sft_mini_512 (conversations kept under 512 tokens): a
    log-normal with median 200 tokens, clipped to [16, 512]. An assumption, not a measurement of that file."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=math.log(200), sigma=0.6, size=count), 16, 512).astype(int)


def print_padding_shares(lengths, max_seq_len: int, batch_size: int, seed: int, label: str) -> dict:
    shares = {label: padding_fractions(lengths, max_seq_len, batch_size, seed),
              "sft_mini_512-like lengths (synthetic)": padding_fractions(minimind_like_lengths(), max_seq_len,
                                                                          batch_size, seed)}
    for name, p in shares.items():
        print(f"padding share on {name}: per-sample to max_seq_len {100 * p['pad_to_max_seq_len']:.1f}% (MiniMind), "
              f"to batch max {100 * p['pad_to_batch_max']:.1f}%, packed {100 * p['packed']:.1f}% "
              f"({p['conversations_per_row']:.1f} conversations per row)")
    return shares


# ================================================================================================ throughput


def sft_loss(model, batch):
    """train_full_sft.py's loss: mean over the batch's assistant tokens, plus the MoE balancing loss."""
    losses, mask, aux_loss = chat_token_losses(model, batch)
    return with_aux_loss(losses.sum() / mask.sum().clamp(min=1), aux_loss, {})


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
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=runtime.device.type in FUSED_ADAMW_DEVICES)

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
    padding = print_padding_shares(lengths, args.max_seq_len, args.batch_size, args.seed, args.data_path)

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
    results["padding_shares"] = padding
    return results


if __name__ == "__main__":
    main()
