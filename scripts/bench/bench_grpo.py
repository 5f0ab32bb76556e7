"""Benchmark GRPO's two halves: how fast rollouts are generated, and how a training step splits its time.

    python -m scripts.bench.bench_grpo                                   # tiny preset, random init, 4 prompts x G=8
    python -m scripts.bench.bench_grpo --from_weight out/full_sft_256.pth --step_time_steps 10

1. Rollout throughput. The same B x G completions of exactly --new_tokens tokens each (end-of-turn suppressed, so
   every method does the same work) generated three ways:
     batched    all B*G rows left-padded into ONE KV-cached model.generate call (what train_grpo.py does)
     sequential one row at a time, with the KV cache (a loop over completions)
     uncached   one row at a time, recomputing the whole prefix for every new token (no KV cache); timed on
                --uncached_rows rows only, it is that slow
   Tokens/s counts generated tokens only.
2. Step-time split: a few real train_grpo.py steps on the demo prompts; the share of each step spent generating
   (rollout) and in forward/backward/optimizer (update), from the run's JSONL log.
"""
import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoTokenizer, GenerationConfig

from model.data.prompts import PromptDataset
from model.training.cli import MODEL_FLAGS, build_model
from model.training.rollouts import generate_rollout
from model.training.runtime import init_runtime

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from_weight", default="none", help="a .pth to load ('none': random init of --preset)")
    parser.add_argument("--preset", default="tiny", help="model size when --from_weight is none")
    parser.add_argument("--data_path", default="dataset/demo_grpo.jsonl", help="prompts to generate from")
    parser.add_argument("--tokenizer_path", default="model", help="tokenizer directory")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per rollout batch (B)")
    parser.add_argument("--num_generations", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens generated per completion")
    parser.add_argument("--uncached_rows", type=int, default=2, help="rows timed without the KV cache (0: skip)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats of the batched/sequential runs (best kept)")
    parser.add_argument("--step_time_steps", type=int, default=6,
                        help="train_grpo.py steps for the time split (0: skip)")
    parser.add_argument("--max_gen_len", type=int, default=128, help="completion limit in those training steps")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default=None, help="autocast dtype (default: the training default for the device)")
    parser.add_argument("--num_threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    return parser.parse_args()


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def here(path: str) -> str:
    """A path the user gave, absolute if it exists from here: train_grpo.py runs from the repository root."""
    return os.path.abspath(path) if os.path.exists(path) else path


def main():
    args = parse_args()
    runtime = init_runtime(args.device, args.dtype, 0, args.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    model_args = argparse.Namespace(from_weight=args.from_weight, save_dir="out", preset=args.preset,
                                    **{k: None for k in MODEL_FLAGS})
    model, _ = build_model(model_args, vocab_size=len(tokenizer))
    model = model.to(runtime.device).eval()
    items = PromptDataset(args.data_path, tokenizer, 512).items[:args.prompts]
    G, n = args.num_generations, args.new_tokens
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0, top_k=0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    rows = len(items) * G
    print(f"rollout: {len(items)} prompts x G={G} = {rows} completions x {n} tokens, device {runtime.device}, "
          f"dtype {str(runtime.dtype).replace('torch.', '')}, {torch.get_num_threads()} threads")

    def batched():
        return generate_rollout(model, tokenizer, items, G, config, runtime.device)

    def sequential(count=rows, use_cache=True):
        one = copy.deepcopy(config)
        one.use_cache = use_cache
        for i in range(count):
            generate_rollout(model, tokenizer, [items[i // G]], 1, one, runtime.device)

    results = {}
    with torch.no_grad(), runtime.autocast():
        batched()  # warm-up
        results["batched_tokens_per_sec"] = rows * n / timed(batched, args.repeats)
        results["sequential_tokens_per_sec"] = rows * n / timed(sequential, max(1, args.repeats - 1))
        if args.uncached_rows > 0:
            count = min(args.uncached_rows, rows)
            results["uncached_tokens_per_sec"] = count * n / timed(lambda: sequential(count, False), 1)
    results["speedup_vs_sequential"] = results["batched_tokens_per_sec"] / results["sequential_tokens_per_sec"]
    print(f"  batched + KV cache    {results['batched_tokens_per_sec']:10,.0f} tokens/s")
    print(f"  one at a time + cache {results['sequential_tokens_per_sec']:10,.0f} tokens/s "
          f"(batched is {results['speedup_vs_sequential']:.1f}x faster)")
    if "uncached_tokens_per_sec" in results:
        results["speedup_vs_uncached"] = results["batched_tokens_per_sec"] / results["uncached_tokens_per_sec"]
        print(f"  one at a time, no cache {results['uncached_tokens_per_sec']:8,.0f} tokens/s "
              f"(batched is {results['speedup_vs_uncached']:.0f}x faster)")

    if args.step_time_steps > 0:
        with tempfile.TemporaryDirectory() as save_dir:
            argv = ["--data_path", here(args.data_path), "--tokenizer_path", here(args.tokenizer_path),
                    "--save_dir", save_dir, "--from_weight", here(args.from_weight),
                    "--max_steps", str(args.step_time_steps),
                    "--batch_size", str(args.prompts), "--num_generations", str(G), "--max_gen_len",
                    str(args.max_gen_len), "--eval_samples", "0",
                    "--device", args.device, "--show_completions", "0"]
            argv += ["--preset", args.preset] if args.from_weight == "none" else []
            argv += ["--dtype", args.dtype] if args.dtype else []
            argv += ["--num_threads", str(args.num_threads)] if args.num_threads else []
            subprocess.run([sys.executable, "train_grpo.py", *argv], cwd=ROOT, check=True)
            with open(os.path.join(save_dir, "logs", "grpo.jsonl")) as f:
                steps = [r for r in map(json.loads, f) if "rollout_time" in r]
        rollout, update = sum(r["rollout_time"] for r in steps), sum(r["update_time"] for r in steps)
        results.update(step_seconds=(rollout + update) / len(steps), rollout_share=rollout / (rollout + update),
                       update_share=update / (rollout + update),
                       mean_completion_length=sum(r["completion_length"] for r in steps) / len(steps))
        print(f"training step ({len(steps)} steps, {args.prompts} prompts x G={G}, completions "
              f"{results['mean_completion_length']:.0f} tokens on average): {results['step_seconds']:.2f} s/step, "
              f"rollout {100 * results['rollout_share']:.0f}%, update {100 * results['update_share']:.0f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
