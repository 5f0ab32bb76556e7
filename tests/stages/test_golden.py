"""Loss regression (torchtitan's idea): every stage of the quick pipeline, in float32, must reproduce the losses and
held-out numbers pinned in tests/stages/golden/quick_pipeline.json. A refactor that changes no behaviour passes
unchanged; one that changes a data order, a mask or a loss does not.

The numbers were pinned on the project's CI machine kind (2-core x86 CPU, torch 2.13 CPU build). Another CPU's
float32 kernels may round differently; after checking that a difference is only that, re-pin with
    TINYMIND_PIN_GOLDEN=1 python -m pytest tests/stages/test_golden.py
"""
import json
import math
import os
import subprocess
import sys

import pytest
from tests import ROOT

GOLDEN = os.path.join(ROOT, "tests", "stages", "golden", "quick_pipeline.json")
TRAINING_KEYS = ("loss", "grad_norm", "lm_loss", "aux_loss", "reward", "kl", "ratio_mean", "completion_length")
# Exact on the machine the numbers were pinned on (float32, fixed seeds, fixed threads); the tolerance only absorbs
# another x86 CPU's float32 rounding.
RELATIVE, ABSOLUTE = 2e-4, 1e-5


def pinned_numbers(out: str) -> dict:
    """The deterministic numbers of a pipeline run: each log record's training metrics and evaluations, and each
    summary's before/after held-out metrics. Times, throughput and memory are left out: they are not behaviour."""
    numbers = {}
    for name in sorted(os.listdir(os.path.join(out, "logs"))):
        if not name.endswith(".jsonl"):
            continue
        stage = name[:-len(".jsonl")]
        with open(os.path.join(out, "logs", name)) as f:
            for line in f:
                record = json.loads(line)
                for key, value in record.items():
                    if (key in TRAINING_KEYS or key.startswith("eval/") or key.startswith("rewards/")) \
                            and isinstance(value, (int, float)):
                        numbers[f"log/{stage}/step{record['step']}/{key}"] = value
    for name in sorted(os.listdir(os.path.join(out, "summaries"))):
        if not name.endswith(".json") or name.startswith(("samples_", "pipeline")):
            continue
        with open(os.path.join(out, "summaries", name)) as f:
            summary = json.load(f)
        for key, value in summary.items():
            if key.endswith(("_before", "_after")) and isinstance(value, (int, float)):
                numbers[f"summary/{name[:-len('.json')]}/{key}"] = value
    return numbers


def run_quick_pipeline_float32(out) -> str:
    stages = "clean,pretrain,sft,lora,dpo,teacher,distill,reason,grpo"
    result = subprocess.run([sys.executable, "-m", "scripts.run_pipeline", "--quick", "--dtype", "float32",
                             "--save_dir", str(out), "--stages", stages],
                            cwd=ROOT, capture_output=True, text=True, timeout=1500,
                            env=dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="2"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def run_grpo_with_varied_rewards(out):
    """The quick pipeline's GRPO rewards are all zero for the nano model (loss 0 at every step); this run's reward
    differs between siblings, so the pinned GRPO loss, KL and ratio come from real advantages."""
    command = [sys.executable, "train_grpo.py", "--save_dir", str(out), "--save_weight", "grpo_varied",
               "--from_weight", "reason", "--hidden_size", "64", "--dtype", "float32", "--max_steps", "4",
               "--log_interval", "1", "--save_interval", "1000", "--eval_samples", "8", "--num_generations", "4",
               "--max_gen_len", "16", "--num_iterations", "2", "--beta", "0.04",
               "--reward_funcs", "tests/stages/golden/varied_reward.py:distinct_characters"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="2"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_quick_pipeline_reproduces_the_pinned_numbers(tmp_path):
    out = tmp_path / "out"
    run_quick_pipeline_float32(out)
    run_grpo_with_varied_rewards(out)
    numbers = pinned_numbers(str(out))
    if os.environ.get("TINYMIND_PIN_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(numbers, f, indent=1, sort_keys=True)
        pytest.skip(f"pinned {len(numbers)} numbers in {GOLDEN}")
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert sorted(numbers) == sorted(golden), "a stage logs other metrics than when the numbers were pinned"
    differ = [f"{key}: pinned {golden[key]!r}, now {numbers[key]!r}" for key in sorted(golden)
              if not math.isclose(numbers[key], golden[key], rel_tol=RELATIVE, abs_tol=ABSOLUTE)]
    assert not differ, f"{len(differ)} of {len(golden)} numbers moved:\n" + "\n".join(differ[:40])
