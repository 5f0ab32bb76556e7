"""What every stage's command line promises a newcomer: --help shows each flag's default, and a missing checkpoint's
error names the flag of the script that was run."""
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


def test_missing_weights_name_the_callers_own_flag(tmp_path):
    with pytest.raises(SystemExit, match="pass --load_from PATH.pth") as exit_info:
        load_model_for_inference(weight="grpo", save_dir=str(tmp_path), device="cpu", verbose=False)
    assert "--from_weight" not in str(exit_info.value)  # eval_model.py has no such flag
    with pytest.raises(SystemExit, match="pass --teacher_weight PATH.pth"):
        load_frozen_checkpoint("teacher_sft", str(tmp_path), None, None, 6400, "teacher", "--teacher_weight")
