"""An RL stage's held-out curve over several seeds: is the reward really rising, or is it seed noise?

    python -m scripts.bench.rl_seeds                                     # GRPO, 3 seeds from out/reason_256.pth
    python -m scripts.bench.rl_seeds --seeds 1 2 3 4 5 --extra "--max_steps 100 --num_generations 16"
    python -m scripts.bench.rl_seeds --eval_interval 25 --extra "--max_steps 100 --max_gen_len 64"  # the pipeline's
    python -m scripts.bench.rl_seeds --stage ppo --from_weight out/full_sft_256.pth \
        --extra "--reward_model out/reward_256.pth --max_steps 64"     # PPO against the demo's reward model
    python -m scripts.bench.rl_seeds --stage agent --from_weight out/agent_sft_256.pth --extra "--max_steps 30"

Each seed is an ordinary `train_<stage>.py` run (same starting checkpoint, different sampling/data-order seed) in
--save_dir with --save_weight <stage>_seed<N>, so its log lands in <save_dir>/logs/. The script prints the stage's
held-out metrics (GRPO: reward and accuracy of greedy answers to dataset/demo_grpo_val.jsonl; PPO: reward-model
score and KL to the reference; agent: task success, well-formed calls, correct arguments) at every evaluation,
mean and spread over the seeds, and draws the curve to <save_dir>/<stage>_seeds.png.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
STAGES = {  # stage: (script, held-out metrics its eval records carry, the usual starting checkpoint)
    "grpo": ("train_grpo.py", ("reward", "accuracy"), "out/reason_256.pth"),
    "ppo": ("train_ppo.py", ("score", "kl"), "out/full_sft_256.pth"),
    "agent": ("train_agent.py", ("success", "well_formed", "args_correct"), "out/agent_sft_256.pth"),
}
QUIET = {"grpo": ["--show_completions", "0"], "ppo": ["--show_completions", "0"],  # no samples printed at the end
         "agent": ["--show_episodes", "0"]}


def eval_curve(log_path: str, metrics: tuple) -> dict:
    """step -> {metric: value} from the eval records of one run's log."""
    curve = {}
    with open(log_path) as f:
        for line in f:
            record = json.loads(line)
            if any(key.startswith("eval/") for key in record):
                curve[record["step"]] = {m: record[f"eval/{m}"] for m in metrics if f"eval/{m}" in record}
    return curve


def summarize(curves: dict, metrics: tuple) -> list:
    """Rows (step, {metric: (mean, std, min, max)}) over the steps every seed evaluated."""
    steps = sorted(set.intersection(*(set(c) for c in curves.values())))
    rows = []
    for step in steps:
        stats = {}
        for metric in metrics:
            values = [c[step][metric] for c in curves.values() if metric in c[step]]
            if values:
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                stats[metric] = (statistics.mean(values), spread, min(values), max(values))
        rows.append((step, stats))
    return rows


def plot(rows: list, curves: dict, path: str, title: str, metrics: tuple):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.4))
    steps = [step for step, _ in rows]
    for ax, metric in zip(axes, metrics):
        for seed, curve in curves.items():
            ax.plot(steps, [curve[s].get(metric) for s in steps], color="0.75", linewidth=1, label=f"seed {seed}")
        means = [stats[metric][0] for _, stats in rows]
        ax.plot(steps, means, color="C0", linewidth=2.2, marker="o", label="mean")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"held-out {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 140)), fontsize=9)  # a long --extra would run off the figure
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="grpo", choices=sorted(STAGES), help="which RL script to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one training run per seed")
    parser.add_argument("--from_weight", default=None,
                        help="the starting checkpoint of every run (default: " +
                             ", ".join(f"{k} {v[2]}" for k, v in STAGES.items()) + ")")
    parser.add_argument("--save_dir", default=None, help="where the runs, their logs and the plot go "
                                                         "(default: out/<stage>_seeds)")
    parser.add_argument("--eval_interval", type=int, default=10, help="held-out evaluation every N steps")
    parser.add_argument("--extra", default="", help="more flags of the stage's script for every run, quoted")
    parser.add_argument("--skip_existing", action="store_true", help="reuse a seed's log if its run finished")
    args = parser.parse_args()
    script, metrics, default_weight = STAGES[args.stage]
    args.from_weight = args.from_weight or default_weight
    args.save_dir = args.save_dir or f"out/{args.stage}_seeds"
    if not os.path.exists(os.path.join(ROOT, args.from_weight)):
        raise SystemExit(f"error: {args.from_weight} not found (run the pipeline up to the stage before "
                         f"{args.stage} first)")
    curves = {}
    for seed in args.seeds:
        name = f"{args.stage}_seed{seed}"
        log_path = os.path.join(ROOT, args.save_dir, "logs", f"{name}.jsonl")
        finished = os.path.exists(os.path.join(ROOT, args.save_dir, "summaries", f"{name}.json"))
        if not (args.skip_existing and finished):
            if os.path.exists(log_path):
                os.remove(log_path)  # a fresh run: its curve must not be mixed with an older one's
            command = [sys.executable, script, "--save_dir", args.save_dir, "--save_weight", name,
                       "--from_weight", args.from_weight, "--seed", str(seed), "--eval_interval",
                       str(args.eval_interval), *QUIET[args.stage], *shlex.split(args.extra)]
            print("===", " ".join(shlex.quote(c) for c in command), flush=True)
            subprocess.run(command, cwd=ROOT, check=True)
        curves[seed] = eval_curve(log_path, metrics)
    rows = summarize(curves, metrics)
    print(f"\n{args.stage}, held-out, {len(curves)} seeds: mean ± std (min .. max)")
    print("| step | " + " | ".join(metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for step, stats in rows:
        cells = [f"{m:.3f} ± {s:.3f} ({lo:.3f} .. {hi:.3f})" for m, s, lo, hi in (stats[k] for k in metrics)]
        print(f"| {step} | " + " | ".join(cells) + " |")
    first, last = rows[0][1], rows[-1][1]
    for metric in metrics:
        gains = [curves[s][rows[-1][0]][metric] - curves[s][rows[0][0]][metric] for s in curves]
        print(f"{metric}: {first[metric][0]:.3f} -> {last[metric][0]:.3f}; gain per seed "
              f"{', '.join(f'{g:+.3f}' for g in gains)} (smallest gain {min(gains):+.3f}, "
              f"spread of the final value across seeds {last[metric][1]:.3f})")
    if "accuracy" in first and first["accuracy"][0] > 0:  # issue 20: a mean final accuracy >= 2x a base >= 15%
        print(f"accuracy after / base: {last['accuracy'][0] / first['accuracy'][0]:.2f}x "
              f"(base {first['accuracy'][0]:.3f}, final {last['accuracy'][0]:.3f} ± {last['accuracy'][1]:.3f})")
    image = os.path.join(ROOT, args.save_dir, f"{args.stage}_seeds.png")
    plot(rows, curves, image, f"{args.stage.upper()}, {len(curves)} seeds, from {os.path.basename(args.from_weight)} "
                              f"{args.extra}".strip(), metrics)
    print(f"curve -> {image}")


if __name__ == "__main__":
    main()
