"""The whole pipeline on the quick setting: every stage leaves its checkpoint, its metrics log and the report."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_pipeline_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "scripts/run_pipeline.py", "--quick", "--save_dir", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1500,
                            env=dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="2"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for weights in ["pretrain_64.pth", "full_sft_64.pth", "lora/lora_identity_64.pth", "dpo_64.pth",
                    "teacher_sft_96.pth", "distill_64.pth", "reason_64.pth", "grpo_64.pth"]:
        assert (out / weights).exists(), weights
    for log in ["pretrain", "full_sft", "dpo", "distill", "reason", "grpo"]:
        records = [json.loads(line) for line in open(out / "logs" / f"{log}.jsonl")]
        assert any("loss" in r for r in records), log
    report = (out / "report.md").read_text()
    assert "## Held-out results" in report and "| pretrain | val_loss |" in report
    images = list((out / "report_images").glob("*.png"))
    assert len(images) >= 6 and all(image.stat().st_size > 1000 for image in images)
    assert (out / "report_images" / "report_card.png").exists() and "![report card]" in report
    # stages that measure their own before/after (SFT, LoRA, reasoning format) pair them in the report
    assert "| full_sft | end_of_turn_rate |" in report and "| reason | well_formed |" in report
    assert (out / "data" / "demo_pretrain_clean.jsonl").exists()
