"""What a run leaves behind besides weights: the metrics log (JSONL, optionally wandb) and the stage summary that
scripts/report.py turns into the report card."""
import json
import os

import torch

from ..files import atomic_write_text
from .runtime import Runtime


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class MetricsLog:
    """One JSON object per log step in <save_dir>/logs/<name>.jsonl (rank 0), mirrored to wandb when enabled."""

    def __init__(self, runtime: Runtime, save_dir: str, name: str, use_wandb: bool = False, project: str = "TinyMind",
                 config: dict | None = None, wandb_id: str | None = None, append: bool = False):
        self.runtime = runtime
        self.path = os.path.join(save_dir, "logs", f"{name}.jsonl")
        self.wandb = None
        self.wandb_id = wandb_id
        if not runtime.is_main:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if not append and os.path.exists(self.path):
            os.replace(self.path, self.path + ".prev")  # a fresh run starts a fresh curve; keep the last one
        if use_wandb:
            import wandb
            if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"
            self.wandb = wandb.init(project=project, name=name, config=config, id=wandb_id,
                                    resume="allow" if wandb_id else None, dir=save_dir)
            self.wandb_id = self.wandb.id

    def log(self, metrics: dict):
        if not self.runtime.is_main:
            return
        record = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


def write_summary(save_dir: str, name: str, summary: dict, runtime: Runtime | None = None, merge: bool = False):
    """A stage's headline numbers (held-out metrics before/after, wall time, paths) as
    <save_dir>/summaries/<name>.json, for scripts/report.py and the pipeline. `merge` adds to what the Trainer
    already wrote for this run instead of replacing it."""
    if runtime is not None and not runtime.is_main:
        return
    path = os.path.join(save_dir, "summaries", f"{name}.json")
    clean = {}
    if merge and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            clean = json.load(f)
    clean.update({k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in summary.items()})
    atomic_write_text(json.dumps(clean, indent=2, ensure_ascii=False, default=str), path)


def before_after(before: dict, after: dict) -> dict:
    """{metric}_before / {metric}_after for every number both dicts hold: the summary keys scripts/report.py pairs."""
    paired = {}
    for key, value in after.items():
        if isinstance(value, (int, float)) and isinstance(before.get(key), (int, float)):
            paired[f"{key}_before"], paired[f"{key}_after"] = before[key], value
    return paired
