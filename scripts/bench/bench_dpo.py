"""DPO benchmark: optimizer-step time and peak memory with a live reference model vs precomputed reference
log-probs (`train_dpo.py --precompute_ref 1`), per preset.

    python -m scripts.bench.bench_dpo                                  # tiny and small presets, CPU
    python -m scripts.bench.bench_dpo --presets small base --device cuda --batch_size 8 --seq_len 512

Each (preset, mode) runs in its own process, because a process's peak RSS never goes down: measuring both modes
in one process would charge the second with the first one's peak. Random weights and random token pairs (speed
and memory do not depend on what the model knows); the step is train_dpo.py's loss (make_loss_fn below, built
from the same pieces) + backward + AdamW. Prints a markdown table: seconds per step, peak memory, and for the
precomputed mode the one-off cost of the scoring pass.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
from model.data.preference import IndexedPairs, collate_pairs
from model.training.engine import FUSED_ADAMW_DEVICES
from model.device import DTYPES, default_device, default_dtype
from model.training.frozen import frozen_copy
from model.training.losses import dpo_loss, with_aux_loss
from model.training.preference import pair_logps, precompute_reference_logps, reference_logps
from model.training.runtime import init_runtime

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def random_pairs(count: int, seq_len: int, vocab_size: int, generator: torch.Generator) -> list[dict]:
    """Pairs sharing a prompt of seq_len / 4 tokens; both answers fill the rest (labels on the answer only)."""
    prompt_len = seq_len // 4
    pairs = []
    for _ in range(count):
        prompt = torch.randint(3, vocab_size, (prompt_len,), generator=generator)
        item = {}
        for side in ("chosen", "rejected"):
            ids = torch.cat([prompt, torch.randint(3, vocab_size, (seq_len - prompt_len,), generator=generator)])
            labels = ids.clone()
            labels[:prompt_len] = -100
            item[f"{side}_input_ids"], item[f"{side}_labels"] = ids, labels
        pairs.append(item)
    return pairs


def make_loss_fn(reference, table: torch.Tensor | None, beta: float = 0.1):
    """train_dpo.py's loss_fn at its defaults (sigmoid loss, no label smoothing), without the logged metrics:
    reference log-probs from the live frozen model, or looked up in the precomputed table."""
    def loss_fn(model, batch):
        chosen, rejected, chosen_n, rejected_n, out = pair_logps(model, batch)
        ref_chosen, ref_rejected = reference_logps(reference, table, batch)
        losses, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type="sigmoid",
                                chosen_lengths=chosen_n, rejected_lengths=rejected_n)
        return with_aux_loss(losses.mean(), out.aux_loss, {})
    return loss_fn


def worker(args) -> dict:
    runtime = init_runtime(args.device, args.dtype, seed=0, num_threads=args.threads)
    device = runtime.device
    pairs = IndexedPairs(random_pairs(args.batch_size * (args.steps + 1), args.seq_len, 6400,
                                      torch.Generator().manual_seed(0)))
    baseline = peak_memory_mb(device)
    model = TinyMindForCausalLM(TinyMindConfig(**PRESETS[args.preset])).to(device)
    result = {"preset": args.preset, "mode": args.mode, "params_m": model.num_params() / 1e6}
    table, reference = None, None
    if args.mode == "precomputed":
        start = time.perf_counter()
        table = precompute_reference_logps(model, pairs, runtime, args.batch_size)
        result["precompute_s_per_pair"] = (time.perf_counter() - start) / len(pairs)
    else:
        reference = frozen_copy(model)
    loss_fn = make_loss_fn(reference, table)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type in FUSED_ADAMW_DEVICES)
    model.train()
    batches = [collate_pairs([pairs[i] for i in range(s, s + args.batch_size)])
               for s in range(0, len(pairs), args.batch_size)]
    times = []
    for batch in batches:  # the first step warms up (allocator, kernels) and is not timed
        batch = {k: v.to(device) for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with runtime.autocast():
            loss, _ = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result["step_s"] = sorted(times[1:])[len(times[1:]) // 2]  # median: robust to a noisy, shared machine
    result["peak_mb"] = peak_memory_mb(device)
    result["peak_above_data_mb"] = result["peak_mb"] - baseline
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS), help="model sizes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="autocast dtype (default: fastest)")
    parser.add_argument("--batch_size", type=int, default=4, help="pairs per step (2x sequences through the model)")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per sequence (a quarter of them prompt)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    device = torch.device(args.device or default_device())
    dtype = args.dtype or default_dtype(device.type)
    print(f"DPO step, {args.batch_size} pairs x {args.seq_len} tokens, device {device}, dtype {dtype}, "
          f"median of {args.steps} steps")
    print("| preset | params | reference | s / step | peak memory (MB) | above data (MB) | one-off scoring |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for mode in ("live", "precomputed"):
            command = [sys.executable, "-m", "scripts.bench.bench_dpo", "--worker", "--preset", preset,
                       "--mode", mode, "--device", str(device), "--dtype", dtype,
                       "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len),
                       "--steps", str(args.steps)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                raise SystemExit(f"{preset}/{mode} failed:\n{done.stderr[-2000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            scoring = f"{1000 * r['precompute_s_per_pair']:.0f} ms / pair" if mode == "precomputed" else "-"
            print(f"| {preset} | {r['params_m']:.1f}M | {mode} | {r['step_s']:.3f} | {r['peak_mb']:,.0f} | "
                  f"{r['peak_above_data_mb']:,.0f} | {scoring} |", flush=True)


if __name__ == "__main__":
    main()
