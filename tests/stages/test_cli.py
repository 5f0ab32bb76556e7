"""What every stage's command line promises a newcomer: --help shows each flag's default and only the model flags
that stage can use, and a missing checkpoint's error names the flag of the script that was run."""
import importlib

import pytest

from model.inference import load_model_for_inference
from model.training.frozen import load_frozen_checkpoint

STAGES = ["train_pretrain", "train_full_sft", "train_lora", "train_dpo", "train_distillation", "train_reason",
          "train_grpo"]


@pytest.mark.parametrize("stage", STAGES)
def test_help_shows_every_default(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(stage).parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "(default: 1.0)" in text.split("--grad_clip")[-1].split("--")[0]  # a shared flag
    assert text.count("(default: ") > 30
    assert "--warmup_ratio" not in text  # a flag that does not exist


SHAPING_FLAGS = ["--preset", "--num_attention_heads", "--num_key_value_heads", "--intermediate_size",
                 "--moe_balance", "--num_experts", "--num_experts_per_tok"]


@pytest.mark.parametrize("stage", STAGES)
def test_help_lists_shaping_flags_only_where_a_new_model_is_built(stage, capsys):
    module = importlib.import_module(stage)
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    shown = [flag for flag in SHAPING_FLAGS if f"{flag} " in text]
    builds_new_models = stage in ("train_pretrain", "train_distillation")  # a distillation student may be new
    assert shown == (SHAPING_FLAGS if builds_new_models else [])
    assert "--hidden_size" in text and "--use_moe" in text  # they pick the checkpoint's file name everywhere
    assert module.parse_args(["--num_experts", "4", "--preset", "tiny"]).num_experts == 4  # still accepted


def test_missing_weights_name_the_callers_own_flag(tmp_path):
    with pytest.raises(SystemExit, match="pass --load_from PATH.pth") as exit_info:
        load_model_for_inference(weight="grpo", save_dir=str(tmp_path), device="cpu", verbose=False)
    assert "--from_weight" not in str(exit_info.value)  # eval_model.py has no such flag
    with pytest.raises(SystemExit, match="pass --teacher_weight PATH.pth"):
        load_frozen_checkpoint("teacher_sft", str(tmp_path), None, None, 6400, "teacher", "--teacher_weight")


def test_output_to_a_file_has_no_progress_bar_and_names_the_run(tmp_path):
    """Redirected to a file, tqdm's carriage returns piled into one endless line; the log lines carry the step and
    the ETA instead. A teacher pretrained with --save_weight teacher_pretrain says so, not "pretrain"."""
    import json
    import subprocess
    import sys

    from tests import ROOT, TOKENIZER
    command = [sys.executable, "train_pretrain.py", "--save_dir", str(tmp_path), "--save_weight", "teacher_pretrain",
               "--preset", "nano", "--max_steps", "3", "--log_interval", "1", "--batch_size", "2", "--max_seq_len",
               "32", "--eval_batches", "1", "--sample_tokens", "0", "--dtype", "float32", "--tokenizer_path",
               TOKENIZER, "--cache_dir", str(tmp_path / "cache")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stdout and "step 3/3" in result.stdout and "eta" in result.stdout
    assert "teacher_pretrain: " in result.stdout and "teacher_pretrain done" in result.stdout
    summary = json.loads((tmp_path / "summaries" / "teacher_pretrain.json").read_text())
    assert summary["stage"] == "teacher_pretrain"
