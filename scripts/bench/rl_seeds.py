"""GRPO's held-out curve over several seeds: is the reward really rising, or is it seed noise?

    python -m scripts.bench.grpo_seeds                                   # 3 seeds from out/reason_256.pth, CPU demo
    python -m scripts.bench.grpo_seeds --seeds 1 2 3 4 5 --extra "--max_steps 100 --num_generations 16"
    python -m scripts.bench.grpo_seeds --eval_interval 25 --extra "--max_steps 100 --max_gen_len 64"  # the pipeline's

Each seed is an ordinary `train_grpo.py` run (same starting checkpoint, different sampling/data-order seed) in
--save_dir with --save_weight grpo_seed<N>, so its log lands in <save_dir>/logs/. The script prints the held-out
reward and accuracy (greedy answers to dataset/demo_grpo_val.jsonl) at every evaluation, mean and spread over the
seeds, and draws the curve to <save_dir>/grpo_seeds.png.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
METRICS = ("reward", "accuracy")


def eval_curve(log_path: str) -> dict:
    """step -> {metric: value} from the eval records of one run's log."""
    curve = {}
    with open(log_path) as f:
        for line in f:
            record = json.loads(line)
            if any(key.startswith("eval/") for key in record):
                curve[record["step"]] = {m: record[f"eval/{m}"] for m in METRICS if f"eval/{m}" in record}
    return curve


def summarize(curves: dict) -> list:
    """Rows (step, {metric: (mean, std, min, max)}) over the steps every seed evaluated."""
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    rows = []
    for step in steps:
        stats = {}
        for metric in METRICS:
            values = [c[step][metric] for c in curves.values() if metric in c[step]]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                stats[metric] = (statistics.mean(values), spread, min(values), max(values))
        rows.append((step, stats))
    return rows


def plot(rows: list, curves: dict, path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.4))
    steps = [step for step, _ in rows]
    for ax, metric in zip(axes, METRICS):
        for seed, curve in curves.items():
            ax.plot(steps, [curve[s].get(metric) for s in steps], color="0.75", linewidth=1, label=f"seed {seed}")
        means = [stats[metric][0] for _, stats in rows]
        ax.plot(steps, means, color="C0", linewidth=2.2, marker="o", label="mean")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"held-out {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one train_grpo.py run per seed")
    parser.add_argument("--from_weight", default="out/reason_256.pth", help="the starting checkpoint of every run")
    parser.add_argument("--save_dir", default="out/grpo_seeds", help="where the runs, their logs and the plot go")
    parser.add_argument("--eval_interval", type=int, default=10, help="held-out evaluation every N steps")
    parser.add_argument("--extra", default="", help="more train_grpo.py flags for every run, quoted")
    parser.add_argument("--skip_existing", action="store_true", help="reuse a seed's log if its run finished")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(ROOT, args.from_weight)):
        raise SystemExit(f"error: {args.from_weight} not found (run the pipeline up to the reason stage first)")
    curves = {}
    for seed in args.seeds:
        name = f"grpo_seed{seed}"
        log_path = os.path.join(ROOT, args.save_dir, "logs", f"{name}.jsonl")
        finished = os.path.exists(os.path.join(ROOT, args.save_dir, "summaries", f"{name}.json"))
        if not (args.skip_existing and finished):
            if os.path.exists(log_path):
                os.remove(log_path)  # a fresh run: its curve must not be mixed with an older one's
            command = [sys.executable, "train_grpo.py", "--save_dir", args.save_dir, "--save_weight", name,
                       "--from_weight", args.from_weight, "--seed", str(seed), "--eval_interval",
                       str(args.eval_interval), "--show_completions", "0", *shlex.split(args.extra)]
            print("===", " ".join(shlex.quote(c) for c in command), flush=True)
            subprocess.run(command, cwd=ROOT, check=True)
        curves[seed] = eval_curve(log_path)
    rows = summarize(curves)
    print(f"\nheld-out, greedy, {len(curves)} seeds: mean ± std (min .. max)")
    print("| step | " + " | ".join(METRICS) + " |")
    print("|---|" + "---|" * len(METRICS))
    for step, stats in rows:
        cells = [f"{m:.3f} ± {s:.3f} ({lo:.3f} .. {hi:.3f})" for m, s, lo, hi in (stats[k] for k in METRICS)]
        print(f"| {step} | " + " | ".join(cells) + " |")
    first, last = rows[0][1], rows[-1][1]
    for metric in METRICS:
        gains = [curves[s][rows[-1][0]][metric] - curves[s][rows[0][0]][metric] for s in curves]
        print(f"{metric}: {first[metric][0]:.3f} -> {last[metric][0]:.3f}; gain per seed "
              f"{', '.join(f'{g:+.3f}' for g in gains)} (smallest gain {min(gains):+.3f}, "
              f"spread of the final value across seeds {last[metric][1]:.3f})")
    if first["accuracy"][0] > 0:  # issue 20's bar: the mean final accuracy at least twice a base of >= 15%
        print(f"accuracy after / base: {last['accuracy'][0] / first['accuracy'][0]:.2f}x "
              f"(base {first['accuracy'][0]:.3f}, final {last['accuracy'][0]:.3f} ± {last['accuracy'][1]:.3f})")
    image = os.path.join(ROOT, args.save_dir, "grpo_seeds.png")
    plot(rows, curves, image, f"GRPO, {len(curves)} seeds, from {os.path.basename(args.from_weight)} "
                              f"{args.extra}".strip())
    print(f"curve -> {image}")


if __name__ == "__main__":
    main()
