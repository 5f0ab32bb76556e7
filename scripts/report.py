"""Turn a run's logs into a report card: out/report.md with loss curves (PNG), per-stage wall time and throughput,
the held-out numbers each stage measured (before -> after), sample answers, and the environment.

    python -m scripts.report                 # reads out/logs/*.jsonl and out/summaries/*.json
    python -m scripts.report --save_dir /tmp/run/out

Every training script appends one JSON object per log step to <save_dir>/logs/<stage>.jsonl and writes its
headline numbers to <save_dir>/summaries/<stage>.json; keys ending in _before/_after are paired in the table.
"""
import argparse
import glob
import json
import os
import platform
import subprocess
import sys

STAGE_ORDER = ["pretrain", "full_sft", "lora_identity", "dpo", "teacher_pretrain", "teacher_sft", "distill",
               "reason", "grpo"]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stage_sort_key(name):
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def curve_series(records, keep_eval) -> tuple[list, dict, list]:
    """(train loss points, {eval/<metric>: points} for the keys keep_eval accepts, rollout reward points)."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    reward = [(r["step"], r["reward"]) for r in records if "reward" in r and "step" in r]
    evals = {}
    for r in records:
        for key, value in r.items():
            if key.startswith("eval/") and isinstance(value, (int, float)) and keep_eval(key):
                evals.setdefault(key, []).append((r["step"], value))
    return train, evals, reward


def plot_curves(name, records, image_dir):
    """One PNG per stage: training loss (and any eval/* series) against optimizer steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train, evals, reward = curve_series(records, lambda key: "ppl" not in key)
    if not train and not evals and not reward:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    for key, points in evals.items():
        ax.plot(*zip(*points), marker="o", markersize=3, label=key, linewidth=1.2)
    if reward:
        ax.plot(*zip(*reward), label="reward", linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(image_dir, f"{name}.png")
    fig.savefig(path)
    plt.close(fig)
    return path


# The number each stage is judged by, first match wins (scripts/run_pipeline.py's stages; others use their first).
HEADLINE = {"pretrain": ["val_loss"], "teacher_pretrain": ["val_loss"], "full_sft": ["end_of_turn_rate", "val_loss"],
            "teacher_sft": ["end_of_turn_rate", "val_loss"], "lora_identity": ["keyword_rate", "val_loss"],
            "dpo": ["reward_accuracy", "reward_margin"], "distill": ["kl_to_teacher", "val_loss"],
            "reason": ["well_formed", "val_loss"], "grpo": ["accuracy", "reward"]}


def headline(stage: str, summary: dict):
    """(metric, before, after) for the stage's headline number, or None."""
    paired = [k[:-len("_after")] for k in sorted(summary) if k.endswith("_after") and f"{k[:-6]}_before" in summary]
    preferred = [m for m in HEADLINE.get(stage, []) if m in paired] or paired
    if not preferred:
        return None
    metric = preferred[0]
    return metric, summary[f"{metric}_before"], summary[f"{metric}_after"]


def eval_pairs(records: list) -> dict:
    """<metric>_before/_after from a log's first and last evaluation, for a run that wrote no summary of its own."""
    evals = [r for r in records if any(key.startswith("eval/") for key in r)]
    if len(evals) < 2:
        return {}
    first, last = evals[0], evals[-1]
    return {f"{key[len('eval/'):]}_{when}": record[key] for key in last if key.startswith("eval/") and key in first
            for when, record in (("before", first), ("after", last))}


CARD_SERIES = ("eval/val_loss", "eval/reward", "eval/accuracy", "eval/reward_accuracy", "eval/kl_to_teacher")


def plot_report_card(stages, logs, summaries, pipeline_seconds, path):
    """One picture of the whole run: a panel per stage with its curves and its headline number before -> after."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [s for s in stages if any("loss" in r or "reward" in r for r in logs.get(s, []))]
    if not panels:
        return None
    columns = 3
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.9 * rows), squeeze=False)
    for ax, stage in zip(axes.flat, panels):
        records = logs[stage]
        train, evals, reward = curve_series(records, lambda key: key in CARD_SERIES)
        if train:
            ax.plot(*zip(*train), linewidth=1, label="train loss")
        for key, points in evals.items():
            ax.plot(*zip(*points), marker="o", markersize=3, linewidth=1, label=key[len("eval/"):])
        if reward:
            ax.plot(*zip(*reward), linewidth=1, alpha=0.6, label="rollout reward")
        title = stage
        numbers = headline(stage, summaries.get(stage, {}))
        if numbers:
            title += f"\n{numbers[0]} {numbers[1]:.3g} -> {numbers[2]:.3g}"
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    total = sum(pipeline_seconds.values()) / 60 if pipeline_seconds else None
    env = environment()
    fig.suptitle(f"TinyMind report card: {env['device']}, torch {env['torch']}, commit {env['git commit']}"
                 + (f", pipeline {total:.1f} min" if total else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def environment():
    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "unknown"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {"git commit": commit or "unknown", "torch": torch.__version__, "python": platform.python_version(),
            "device": device, "platform": platform.platform()}


def format_value(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def build_report(save_dir: str) -> str:
    image_dir = os.path.join(save_dir, "report_images")
    os.makedirs(image_dir, exist_ok=True)
    logs = {os.path.basename(p)[:-len(".jsonl")]: read_jsonl(p)
            for p in glob.glob(os.path.join(save_dir, "logs", "*.jsonl"))}
    summaries, samples, pipeline_seconds = {}, {}, {}
    for path in glob.glob(os.path.join(save_dir, "summaries", "*.json")):
        name = os.path.basename(path)[:-len(".json")]
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
        if name == "pipeline":  # wall time of each pipeline stage, written by scripts/run_pipeline.py
            pipeline_seconds = content
        elif name.startswith("samples_"):  # eval_model.py answers to the same prompts, one file per checkpoint
            samples[name[len("samples_"):]] = content.get("samples", {})
        else:
            summaries[name] = content
    stages = sorted(set(logs) | set(summaries), key=stage_sort_key)
    for stage in stages:
        summary = summaries.setdefault(stage, {})
        if not any(key.endswith("_after") for key in summary):
            summary.update(eval_pairs(logs.get(stage, [])))
    lines = ["# TinyMind report card", ""]
    card = plot_report_card(stages, logs, summaries, pipeline_seconds, os.path.join(image_dir, "report_card.png"))
    if card:
        lines += [f"![report card]({os.path.relpath(card, save_dir)})", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in environment().items()] + [""]

    lines += ["## Stages", "", "| stage | steps | wall time | tokens/s (mean) | final train loss |",
              "|---|---|---|---|---|"]
    for stage in stages:
        records = [r for r in logs.get(stage, []) if "loss" in r]
        summary = summaries.get(stage, {})
        seconds = summary.get("seconds") or (records[-1]["elapsed"] if records and "elapsed" in records[-1] else None)
        speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
        steps = summary.get("steps", records[-1]["step"] if records else "-")
        wall = f"{seconds:.0f} s" if seconds else "-"
        speed = f"{sum(speeds) / len(speeds):,.0f}" if speeds else "-"
        final_loss = f"{records[-1]['loss']:.4f}" if records else "-"
        lines.append(f"| {stage} | {steps} | {wall} | {speed} | {final_loss} |")
    lines.append("")
    if pipeline_seconds:
        total = sum(pipeline_seconds.values())
        lines += [f"Pipeline wall time {total / 60:.1f} min: " +
                  ", ".join(f"{k} {v:.0f} s" for k, v in pipeline_seconds.items()), ""]

    lines += ["## Held-out results (before -> after)", "", "| stage | metric | before | after |", "|---|---|---|---|"]
    for stage in stages:
        summary = summaries.get(stage, {})
        for key in sorted(summary):
            if key.endswith("_after"):
                metric = key[:-len("_after")]
                before = summary.get(f"{metric}_before")
                lines.append(f"| {stage} | {metric} | {format_value(before) if before is not None else '-'} | "
                             f"{format_value(summary[key])} |")
    lines.append("")

    lines += ["## Curves", ""]
    for stage in stages:
        image = plot_curves(stage, logs.get(stage, []), image_dir)
        if image:
            lines.append(f"![{stage}]({os.path.relpath(image, save_dir)})")
    lines.append("")

    sample_lines = []
    for stage in stages:
        samples.setdefault(stage, summaries.get(stage, {}).get("samples") or {})
    for stage in sorted(samples, key=stage_sort_key):
        for prompt, answer in samples[stage].items():
            sample_lines.append(f"| {stage} | {prompt.strip()[:80]} | {str(answer).strip()[:160]} |".replace("\n", " "))
    if sample_lines:
        lines += ["## Samples", "", "| stage | prompt | answer |", "|---|---|---|"] + sample_lines + [""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save_dir", default="out", help="the run's output directory (holds logs/ and summaries/)")
    parser.add_argument("--output", default=None, help="report path (default: <save_dir>/report.md)")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.save_dir, "logs")):
        sys.exit(f"no logs in {args.save_dir}/logs: run a training stage first")
    text = build_report(args.save_dir)
    output = args.output or os.path.join(args.save_dir, "report.md")
    with open(output, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"report -> {output}")
    return output


if __name__ == "__main__":
    main()
