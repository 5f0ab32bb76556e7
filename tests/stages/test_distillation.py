"""train_distillation.py end to end on tiny generated chats: zero KD loss against itself, a different-size teacher
pulled closer, a transformers teacher and vocabulary errors"""
import json

import pytest
import torch
from transformers import AutoTokenizer

import train_distillation as distill
from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
from model.checkpoint import save_weights
from tests import TOKENIZER, torchrun

WORDS = "the king queen love night moon river spring wind sword song heart light 春 风 明 月 山 水".split()


def chat(question, answer):
    return {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_chats(path, count, offset=0):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(offset, offset + count):
            a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
            f.write(json.dumps(chat(f"say {a} and {b}", f"{a} and {b}, {b} and {a}."), ensure_ascii=False) + "\n")


def make_checkpoint(path, vocab_size, seed, logit_scale=1.0, **sizes):
    """A random TinyMind; logit_scale > 1 sharpens its distributions (a random teacher with opinions)."""
    torch.manual_seed(seed)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=vocab_size, **{**PRESETS["nano"], **sizes}))
    with torch.no_grad():
        model.model.norm.weight.mul_(logit_scale)
    save_weights(model, str(path))
    return str(path)


def base_args(tmp_path, tokenizer, steps=2, extra=()):
    data = tmp_path / "chats.jsonl"
    out = tmp_path / "out"
    if not data.exists():
        write_chats(data, 96)
        write_chats(tmp_path / "chats_val.jsonl", 16, offset=500)
        make_checkpoint(out / "full_sft_64.pth", len(tokenizer), seed=0)
    return ["--data_path", str(data), "--tokenizer_path", TOKENIZER, "--save_dir", str(out), "--max_steps", str(steps),
            "--batch_size", "4", "--max_seq_len", "64", "--log_interval", "1", "--eval_interval", "0",
            "--eval_batches", "4", "--dtype", "float32", "--num_threads", "1", "--device", "cpu", *extra]


def read_log(tmp_path, name):
    with open(tmp_path / "out" / "logs" / f"{name}.jsonl") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_kd_loss_is_zero_when_the_teacher_is_the_student(tmp_path, tokenizer):
    args = base_args(tmp_path, tokenizer, extra=["--alpha", "0"])
    result = distill.main(args + ["--teacher_weight", str(tmp_path / "out" / "full_sft_64.pth")])
    first = read_log(tmp_path, "distill")[0]
    assert first["step"] == 1 and abs(first["loss"]) < 1e-6 and abs(first["kd"]) < 1e-6 and first["ce"] > 1
    assert abs(result["before"]["kl_to_teacher"]) < 1e-6
    assert (tmp_path / "out" / "distill_64.pth").exists()


def test_distillation_pulls_a_bigger_teacher_closer_than_labels_alone(tmp_path, tokenizer):
    teacher = make_checkpoint(tmp_path / "teacher" / "teacher_96.pth", len(tokenizer), seed=7, logit_scale=4.0,
                              hidden_size=96, num_hidden_layers=3)
    common = base_args(tmp_path, tokenizer, steps=24, extra=["--teacher_weight", teacher, "--learning_rate", "3e-3",
                                                             "--log_interval", "10"])
    kd = distill.main(common + ["--alpha", "0", "--save_weight", "kd"])
    ce = distill.main(common + ["--alpha", "1", "--save_weight", "ce"])
    assert kd["before"]["kl_to_teacher"] == pytest.approx(ce["before"]["kl_to_teacher"])
    assert kd["after"]["kl_to_teacher"] < 0.7 * kd["before"]["kl_to_teacher"]
    assert kd["after"]["kl_to_teacher"] < ce["after"]["kl_to_teacher"] - 0.1
    assert ce["after"]["val_loss"] < ce["before"]["val_loss"] - 1.0  # the CE-only run did learn its labels


def test_transformers_teacher_with_the_same_vocabulary(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    args = base_args(tmp_path, tokenizer, extra=["--alpha", "0.5", "--temperature", "2", "--kd_direction", "reverse"])
    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **config)).save_pretrained(tmp_path / "llama")
    result = distill.main(args + ["--teacher_weight", str(tmp_path / "llama")])
    assert result["after"]["kl_to_teacher"] > 0

    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) + 64, **config)).save_pretrained(tmp_path / "llama_big")
    with pytest.raises(SystemExit, match="vocabulary of 6464 tokens, the student 6400"):
        distill.main(args + ["--teacher_weight", str(tmp_path / "llama_big")])


def test_teacher_with_another_tokenizer_is_refused(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    args = base_args(tmp_path, tokenizer)
    directory = tmp_path / "llama_other_tokenizer"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(directory)
    other = AutoTokenizer.from_pretrained(TOKENIZER)
    other.add_tokens(["<an_extra_token>"])
    other.save_pretrained(directory)
    with pytest.raises(SystemExit, match="tokenizer .* differs from ours"):
        distill.main(args + ["--teacher_weight", str(directory)])


def test_our_teacher_trained_with_another_tokenizer_is_refused(tmp_path, tokenizer):
    args = base_args(tmp_path, tokenizer)
    teacher = make_checkpoint(tmp_path / "teacher_64.pth", len(tokenizer), seed=1)
    config = json.loads((tmp_path / "teacher_64.json").read_text())
    config.update(tokenizer_path="elsewhere/tokenizer", tokenizer_digest="0123456789abcdef")  # as build_model records
    (tmp_path / "teacher_64.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=r"the teacher .*teacher_64.pth was trained with the tokenizer in "
                                         r"elsewhere/tokenizer/"):
        distill.main(args + ["--teacher_weight", teacher])


def test_missing_teacher_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(SystemExit, match="no 'big_teacher' weights"):
        distill.main(base_args(tmp_path, tokenizer, extra=["--teacher_weight", "big_teacher"]))


@pytest.mark.slow
def test_two_process_gloo_distillation_keeps_ranks_in_sync(tmp_path, tokenizer):
    teacher = make_checkpoint(tmp_path / "teacher" / "teacher_96.pth", len(tokenizer), seed=7, hidden_size=96)
    args = base_args(tmp_path, tokenizer, steps=3, extra=["--teacher_weight", teacher])
    result = torchrun("train_distillation.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ranks in sync: yes" in result.stdout and "x 2 ranks" in result.stdout


@pytest.mark.parametrize("source", ["pth", "llama_dir"])
def test_teacher_dtype_casts_weights_and_keeps_rope_in_fp32(tmp_path, tokenizer, source):
    """--teacher_dtype bfloat16 casts the teacher's weights only. model.to(bf16) also rounded RoPE's inv_freq, so
    the student learnt from a different teacher than the trained one: its bf16 logit error far from the start
    (positions 1792-2047) was 7x the error near it (0-255), against 0.9x with fp32 frequencies. Attention is
    sharpened (q/k projections x10) as a trained model's is; at init scale it is too flat for RoPE to matter."""
    from types import SimpleNamespace

    from scripts import convert_model
    torch.manual_seed(0)
    teacher = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS["nano"]))
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                param.mul_(10)
    spec = str(tmp_path / "teacher" / "teacher_64.pth")
    save_weights(teacher, spec)
    if source == "llama_dir":
        convert_model.main(["--load_from", spec, "--out_dir", str(tmp_path / "llama"), "--tokenizer_path", TOKENIZER])
        spec = str(tmp_path / "llama")
    student = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS["nano"]))
    runtime = SimpleNamespace(device=torch.device("cpu"))
    teachers = {}
    for dtype in ("float32", "bfloat16"):
        args = distill.parse_args(base_args(tmp_path, tokenizer, extra=["--teacher_weight", spec,
                                                                        "--teacher_dtype", dtype]))
        teachers[dtype] = distill.load_teacher(args, tokenizer, student, None, runtime)

    assert {p.dtype for p in teachers["bfloat16"].parameters()} == {torch.bfloat16}
    reference = dict(teachers["float32"].named_buffers())
    for name, buffer in teachers["bfloat16"].named_buffers():
        assert buffer.dtype == torch.float32 and torch.equal(buffer, reference[name]), name
    ids = torch.randint(3, len(tokenizer), (1, 2048), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = (teachers["bfloat16"](ids).logits.float() - teachers["float32"](ids).logits.float()).abs()[0]
    near, far = error[:256].max().item(), error[-256:].max().item()
    assert far < 2 * near, f"bf16 teacher's logit error {far:.4f} at positions 1792-2047 vs {near:.4f} at 0-255"


def test_held_out_loss_has_one_definition_shared_with_sft(tmp_path, tokenizer):
    """The same checkpoint on the same held-out chats gets the same held-out loss from distillation's evaluation
    (padded batches) as from SFT's (packed): both per assistant token. A mean of batch means weighted the tokens of
    short batches more (4.175 vs 4.247 on the demo)."""
    import argparse

    from model.data.chat import SFTDataset
    from model.training.evaluation import assistant_token_loss, make_padded_chat_evaluate
    from model.training.runtime import init_runtime
    write_chats(tmp_path / "val.jsonl", 37)  # batches of 16, 16 and 5: unequal, as real held-out files are
    val = SFTDataset(str(tmp_path / "val.jsonl"), tokenizer, 64, show_progress=False)
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS["nano"])).eval()
    runtime = init_runtime("cpu", "float32", 0, 1)
    evaluate = make_padded_chat_evaluate(argparse.Namespace(batch_size=16, eval_batches=100), val, runtime,
                                         tokenizer.pad_token_id, teacher=model)
    with torch.no_grad():
        padded = evaluate(model)
        packed = assistant_token_loss(model, val, runtime, batch_size=4, max_seq_len=64)
    assert padded["val_loss"] == pytest.approx(packed, abs=1e-5)
    assert padded["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)


def test_padding_to_a_multiple_changes_the_shapes_not_the_loss(tmp_path, tokenizer):
    """Training batches are padded to a multiple of --pad_to_multiple_of tokens, so the run sees a few shapes rather
    than one per length (CPU memory stays flat: docs/distillation.md). Padding is masked: the loss and its CE and KL
    parts are those of padding to the longest chat, the old behaviour (--pad_to_multiple_of 1)."""
    from model.data.chat import SFTDataset
    write_chats(tmp_path / "few.jsonl", 8)
    data = SFTDataset(str(tmp_path / "few.jsonl"), tokenizer, 64, show_progress=False)
    items = [data[i] for i in range(len(data))]
    longest = max(len(item["input_ids"]) for item in items)
    torch.manual_seed(0)
    student = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS["nano"])).eval()
    teacher = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS["nano"])).eval()
    args = distill.parse_args(base_args(tmp_path, tokenizer, extra=["--teacher_weight", "unused"]))
    loss_fn = distill.make_loss_fn(args, teacher)
    results = {}
    for multiple, width in ((1, longest), (16, -(-longest // 16) * 16), (64, 48)):  # 64 is capped at max_len
        batch = distill.pad_to_multiple(items, tokenizer.pad_token_id, multiple, max_len=48)
        assert batch["input_ids"].shape[1] == width
        assert batch["attention_mask"].sum() == sum(len(item["input_ids"]) for item in items)
        with torch.no_grad():
            loss, metrics = loss_fn(student, batch)
        results[multiple] = (loss.item(), metrics["ce"].item(), metrics["kd"].item())
    assert longest < 32 < 48 and results[1][2] > 0
    for multiple in (16, 64):
        assert results[multiple] == pytest.approx(results[1], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("teacher_kind", ["ours", "llama"])
def test_packed_rows_give_the_padded_loss_for_student_and_teacher(tmp_path, tokenizer, teacher_kind):
    """--packing 1 puts several chats in one row (block-diagonal mask, positions restarting per chat): the KD loss,
    its CE and its KL are those of the same chats padded one per row, with our teacher and a transformers one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.data.chat import SFTDataset
    from model.data.packing import ChatCollate, PackedDataset
    write_chats(tmp_path / "few.jsonl", 12)
    data = SFTDataset(str(tmp_path / "few.jsonl"), tokenizer, 64, show_progress=False)
    items = [data[i] for i in range(len(data))]
    torch.manual_seed(0)
    student = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS["nano"])).eval()
    if teacher_kind == "ours":
        teacher = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS["nano"])).eval()
    else:
        teacher = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=2,
                                               num_key_value_heads=1)).eval()
    args = distill.parse_args(base_args(tmp_path, tokenizer, extra=["--teacher_weight", "unused"]))
    loss_fn = distill.make_loss_fn(args, teacher)
    packed_rows = PackedDataset(data, max_seq_len=128, seed=0)
    assert len(packed_rows) < len(items)  # several chats share a row
    packed = ChatCollate(True, tokenizer.pad_token_id)([packed_rows[i] for i in range(len(packed_rows))])
    padded = distill.pad_to_multiple(items, tokenizer.pad_token_id, 1, max_len=64)
    with torch.no_grad():
        (loss, parts), (padded_loss, padded_parts) = loss_fn(student, packed), loss_fn(student, padded)
    assert parts["kd"].item() > 0 and packed["tokens"] == padded["attention_mask"].sum()
    assert loss.item() == pytest.approx(padded_loss.item(), rel=1e-5)
    for name in ("ce", "kd"):
        assert parts[name].item() == pytest.approx(padded_parts[name].item(), rel=1e-5), name


def test_held_out_numbers_do_not_depend_on_the_training_batches(tmp_path, tokenizer):
    """The held-out loss and KL are measured on chats in batches of a fixed size, packed training or not."""
    runs = [distill.main(base_args(tmp_path, tokenizer, steps=1, extra=[
        "--teacher_weight", str(tmp_path / "out" / "full_sft_64.pth"), "--save_weight", name, *flags]))
        for name, flags in (("packed", ["--batch_size", "1"]), ("padded", ["--packing", "0"]))]
    assert runs[0]["before"] == pytest.approx(runs[1]["before"], abs=1e-6)


class Untouchable(torch.nn.Module):
    """A teacher that fails the test the moment it is run."""

    def forward(self, *args, **kwargs):
        raise AssertionError("the teacher ran in CE-only training")


def test_ce_only_loss_is_the_sft_loss_and_never_runs_the_teacher(tmp_path, tokenizer):
    """--alpha 1, the baseline KD is compared with: on a batch, its loss is train_full_sft's loss (mean CE over the
    assistant tokens, or summed over a step's tokens divided by their number), and the teacher is never run."""
    import train_full_sft
    from model.data.chat import SFTDataset
    write_chats(tmp_path / "few.jsonl", 6)
    data = SFTDataset(str(tmp_path / "few.jsonl"), tokenizer, 64, show_progress=False)
    batch = distill.pad_to_multiple([data[i] for i in range(len(data))], tokenizer.pad_token_id, 64, max_len=64)
    torch.manual_seed(0)
    student = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS["nano"])).eval()
    args = distill.parse_args(base_args(tmp_path, tokenizer, extra=["--alpha", "1", "--teacher_weight", "none"]))
    loss_fn = distill.make_loss_fn(args, Untouchable())
    with torch.no_grad():
        for normaliser in (None, torch.tensor(50.0)):
            step_batch = batch if normaliser is None else {**batch, "loss_normaliser": normaliser}
            loss, metrics = loss_fn(student, step_batch)
            sft_loss, _ = train_full_sft.loss_fn(student, step_batch)
            assert loss.item() == pytest.approx(sft_loss.item(), rel=1e-6) and "kd" not in metrics
    assert loss.item() > 1


def test_ce_only_run_never_builds_a_teacher_and_trains_like_one_that_only_measures(tmp_path, tokenizer, monkeypatch):
    """--teacher_weight none --alpha 1 loads no teacher at all; with a teacher and --alpha 1 the teacher only
    measures the held-out KL: both runs train the same weights through the same losses."""
    teacher = make_checkpoint(tmp_path / "teacher" / "teacher_96.pth", len(tokenizer), seed=7, logit_scale=4.0,
                              hidden_size=96, num_hidden_layers=3)
    common = base_args(tmp_path, tokenizer, steps=3, extra=["--alpha", "1", "--learning_rate", "3e-3"])
    measured = distill.main(common + ["--teacher_weight", teacher, "--save_weight", "distill_ce"])

    def no_teacher(*args, **kwargs):
        raise AssertionError("load_teacher called with --teacher_weight none")
    monkeypatch.setattr(distill, "load_teacher", no_teacher)
    alone = distill.main(common + ["--teacher_weight", "none", "--save_weight", "alone"])
    assert [r["loss"] for r in read_log(tmp_path, "alone")] == [r["loss"] for r in read_log(tmp_path, "distill_ce")]
    assert alone["after"]["val_loss"] == pytest.approx(measured["after"]["val_loss"], abs=1e-6)
    assert "kl_to_teacher" not in alone["after"] and measured["after"]["kl_to_teacher"] > 0
    out = tmp_path / "out"
    assert all(torch.equal(a, b) for a, b in zip(torch.load(out / "alone_64.pth").values(),
                                                  torch.load(out / "distill_ce_64.pth").values()))
    summary = json.loads((out / "summaries" / "distill_ce.json").read_text())
    assert summary["alpha"] == 1.0 and summary["teacher_val_loss"] == measured["teacher_val_loss"] > 0
    assert "kl_to_teacher_after" in summary and "teacher_val_loss" not in \
        json.loads((out / "summaries" / "alone.json").read_text())
    with pytest.raises(SystemExit):
        distill.parse_args(common[:-4] + ["--teacher_weight", "none", "--alpha", "0.5"])
