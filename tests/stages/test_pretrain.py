"""train_pretrain.py end to end on a tiny generated corpus: learning, bad input, NaN guard, exact resume, DDP."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_pretrain
from model import TinyMindForCausalLM
from model.checkpoint import load_weights
from model.training.runtime import init_runtime
from model.training.engine import TrainingDiverged
from model.training.trainer import Trainer
from tests import ROOT, TOKENIZER, torchrun

WORDS = "the king queen love night moon river spring wind sword song heart light 春 风 明 月 山 水".split()


def write_corpus(path, docs=400, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(docs):
            # a repetitive grammar the model can learn quickly: "<w> and <w> , <w> and <w> ..."
            words = [rng.choice(WORDS[:6]) + " and " + rng.choice(WORDS[6:]) for _ in range(rng.randint(5, 30))]
            f.write(json.dumps({"text": " , ".join(words)}, ensure_ascii=False) + "\n")


def base_args(tmp_path, steps=12, extra=()):
    data = tmp_path / "corpus.jsonl"
    if not data.exists():
        write_corpus(data)
        write_corpus(tmp_path / "corpus_val.jsonl", docs=40, seed=1)
    return ["--data_path", str(data), "--tokenizer_path", TOKENIZER, "--save_dir", str(tmp_path / "out"),
            "--preset", "nano", "--max_steps", str(steps), "--batch_size", "4", "--max_seq_len", "32",
            "--log_interval", "2", "--eval_interval", "0", "--eval_batches", "4", "--sample_tokens", "0",
            "--dtype", "float32", "--num_threads", "1", "--device", "cpu", *extra]


def read_log(tmp_path, name="pretrain"):
    with open(tmp_path / "out" / "logs" / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f]


def test_pretraining_lowers_held_out_loss(tmp_path):
    train_pretrain.main(base_args(tmp_path, steps=40, extra=["--learning_rate", "3e-3"]))
    evals = [r for r in read_log(tmp_path) if "eval/val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["eval/val_loss"] < evals[0]["eval/val_loss"] - 1.0
    assert (tmp_path / "out" / "pretrain_64.pth").exists() and (tmp_path / "out" / "pretrain_64.json").exists()


def test_saved_weights_record_the_stage_not_the_run_name(tmp_path):
    """A teacher pretrained under another --save_weight is still a base model: served as continuation, not chat."""
    from model.inference import load_model_for_inference
    train_pretrain.main(base_args(tmp_path, steps=2, extra=["--save_weight", "teacher_base"]))
    with open(tmp_path / "out" / "teacher_base_64.json") as f:
        assert json.load(f)["tinymind_stage"] == "pretrain"
    assert load_model_for_inference(str(tmp_path / "out" / "teacher_base_64.pth"), device="cpu").mode != "chat"


def test_peak_tflops_gives_mfu_on_any_device(tmp_path):
    """MFU is logged against --peak_tflops where no table knows the device (here a CPU); without it, not at all."""
    train_pretrain.main(base_args(tmp_path, steps=4, extra=["--peak_tflops", "0.05"]))
    logged = [r for r in read_log(tmp_path) if "tokens_per_sec" in r]
    _, config = load_weights(str(tmp_path / "out" / "pretrain_64.pth"))
    per_token = TinyMindForCausalLM(config).flops_per_token(32)
    assert all(r["mfu"] == pytest.approx(per_token * r["tokens_per_sec"] / 0.05e12, rel=1e-6) for r in logged)
    train_pretrain.main(base_args(tmp_path, steps=2))
    assert not any("mfu" in r for r in read_log(tmp_path))


def test_bad_line_is_reported_with_path_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"txt": "wrong field"}\n', encoding="utf-8")
    args = base_args(tmp_path)
    args[args.index("--data_path") + 1] = str(data)
    with pytest.raises(SystemExit, match=rf"{data}:3: missing the \"text\" field"):
        train_pretrain.main(args)
    data.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=rf"{data}:2: not valid JSON"):
        train_pretrain.main(args)


def test_skip_bad_lines_counts_them(tmp_path, capsys):
    write_corpus(tmp_path / "mixed.jsonl")
    with open(tmp_path / "mixed.jsonl", "a") as f:
        f.write("{broken\n[1, 2]\n")
    args = base_args(tmp_path, steps=2, extra=["--skip_bad_lines", "1"])
    args[args.index("--data_path") + 1] = str(tmp_path / "mixed.jsonl")
    train_pretrain.main(args)
    assert "skipped 2 bad lines (first at lines [401, 402])" in capsys.readouterr().out


def test_missing_data_file_is_a_clear_error(tmp_path):
    args = base_args(tmp_path)
    args[args.index("--data_path") + 1] = str(tmp_path / "nope.jsonl")
    with pytest.raises(SystemExit, match="data file not found"):
        train_pretrain.main(args)


def test_checkpoint_that_does_not_fit_the_flags_is_a_clear_error(tmp_path):
    train_pretrain.main(base_args(tmp_path, steps=2))
    weights = str(tmp_path / "out" / "pretrain_64.pth")
    with pytest.raises(SystemExit, match="--num_hidden_layers 3 but the checkpoint has 2"):
        train_pretrain.main(base_args(tmp_path, steps=2, extra=["--from_weight", weights, "--num_hidden_layers", "3"]))


def test_nan_loss_stops_before_the_update_and_keeps_the_checkpoint(tmp_path):
    from model import TinyMindConfig, TinyMindForCausalLM
    args = train_pretrain.parse_args(base_args(tmp_path, steps=6, extra=["--save_interval", "2"]))
    runtime = init_runtime("cpu", "float32", 0)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1))
    data = [{"input_ids": torch.randint(0, 50, (8,)), "labels": torch.randint(0, 50, (8,))} for _ in range(64)]
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = model(batch["input_ids"], labels=batch["labels"]).loss
        return (loss * float("nan") if len(calls) == 3 else loss), {}

    trainer = Trainer(args, model, runtime, "pretrain")
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        trainer.fit(data, loss_fn)
    assert signal.getsignal(signal.SIGTERM) is handler  # fit's save-and-stop handler is gone even after a failure
    saved = torch.load(trainer.weights_file, weights_only=True)
    assert all(torch.isfinite(t).all() for t in saved.values())
    for name, param in model.named_parameters():  # the NaN step never reached the live weights either
        assert torch.isfinite(param).all(), name
        torch.testing.assert_close(param.detach(), saved[name], rtol=0, atol=0)


def test_kill_9_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    steps = 40
    uninterrupted = tmp_path / "a"
    uninterrupted.mkdir()
    train_pretrain.main(base_args(uninterrupted, steps=steps, extra=["--save_interval", "4"]))

    crashed = tmp_path / "b"
    crashed.mkdir()
    args = base_args(crashed, steps=steps, extra=["--save_interval", "4"])
    resume_file = crashed / "out" / "pretrain_64_resume.pth"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_pretrain.py"), *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not resume_file.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    state = torch.load(resume_file, weights_only=True)["train_state"]
    assert 0 < state["step"] < steps, "the run should have died mid-way (machine too fast? raise steps)"

    train_pretrain.main(args + ["--from_resume", "1"])
    expected = torch.load(uninterrupted / "out" / "pretrain_64.pth", weights_only=True)
    resumed = torch.load(crashed / "out" / "pretrain_64.pth", weights_only=True)
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    losses = {r["step"]: r["loss"] for r in read_log(uninterrupted) if "loss" in r}
    resumed_losses = {r["step"]: r["loss"] for r in read_log(crashed) if "loss" in r}
    for step in resumed_losses:
        assert resumed_losses[step] == losses[step], step


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_in_sync(tmp_path):
    args = base_args(tmp_path, steps=6)
    result = torchrun("train_pretrain.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ranks in sync: yes" in result.stdout
    assert "x 2 ranks" in result.stdout
