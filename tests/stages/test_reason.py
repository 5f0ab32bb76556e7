"""train_reason.py: the tag tokens weighted in the loss exactly as MiniMind's distill_reason, the well-formed check,
and the format measured on held-out lines when the data has no _val.jsonl twin."""
import json

import pytest
import torch

import train_reason
from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
from model.checkpoint import save_weights
from model.data.chat import SFTDataset
from model.data.packing import pad_collate
from model.training.chat import load_chats_with_held_out
from model.training.runtime import init_runtime
from model.training.schedule import ResumableSampler
from tests import TOKENIZER


def write_reason_chats(path, count, offset=0):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(offset, offset + count):
            a, b = i % 10, (7 * i) % 10
            reply = f"<think>\n{a} + {b} = {a + b}.\n</think>\n<answer>\n{a + b}\n</answer>"
            f.write(json.dumps({"conversations": [{"role": "user", "content": f"Compute {a} + {b}."},
                                                  {"role": "assistant", "content": reply}]}) + "\n")


def base_args(tmp_path, tokenizer, steps=2, extra=()):
    """Reasoning SFT from a random nano full_sft checkpoint on 64 generated sums (8 held out)."""
    out = tmp_path / "out"
    if not (out / "full_sft_64.pth").exists():
        torch.manual_seed(0)
        save_weights(TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS["nano"])),
                     str(out / "full_sft_64.pth"))
    return ["--data_path", str(tmp_path / "reason.jsonl"), "--tokenizer_path", TOKENIZER, "--save_dir", str(out),
            "--max_steps", str(steps), "--batch_size", "4", "--max_seq_len", "64", "--log_interval", "1",
            "--eval_interval", "0", "--eval_batches", "4", "--dtype", "float32", "--num_threads", "1",
            "--device", "cpu", *extra]


def read_log(tmp_path, name):
    with open(tmp_path / "out" / "logs" / f"{name}.jsonl") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_tag_weights_hit_exactly_the_four_tags(tmp_path, tokenizer):
    write_reason_chats(tmp_path / "reason.jsonl", 1)
    item = SFTDataset(str(tmp_path / "reason.jsonl"), tokenizer, 128, show_progress=False)[0]
    tag_ids = torch.tensor(train_reason.tag_token_ids(tokenizer))
    weights = train_reason.tag_weights(item["labels"], tag_ids, 10.0)
    tokens = tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
    assert sorted(t for t, w in zip(tokens, weights) if w == 10) == sorted(train_reason.TAGS)
    assert ((weights == 1) == ((item["labels"] != -100) & ~torch.isin(item["labels"], tag_ids))).all()
    assert (weights[item["labels"] == -100] == 0).all()


def test_reasoning_sft_weights_the_tags_in_the_logged_loss(tmp_path, tokenizer):
    """The first logged loss equals MiniMind's weighted mean sum(w * CE) / sum(w) on the first batch, recomputed
    here from the starting weights; with weight 1 it would be the plain SFT loss, which differs."""
    write_reason_chats(tmp_path / "reason.jsonl", 64)
    write_reason_chats(tmp_path / "reason_val.jsonl", 8, offset=200)
    args = base_args(tmp_path, tokenizer, extra=["--eval_prompts", "4", "--max_new_tokens", "8"])
    args[args.index("--data_path") + 1] = str(tmp_path / "reason.jsonl")
    start = torch.load(tmp_path / "out" / "full_sft_64.pth", weights_only=True)
    result = train_reason.main(args + ["--special_token_weight", "10"])
    assert (tmp_path / "out" / "reason_64.pth").exists()
    assert 0 <= result["format_before"]["well_formed"] <= 1 and "well_formed" in result["format_after"]

    dataset = SFTDataset(str(tmp_path / "reason.jsonl"), tokenizer, 64, show_progress=False)
    first_batch = ResumableSampler(len(dataset), seed=42, epoch=0).indices()[:4]
    batch = pad_collate([dataset[i] for i in first_batch])
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS["nano"]))
    model.load_state_dict(start)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    tag_ids = torch.tensor(train_reason.tag_token_ids(tokenizer))
    valid, is_tag = labels.flatten() != -100, torch.isin(labels.flatten(), tag_ids)
    weights = valid.float() + 9.0 * is_tag.float()
    expected = (per_token * weights).sum() / weights.sum()
    plain = per_token[valid].mean()
    logged = read_log(tmp_path, "reason")[0]["loss"]
    assert logged == pytest.approx(expected.item(), abs=1e-5)
    assert abs(expected - plain) > 1e-3


def test_reasoning_sft_without_a_val_file_measures_the_format_on_held_out_lines(tmp_path, tokenizer):
    write_reason_chats(tmp_path / "r1_mix_1024.jsonl", 80)  # MiniMind's file, no _val.jsonl beside it
    args = base_args(tmp_path, tokenizer, extra=["--eval_prompts", "4", "--max_new_tokens", "8",
                                                 "--val_fraction", "0.1"])
    args[args.index("--data_path") + 1] = str(tmp_path / "r1_mix_1024.jsonl")
    train, val, val_path, val_lines = load_chats_with_held_out(train_reason.parse_args(args), tokenizer,
                                                               init_runtime("cpu", "float32", 0, 1))
    assert (len(train), len(val), val_path) == (72, 8, str(tmp_path / "r1_mix_1024.jsonl"))
    prompts = train_reason.held_out_prompts(val_path, 100, val_lines)
    assert len(prompts) == 8 and all(p[0][0]["content"] == f"Compute {(n - 1) % 10} + {7 * (n - 1) % 10}."
                                     for p, n in zip(prompts, sorted(val_lines)))
    result = train_reason.main(args)
    assert "well_formed" in result["format_before"] and "well_formed" in result["format_after"]


def test_well_formed_replies():
    good = "<think>\n8 + 5 = 13.\n</think>\n<answer>\n13\n</answer>"
    assert train_reason.parse_reasoning(good) == "13"
    for bad in ["13", "<think>\nx\n</think>\n13", "<answer>\n13\n</answer>", good + " and more",
                "<think>\n\n</think>\n<answer>\n13\n</answer>",  # empty thinking
                "<think>\nx\n</think>\n<answer>\n</answer>\n</answer>",  # stray tag passed off as the answer
                "<think>\n</answer> + 1\n</think>\n<answer>\n2\n</answer>"]:
        assert train_reason.parse_reasoning(bad) is None, bad
