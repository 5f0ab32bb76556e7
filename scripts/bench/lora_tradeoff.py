"""LoRA's trade-off on the demo: how much of the identity it learns against how much general chat it forgets.

    python -m scripts.bench.lora_tradeoff --save_dir out                  # the grid below, from out/full_sft_256.pth
    python -m scripts.bench.lora_tradeoff --save_dir out --only replay0.5 no_replay
    python -m scripts.bench.lora_tradeoff --save_dir out --plot_only      # redraw from <save_dir>/lora_tradeoff.json
    python -m scripts.bench.lora_tradeoff --save_dir out --only replay0.5 --seeds 1 2 3   # mean and spread of 3

Each point is an ordinary `train_lora.py` run (printed before it runs) from the same SFT checkpoint, with its own
--lora_name/--save_weight lora_<point> (lora_<point>_s<seed> with --seeds), so its log and summary land in
<save_dir>/logs and <save_dir>/summaries. From each run's summary it reads the held-out numbers train_lora measures
before and after training: the rise of the general held-out loss (dataset/demo_sft_val.jsonl) in percent of the
base's, and the share of greedy replies to held-out identity questions (dataset/demo_lora_identity_val.jsonl, worded
unlike any training question) that name "TinyMind". It prints one row per point (with --seeds: mean ± std and each
seed's value) and draws the trade-off, keyword rate against general loss change, to <save_dir>/lora_tradeoff.png
(results in <save_dir>/lora_tradeoff.json; runs already there are not rerun).
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

# point -> train_lora.py flags on top of its defaults. Epochs are chosen so that every point trains about 200 steps
# (1.5 min on 2 quiet cores): with packing, --replay_ratio r makes (1 - r) of each 512-token row the identity chats'.
GRID = {
    "no_replay": ["--replay_data_path", "none", "--epochs", "8"],
    "replay0.3": ["--replay_ratio", "0.3", "--epochs", "8"],
    "replay0.5": ["--replay_ratio", "0.5", "--epochs", "5"],
    "replay0.7": ["--replay_ratio", "0.7", "--epochs", "3"],
    "replay0.7_8ep": ["--replay_ratio", "0.7", "--epochs", "8"],
    "replay0.5_8ep": ["--replay_ratio", "0.5", "--epochs", "8"],
    "replay0.5_12ep": ["--replay_ratio", "0.5", "--epochs", "12"],
    "replay0.5_lr2e-3": ["--replay_ratio", "0.5", "--epochs", "5", "--learning_rate", "2e-3"],
    "replay0.5_attn": ["--replay_ratio", "0.5", "--epochs", "5", "--lora_targets", "q_proj,k_proj,v_proj,o_proj"],
    "replay0.5_r16": ["--replay_ratio", "0.5", "--epochs", "5", "--lora_r", "16", "--lora_alpha", "32"],
    "replay0.5_r16_8ep": ["--replay_ratio", "0.5", "--epochs", "8", "--lora_r", "16", "--lora_alpha", "32"],
    "replay0.7_5ep": ["--replay_ratio", "0.7", "--epochs", "5"],
    "replay0.5_8ep_drop0.1": ["--replay_ratio", "0.5", "--epochs", "8", "--lora_dropout", "0.1"],
    "replay0.5_10ep_drop0.1": ["--replay_ratio", "0.5", "--epochs", "10", "--lora_dropout", "0.1"],
    "replay0.5_r16_8ep_drop0.1": ["--replay_ratio", "0.5", "--epochs", "8", "--lora_r", "16", "--lora_alpha", "32",
                                  "--lora_dropout", "0.1"],
}
TARGET_RISE_PCT, TARGET_RATE = 2.0, 0.95  # issue 20: general loss up at most 2%, identity keyword rate >= 95%


def run_key(point: str, seed: int | None) -> str:
    return point if seed is None else f"{point}_s{seed}"


def command(point: str, flags: list, args, seed: int | None = None) -> list:
    name = f"lora_{run_key(point, seed)}"
    flags = flags + ([] if seed is None else ["--seed", str(seed)])
    return [sys.executable, "train_lora.py", "--save_dir", args.save_dir, "--hidden_size", str(args.hidden_size),
            "--lora_name", name, "--save_weight", name, *flags, *shlex.split(args.extra)]


def run_point(point: str, flags: list, args, seed: int | None = None) -> dict:
    cmd = command(point, flags, args, seed)
    key = run_key(point, seed)
    print(f"\n=== [{key}] {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.time() - start
    with open(os.path.join(args.save_dir, "summaries", f"lora_{key}.json"), encoding="utf-8") as f:
        summary = json.load(f)
    before, after = summary["general_val_loss_before"], summary["general_val_loss_after"]
    return {"key": key, "point": point, "seed": seed, "flags": flags,
            "command": " ".join(shlex.quote(c) for c in cmd[1:]), "wall_s": wall, "steps": summary.get("steps"),
            "general_before": before, "general_after": after, "general_change_pct": 100 * (after - before) / before,
            "keyword_before": summary.get("keyword_rate_before"), "keyword_after": summary.get("keyword_rate_after"),
            "identity_before": summary["val_loss_before"], "identity_after": summary["val_loss_after"]}


def by_point(results: list) -> dict:
    """point -> its runs (one per seed), in the order the points first appear."""
    groups = {}
    for r in results:
        groups.setdefault(r["point"], []).append(r)
    return groups


def spread(values: list, scale: float = 1.0, fmt: str = ".0f") -> str:
    """'mean' for one run, 'mean ± std (a, b, c)' for several."""
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    listed = ", ".join(f"{v:{fmt}}" for v in values)
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt.lstrip('+')}} ({listed})"


def table(results: list) -> str:
    lines = ["| point | flags | seeds | steps | wall s | identity loss | keyword rate % | general loss change % | "
             "target |", "|---|---|---|---|---|---|---|---|---|"]
    for point, runs in by_point(results).items():
        first = runs[0]
        rates, changes = [r["keyword_after"] or 0 for r in runs], [r["general_change_pct"] for r in runs]
        hit = statistics.mean(changes) <= TARGET_RISE_PCT and statistics.mean(rates) >= TARGET_RATE
        seeds = ", ".join(str(r["seed"]) for r in runs) if first.get("seed") is not None else "default"
        lines.append(f"| {point} | `{' '.join(first['flags']) or '(defaults)'}` | {seeds} | {first['steps']} | "
                     f"{statistics.mean(r['wall_s'] for r in runs):.0f} | "
                     f"{first['identity_before']:.2f} -> {spread([r['identity_after'] for r in runs], fmt='.2f')} | "
                     f"{100 * first['keyword_before']:.0f} -> {spread(rates, 100)} | {spread(changes, fmt='+.1f')} | "
                     f"{'yes' if hit else 'no'} |")
    return "\n".join(lines)


def plot(results: list, path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [r["general_change_pct"] for r in results]
    groups = by_point(results)
    ax.axvspan(min(min(xs), 0) - 1, TARGET_RISE_PCT, ymin=0, ymax=1, color="0.93", zorder=0)
    ax.axvline(TARGET_RISE_PCT, color="0.5", linestyle="--", linewidth=1)
    ax.axhline(100 * TARGET_RATE, color="0.5", linestyle="--", linewidth=1)
    for point, runs in groups.items():  # one dot per point; with seeds, their mean and +-1 std bars
        change = [r["general_change_pct"] for r in runs]
        rate = [100 * (r["keyword_after"] or 0) for r in runs]
        x, y = statistics.mean(change), statistics.mean(rate)
        if len(runs) > 1:
            ax.errorbar(x, y, xerr=statistics.stdev(change), yerr=statistics.stdev(rate), color="C0", zorder=3,
                        fmt="o", capsize=3, linewidth=1)
        else:
            ax.scatter(x, y, color="C0", zorder=3)
        ax.annotate(point, (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xlim(min(min(xs), 0) - 1, max(max(xs), TARGET_RISE_PCT) + 2)
    ax.set_xlabel("general held-out loss change (% of the SFT model's)")
    ax.set_ylabel('held-out identity replies naming "TinyMind" (%)')
    ax.set_ylim(-3, 103)
    ax.set_title(title, fontsize=10)
    ax.text(0.01, 0.02, "target: left of the dashed line, above the other", transform=ax.transAxes, fontsize=8,
            color="0.4")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save_dir", default="out", help="holds full_sft_<hidden>.pth; runs write here")
    parser.add_argument("--hidden_size", type=int, default=256, help="width of the SFT checkpoint (tiny: 256)")
    parser.add_argument("--only", nargs="*", default=None, help=f"run only these points of the grid: {list(GRID)}")
    parser.add_argument("--extra", default="", help="flags added to every run, e.g. \"--max_steps 50\"")
    parser.add_argument("--seeds", type=int, nargs="*", default=None,
                        help="run every point once per seed (--seed of train_lora.py); the table and figure show "
                             "the mean and spread (default: one run with train_lora.py's own seed)")
    parser.add_argument("--rerun", action="store_true", help="rerun points already in lora_tradeoff.json")
    parser.add_argument("--plot_only", action="store_true", help="no runs: print and draw lora_tradeoff.json")
    parser.add_argument("--plot", default=None, help="where to draw the figure (default <save_dir>/lora_tradeoff.png)")
    parser.add_argument("--title", default="LoRA identity adapter on the demo: learning vs forgetting",
                        help="the figure's title")
    args = parser.parse_args(argv)
    unknown = set(args.only or ()) - set(GRID)
    if unknown:
        parser.error(f"unknown points {sorted(unknown)}; the grid has {list(GRID)}")
    results_file = os.path.join(args.save_dir, "lora_tradeoff.json")
    results = {}
    if os.path.exists(results_file):
        with open(results_file, encoding="utf-8") as f:
            results = {r.get("key", r["point"]): r for r in json.load(f)}
    if not args.plot_only:
        for point in args.only or GRID:
            for seed in args.seeds or [None]:
                key = run_key(point, seed)
                if key in results and not args.rerun:
                    print(f"[{key}] already measured ({results_file}); --rerun to measure again")
                    continue
                results[key] = run_point(point, GRID[point], args, seed)
                with open(results_file, "w", encoding="utf-8") as f:
                    json.dump(list(results.values()), f, indent=2)
    order = {point: i for i, point in enumerate(GRID)}
    rows = sorted(results.values(), key=lambda r: order.get(r["point"], len(order)))
    if not rows:
        raise SystemExit(f"no results in {results_file}")
    print("\n" + table(rows))
    figure = args.plot or os.path.join(args.save_dir, "lora_tradeoff.png")
    plot(rows, figure, args.title)
    print(f"\nfigure -> {figure}; results -> {results_file}")


if __name__ == "__main__":
    main()
