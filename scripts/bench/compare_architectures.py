"""Dense vs MoE (three balancing choices) vs MLA: the same short pretraining run for each, one table.

    python -m scripts.bench.compare_architectures                        # tiny preset, 200 steps each, CPU demo corpus
    python -m scripts.bench.compare_architectures --steps 2000 --preset small --extra "--batch_size 32"   # on a GPU

Each variant is an ordinary train_pretrain.py run with its own --save_weight (arch_dense, arch_moe_aux_free, ...),
so its log lands in <save_dir>/logs/. The table reports the final held-out loss, the MoE max/mean expert load at the
end (1.0 = perfectly even), and the throughput.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
VARIANTS = {
    "dense": [],
    "moe_aux_free": ["--use_moe", "1", "--moe_balance", "aux_free"],
    "moe_aux_loss": ["--use_moe", "1", "--moe_balance", "aux_loss"],
    "moe_no_balance": ["--use_moe", "1", "--moe_balance", "none"],
    "mla": ["--use_mla", "1"],
}


def final_metrics(log_path: str) -> dict:
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/val_loss" in r]
    loads = [r["moe/max_mean_load"] for r in train if "moe/max_mean_load" in r]
    speeds = [r["tokens_per_sec"] for r in train[1:]] or [train[-1]["tokens_per_sec"]]
    tail = loads[-max(1, len(loads) // 4):]  # one logged batch is noisy: also the mean over the last quarter
    return {"val_loss": evals[-1]["eval/val_loss"], "max_mean_load": loads[-1] if loads else None,
            "max_mean_load_first": loads[0] if loads else None,
            "max_mean_load_tail": sum(tail) / len(tail) if loads else None, "tokens_per_sec": sum(speeds) / len(speeds)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save_dir", default="out/arch", help="where the runs write")
    parser.add_argument("--preset", default="tiny", help="model size for every variant")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list from {list(VARIANTS)}")
    parser.add_argument("--extra", default="", help="more train_pretrain.py flags for every run, quoted")
    args = parser.parse_args()
    results = {}
    for name in args.variants.split(","):
        command = [sys.executable, "train_pretrain.py", "--save_dir", args.save_dir, "--save_weight", f"arch_{name}",
                   "--preset", args.preset, "--max_steps", str(args.steps), "--eval_interval", "0",
                   "--sample_tokens", "0", "--log_interval", str(max(1, args.steps // 20)), *VARIANTS[name],
                   *shlex.split(args.extra)]
        print("===", " ".join(command), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
        results[name] = final_metrics(os.path.join(ROOT, args.save_dir, "logs", f"arch_{name}.jsonl"))
    print(f"\n{args.steps} steps, preset {args.preset}")
    print("| variant | held-out loss | max/mean expert load (first log -> last) | last-quarter mean | tokens/s |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        load = f"{r['max_mean_load_first']:.2f} -> {r['max_mean_load']:.2f}" if r["max_mean_load"] else "-"
        tail = f"{r['max_mean_load_tail']:.2f}" if r["max_mean_load"] else "-"
        print(f"| {name} | {r['val_loss']:.4f} | {load} | {tail} | {r['tokens_per_sec']:,.0f} |")
    with open(os.path.join(ROOT, args.save_dir, "architectures.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
