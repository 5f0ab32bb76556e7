"""Turn a run's logs into a report card: out/report.md with loss curves (PNG), per-stage wall time and throughput,
the held-out numbers each stage measured (before -> after), sample answers, and the machine and its load.

    python -m scripts.report                 # reads out/logs/*.jsonl and out/summaries/*.json
    python -m scripts.report --save_dir /tmp/run/out

Every training script appends one JSON object per log step to <save_dir>/logs/<stage>.jsonl and writes its
headline numbers to <save_dir>/summaries/<stage>.json; keys ending in _before/_after are paired in the table.
scripts/run_pipeline.py adds summaries/pipeline.json (wall time per stage) and summaries/machine.json (per run: CPU,
cores, GPUs, torch, dtype, load average at start and end); run on its own, the report names its own machine.
"""
import argparse
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import sys

STAGE_ORDER = ["pretrain", "full_sft", "lora_identity", "dpo", "teacher_pretrain", "teacher_sft", "distill",
               "distill_ce", "reason", "grpo"]
SEED_RUN = re.compile(r"(?P<stage>.+)_seed\d+")  # a stage rerun with another seed (scripts/run_pipeline.py)
BY_TYPE = "by_type/"  # DPO's held-out metrics per rejection type (by_type/<type>/<metric>): a table of their own


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def rerun_of(name: str, stages) -> str | None:
    """The stage `name` reruns with another seed (<stage>_seed<N>), when that stage is among `stages`; else None."""
    run = SEED_RUN.fullmatch(name)
    return run["stage"] if run and run["stage"] in stages else None


def stage_sort_key(name):
    """STAGE_ORDER's order, a seed rerun right after its stage, any other stage after them by name."""
    run = SEED_RUN.fullmatch(name)
    stage = run["stage"] if run else name
    return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), name)


# What each series measures, first match on its name wins: one axis per kind, so that a 0-60 token count or a -6 nat
# summed log-prob margin never shares an axis with 0-1 rewards or sub-nat losses and flattens them.
UNITS = [(("length", "tokens"), "tokens"),
         (("logp_margin",), "log-prob margin (nats)"),
         (("margin",), "per-token / reward margin"),
         (("kl",), "KL (nats per token)"),
         (("loss",), "loss"),
         (("reward", "accuracy", "rate", "well_formed", "correct"), "fraction")]


def unit_of(name: str) -> str:
    """The axis label a series goes on; a series of unknown kind gets an axis of its own."""
    for needles, label in UNITS:
        if any(needle in name for needle in needles):
            return label
    return name


ENDS_ONLY = "(start, end)"  # a held-out metric measured before and after training only: drawn dashed


def curve_series(records, keep_eval, summary=None) -> dict:
    """{label: [(step, value), ...]}: the training loss and rollout reward from the log, then each held-out metric.

    Stages that measure their held-out numbers outside the training loop (SFT, LoRA: before training and at the end)
    log no step-0 evaluation; their summary's <metric>_before becomes the step-0 point, and a metric only the summary
    holds is drawn from its before (step 0) to its after (last step)."""
    series = {}
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    reward = [(r["step"], r["reward"]) for r in records if "reward" in r and "step" in r]
    if train:
        series["train loss"] = train
    if reward:
        series["rollout reward"] = reward
    evals = {}
    for r in records:
        for key, value in r.items():
            if key.startswith("eval/") and isinstance(value, (int, float)) and keep_eval(key):
                evals.setdefault(key[len("eval/"):], []).append((r["step"], value))
    summary, ends_only = summary or {}, {}
    last_step = summary.get("steps") or max((r["step"] for r in records if "step" in r), default=0)
    for key in sorted(k for k in summary if k.endswith("_before")):
        metric = key[:-len("_before")]
        before, after = summary[key], summary.get(f"{metric}_after")
        if not keep_eval(f"eval/{metric}") or not is_number(before):
            continue
        if metric in evals:
            if evals[metric][0][0] > 0:
                evals[metric].insert(0, (0, before))
        elif is_number(after) and last_step:
            ends_only[metric] = [(0, before), (last_step, after)]
    for metric, points in evals.items():
        series[f"held-out {metric}"] = points
    for metric, points in ends_only.items():
        series[f"held-out {metric} {ENDS_ONLY}"] = points
    return series


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def by_unit(series: dict) -> dict:
    """{axis label: {series label: points}}, in the order the units first appear."""
    groups = {}
    for label, points in series.items():
        groups.setdefault(unit_of(label), {})[label] = points
    return groups


def draw(ax, series: dict, linewidth=1.2):
    for label, points in series.items():
        held_out = label.startswith("held-out")
        ax.plot(*zip(*points), label=label, linewidth=linewidth, marker="o" if held_out else None, markersize=3,
                alpha=0.6 if label == "rollout reward" else 1.0, linestyle="--" if label.endswith(ENDS_ONLY) else "-")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def curves_figure(name, records, summary=None):
    """A stage's figure: a panel per kind of quantity (loss, fraction, tokens, ...) against optimizer steps, or
    None when the log has nothing to draw."""
    plt = pyplot()
    groups = by_unit(curve_series(records, lambda key: "ppl" not in key and BY_TYPE not in key, summary))
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 1, figsize=(6, 1.2 + 2.0 * len(groups)), dpi=110, sharex=True,
                             squeeze=False)
    for ax, (unit, series) in zip(axes[:, 0], groups.items()):
        draw(ax, series)
        ax.set_ylabel(unit, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_title(name)
    axes[-1, 0].set_xlabel("optimizer step")  # the panels share the x axis
    fig.tight_layout()
    return fig


def plot_curves(name, records, image_dir, summary=None):
    """One PNG per stage (curves_figure), or None."""
    fig = curves_figure(name, records, summary)
    if fig is None:
        return None
    path = os.path.join(image_dir, f"{name}.png")
    fig.savefig(path)
    pyplot().close(fig)
    return path


# The number each stage is judged by, first match wins (scripts/run_pipeline.py's stages; others use their first).
HEADLINE = {"pretrain": ["val_loss"], "teacher_pretrain": ["val_loss"], "full_sft": ["end_of_turn_rate", "val_loss"],
            "teacher_sft": ["end_of_turn_rate", "val_loss"], "lora_identity": ["keyword_rate", "val_loss"],
            "dpo": ["reward_accuracy", "reward_margin"], "distill": ["kl_to_teacher", "val_loss"],
            "distill_ce": ["val_loss", "kl_to_teacher"],
            "reason": ["well_formed", "val_loss"], "grpo": ["accuracy", "reward"], "reward": ["accuracy", "loss"],
            "ppo": ["score", "kl"], "agent_sft": ["val_loss"], "agent": ["success", "args_correct"]}


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


def side_by_side(runs: list) -> bool:
    """Whether some pipeline run ran stages at once (--jobs > 1), so that their wall times overlap."""
    return any(run.get("jobs", 1) > 1 for run in runs)


def standing_runs(runs: list) -> list:
    """The runs whose work still stands: a run every stage of which a later run redid (`--force`) is left out."""
    return [run for i, run in enumerate(runs)
            if not run.get("stages") or not set(run["stages"]) <= {s for later in runs[i + 1:]
                                                                  for s in later.get("stages", [])}]


def pipeline_minutes(pipeline_seconds: dict, runs: list) -> float | None:
    """The pipeline's wall time. Stages that ran one after another add up; under --jobs they overlapped, so the
    runs' own wall times (summaries/machine.json) are the total instead, less the runs later ones redid."""
    if side_by_side(runs):
        return sum(run.get("wall_seconds", 0.0) for run in standing_runs(runs)) / 60
    return sum(pipeline_seconds.values()) / 60 if pipeline_seconds else None


def plot_report_card(stages, logs, summaries, pipeline_seconds, path, runs=None):
    """The report card as a PNG (report_card_figure), or None."""
    fig = report_card_figure(stages, logs, summaries, pipeline_seconds, runs)
    if fig is None:
        return None
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def report_card_figure(stages, logs, summaries, pipeline_seconds, runs=None):
    """One picture of the whole run: a panel per stage with its curves and its headline number before -> after.
    Losses are read on the left axis, fractions (rewards, accuracies) or the KL on the right one."""
    plt = pyplot()
    panels = [s for s in stages if any("loss" in r or "reward" in r for r in logs.get(s, []))
              and not rerun_of(s, stages)]  # seed reruns: in the seeds table
    if not panels:
        return None
    columns = 3
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.1 * rows), squeeze=False)
    for ax, stage in zip(axes.flat, panels):
        groups = by_unit(curve_series(logs[stage], lambda key: key in CARD_SERIES, summaries.get(stage)))
        handles = []
        # the first kind (the training loss) on the left axis; rewards or the KL to the teacher on the right one
        # (CARD_SERIES keeps each stage to two kinds; a third would share the right axis rather than be dropped)
        kinds = list(groups.items())
        axis_groups = [(ax, kinds[:1])] + ([(ax.twinx(), kinds[1:])] if len(kinds) > 1 else [])
        for axis, members in axis_groups:
            if axis is not ax:  # go on with the left axis's colours, not from its first again
                axis.set_prop_cycle(color=plt.rcParams["axes.prop_cycle"].by_key()["color"][len(handles):])
            for _, series in members:
                draw(axis, series, linewidth=1)
            axis.set_ylabel(" / ".join(unit for unit, _ in members), fontsize=7)
            axis.tick_params(labelsize=7)
            handles += axis.get_legend_handles_labels()[0]
        title = stage
        numbers = headline(stage, summaries.get(stage, {}))
        if numbers:
            title += f"\n{numbers[0]} {numbers[1]:.3g} -> {numbers[2]:.3g}"
            afters = [numbers[2]] + [n[2] for name, summary in summaries.items()
                                     if rerun_of(name, [stage]) and (n := headline(stage, summary))
                                     and n[0] == numbers[0]]
            if len(afters) > 1:
                title += f" ({len(afters)} seeds: {statistics.mean(afters):.3g} ± {statistics.stdev(afters):.2g})"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    total = pipeline_minutes(pipeline_seconds, runs or [])
    fig.suptitle("TinyMind report card: " + machine_line(runs) + (f", pipeline {total:.1f} min" if total else ""),
                 fontsize=10)
    fig.tight_layout()
    return fig


def cpu_model() -> str:
    # model/device.py's cpu_model_name does the same; importing it would load torch into a script that draws plots
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(dtype: str | None = None) -> dict:
    """The machine this process runs on: what makes numbers differ between two runs of the same commit. Imports no
    torch, so the pipeline's parent process, which calls it, stays light while the stages run."""
    from importlib import metadata
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        gpus = []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"git commit": git_commit(), "cpu": cpu_model(), "cores": cores, "gpus": [g for g in gpus if g.strip()],
            "torch": torch_version, "python": platform.python_version(), "platform": platform.platform(),
            "dtype": dtype or "auto"}


def git_commit() -> str:
    """The short commit, with "+changes" when tracked files differ from it: the run's code is then not the commit's."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = commit and git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        commit, changed = "", ""
    return (commit + ("+changes" if changed else "")) or "unknown"


def device_text(run: dict) -> str:
    cpu = f"{run.get('cpu', 'CPU')} ({run.get('cores', '?')} cores)"
    gpus = run.get("gpus") or []
    return f"{len(gpus)} x {gpus[0]}, {cpu}" if gpus else cpu


def dtype_text(dtype) -> str:
    if dtype in (None, "auto"):  # each stage measures bf16 against fp32 at its own shapes (model/device.py)
        return "auto (each stage's choice: bf16 where faster than fp32 here; printed in its first lines)"
    return dtype


def machine_line(runs) -> str:
    """Machine, torch, dtype and commits of the runs, for the card's title."""
    runs = runs or [machine()]
    last = runs[-1]
    commits = ", ".join(dict.fromkeys(r.get("git commit", "unknown") for r in runs))
    dtype = last.get("dtype")
    return (f"{device_text(last)}, torch {last.get('torch')}, " + (f"{dtype}, " if dtype not in (None, "auto") else "")
            + f"commit {commits}")


def load_text(run: dict) -> str:
    """The machine's 1-minute load average before the run and at its end, and the share of its cores the stages
    got: a busy machine makes a run slower (and its wall times incomparable), never its numbers different."""
    start, end = run.get("load_start"), run.get("load_end")
    text = (f"{start[0]:.2f} at start, {end[0]:.2f} at end" if start and end else
            f"{start[0]:.2f} at start" if start else "not recorded")
    wall, cpu, cores = run.get("wall_seconds"), run.get("cpu_seconds"), run.get("cores")
    if wall and cpu is not None and cores:
        text += f"; the stages used {cpu / wall:.2f} of {cores} cores ({100 * cpu / (wall * cores):.0f}%)"
    return text


def machine_lines(runs: list) -> list:
    """The machine table: each pipeline run (stages, commit, CPU, torch, dtype, load), or, for logs that no pipeline
    wrote, the machine the report is written on."""
    if not runs:
        env = machine()
        return ["Machine of this report (no pipeline record in summaries/machine.json):", "", "| | |", "|---|---|",
                f"| device | {device_text(env)} |", f"| torch | {env['torch']} |", f"| python | {env['python']} |",
                f"| platform | {env['platform']} |", f"| git commit | {env['git commit']} |", ""]
    lines = ["| run | stages | commit | device | torch | dtype | load average (1 min) |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run.get('started', '-')} | {', '.join(run.get('stages', [])) or '-'} | "
                     f"{run.get('git commit', '-')} | {device_text(run)} | {run.get('torch', '-')} | "
                     f"{dtype_text(run.get('dtype'))} | {load_text(run)} |")
    last = runs[-1]
    lines += ["", f"Python {last.get('python', '-')} on {last.get('platform', '-')}. The same machine, dtype and torch "
              "reproduce every number bit for bit; another CPU or dtype rounds differently, so the numbers differ "
              "while their trends hold (README).", ""]
    return lines


def format_value(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def build_report(save_dir: str) -> str:
    image_dir = os.path.join(save_dir, "report_images")
    os.makedirs(image_dir, exist_ok=True)
    logs = {os.path.basename(p)[:-len(".jsonl")]: read_jsonl(p)
            for p in glob.glob(os.path.join(save_dir, "logs", "*.jsonl"))}
    summaries, samples, pipeline_seconds, runs = {}, {}, {}, []
    for path in glob.glob(os.path.join(save_dir, "summaries", "*.json")):
        name = os.path.basename(path)[:-len(".json")]
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
        if name == "pipeline":  # wall time of each pipeline stage, written by scripts/run_pipeline.py
            pipeline_seconds = content
        elif name == "machine":  # each pipeline run's machine and load, written by scripts/run_pipeline.py
            runs = content.get("runs", [])
        elif name.startswith("samples_"):  # eval_model.py's answers (and references), one file per checkpoint
            samples[name[len("samples_"):]] = sample_rows(content)
        else:
            summaries[name] = content
    stages = sorted(set(logs) | set(summaries), key=stage_sort_key)
    for stage in stages:
        summary = summaries.setdefault(stage, {})
        if not any(key.endswith("_after") for key in summary):
            summary.update(eval_pairs(logs.get(stage, [])))
    lines = ["# TinyMind report card", ""]
    card = plot_report_card(stages, logs, summaries, pipeline_seconds, os.path.join(image_dir, "report_card.png"),
                            runs)
    if card:
        lines += [f"![report card]({os.path.relpath(card, save_dir)})", ""]
    lines += machine_lines(runs)

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
        lines += [f"Pipeline wall time {pipeline_minutes(pipeline_seconds, runs):.1f} min"
                  + (" (stages side by side, --jobs: their times overlap)" if side_by_side(runs) else "") + ": " +
                  ", ".join(f"{k} {v:.0f} s" for k, v in pipeline_seconds.items()), ""]

    lines += ["## Held-out results (before -> after)", "", "| stage | metric | before | after |", "|---|---|---|---|"]
    for stage in stages:
        summary = summaries.get(stage, {})
        for key in sorted(summary):
            if key.endswith("_after") and not key.startswith(BY_TYPE):
                metric = key[:-len("_after")]
                before = summary.get(f"{metric}_before")
                lines.append(f"| {stage} | {metric} | {format_value(before) if before is not None else '-'} | "
                             f"{format_value(summary[key])} |")
    lines.append("")

    lines += ["## Curves", ""]
    for stage in stages:
        image = plot_curves(stage, logs.get(stage, []), image_dir, summaries.get(stage))
        if image:
            lines.append(f"![{stage}]({os.path.relpath(image, save_dir)})")
    lines.append("")

    lines += seed_lines(summaries)
    lines += dpo_by_type_lines(summaries.get("dpo", {}))
    lines += distillation_lines(summaries.get("distill"), summaries.get("distill_ce"))
    for stage in stages:
        if rerun_of(stage, stages):
            continue  # the same prompts as the stage's own run: its samples stand for the seeds
        samples.setdefault(stage, sample_rows({"samples": summaries.get(stage, {}).get("samples") or {}}))
    lines += samples_lines(samples)
    return "\n".join(lines)


def cell(text, limit: int) -> str:
    """A markdown table cell: one line, at most `limit` characters, with | and <tags> (<think>, <answer>) shown
    rather than taken for table syntax or HTML."""
    text = " ".join(str(text).split("\n")).strip()
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def sample_rows(content: dict) -> list[dict]:
    """The rows of a samples file (eval_model.py's .json: "results" with reference and domain where known) or of
    a training summary's {prompt: reply} samples."""
    results = content.get("results")
    if isinstance(results, list) and results:
        return [{"prompt": r.get("prompt", ""), "answer": r.get("answer", ""), "reference": r.get("reference"),
                 "domain": r.get("domain")} for r in results if isinstance(r, dict)]
    return [{"prompt": p, "answer": a, "reference": None, "domain": None}
            for p, a in (content.get("samples") or {}).items()]


def samples_lines(samples: dict) -> list[str]:
    """One table of every stage's sample answers: the prompt, the reference answer from the held-out data, the
    model's answer, and whether the prompt is in the stage's domain (held-out data of its own) or out of it."""
    rows = []
    for stage in sorted(samples, key=stage_sort_key):
        for row in samples[stage]:
            reference = cell(row["reference"], 100) if row.get("reference") is not None else "-"
            rows.append(f"| {stage} | {cell(row['prompt'], 80)} | {reference} | {cell(row['answer'], 160)} | "
                        f"{row.get('domain') or '-'} |")
    if not rows:
        return []
    return ["## Samples", "", "In domain: a held-out prompt from the stage's own data, beside its reference answer. "
            "Out of domain: an open prompt no demo data teaches; a model of a few million parameters trained on "
            "poems, Shakespeare and small sums is not expected to answer it.", "",
            "| stage | prompt | reference | answer | domain |", "|---|---|---|---|---|"] + rows + [""]


def seed_lines(summaries: dict) -> list[str]:
    """Each stage that was rerun with other seeds (<stage>_seed<N>): its headline number before and after every run,
    their mean and spread, and the mean over the start, so that a gain can be told from seed noise."""
    reruns = {}
    for name in summaries:
        if stage := rerun_of(name, summaries):
            reruns.setdefault(stage, []).append(name)
    rows = []
    for stage in sorted(reruns, key=stage_sort_key):
        names = [stage] + sorted(reruns[stage])
        numbers = [headline(stage, summaries[name]) for name in names]
        if any(n is None for n in numbers) or len({n[0] for n in numbers}) > 1:
            continue
        befores, afters = sorted({n[1] for n in numbers}), [n[2] for n in numbers]
        mean, spread = statistics.mean(afters), statistics.stdev(afters)
        before = f"{befores[0]:.4g}" if len(befores) == 1 else f"{befores[0]:.4g} .. {befores[-1]:.4g}"
        ratio = f"{mean / befores[0]:.1f}x" if len(befores) == 1 and befores[0] > 0 else "-"
        rows.append(f"| {stage} | {numbers[0][0]} | {before} | "
                    + ", ".join(f"{a:.4g} ({name})" for a, name in zip(afters, names))
                    + f" | {mean:.4g} ± {spread:.2g} | {min(afters) - max(befores):+.4g} | {ratio} |")
    if not rows:
        return []
    return ["## Seeds", "", "The same stage from the same checkpoint with other seeds (sampling and data order): the "
            "gain stands out from seed noise when the smallest one is well above zero. Before: greedy, so one number "
            "for every run.", "", "| stage | metric | before | after, each run | mean ± sd | smallest gain | "
            "mean / before |", "|---|---|---|---|---|---|---|"] + rows + [""]


def dpo_by_type_lines(summary: dict) -> list[str]:
    """DPO's held-out accuracies per rejection type, before -> after (empty when the pairs carried no type)."""
    names = sorted({key[len(BY_TYPE):].split("/")[0] for key in summary if key.startswith(BY_TYPE)})
    if not names:
        return []

    def pair(name, metric):
        before, after = summary.get(f"{BY_TYPE}{name}/{metric}_before"), summary.get(f"{BY_TYPE}{name}/{metric}_after")
        return f"{before:.2f} -> {after:.2f}" if is_number(before) and is_number(after) else \
            (f"- -> {after:.2f}" if is_number(after) else "-")

    lines = ["## DPO by type", "", "Held-out pairs by how their rejected answer was made. Preference accuracy: the "
             "model gives the chosen answer the higher log-probability; implicit reward accuracy: DPO's reward "
             "beta * (log pi - log pi_ref) is higher for it (0 before training, when pi = pi_ref).", "",
             "| rejection type | pairs | preference accuracy | implicit reward accuracy |", "|---|---|---|---|"]
    for name in names:
        count = summary.get(f"{BY_TYPE}{name}/pairs_after", "-")
        lines.append(f"| {name} | {count} | {pair(name, 'pref_accuracy')} | {pair(name, 'reward_accuracy')} |")
    return lines + [""]


def distillation_lines(kd: dict | None, ce: dict | None) -> list[str]:
    """Distillation beside its baseline: the same student, data and steps, CE + KD (distill) vs CE only
    (distill_ce), on the held-out loss and the KL to the teacher."""
    if not kd or not ce:
        return []
    runs = [("start", kd, "before"), (f"KD (alpha {kd.get('alpha', '?')}, T {kd.get('temperature', '?')})", kd,
                                      "after"), ("CE only (alpha 1)", ce, "after")]
    lines = ["## Distillation vs CE only", "", "The same student (the SFT checkpoint), trained on the same chats "
             f"for the same steps ({kd.get('steps', '?')} and {ce.get('steps', '?')}), with and without the "
             "teacher's distributions; held-out assistant tokens of demo_sft_val.", "",
             "| held-out, per token | " + " | ".join(name for name, _, _ in runs) + " |", "|---|---|---|---|"]
    for metric, label in (("val_loss", "loss (CE on the reference)"), ("kl_to_teacher", "KL(teacher ‖ student)")):
        values = [run.get(f"{metric}_{when}") for _, run, when in runs]
        lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" if is_number(v) else "-" for v in values) + " |")
    teacher, kd_loss, ce_loss = kd.get("teacher_val_loss"), kd.get("val_loss_after"), ce.get("val_loss_after")
    lines.append("")
    if is_number(teacher):
        lines.append(f"Teacher ({kd.get('teacher', 'teacher')}) held-out loss: {teacher:.4f}.")
    if is_number(kd_loss) and is_number(ce_loss):
        verdict = "KD wins" if kd_loss < ce_loss else "KD does not win"
        lines.append(f"{verdict} on held-out loss: {kd_loss:.4f} vs {ce_loss:.4f} ({kd_loss - ce_loss:+.4f}).")
    return lines + [""]


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
