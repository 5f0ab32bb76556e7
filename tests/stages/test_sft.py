"""train_full_sft.py: the assistant-only loss mask, packing that changes no sample's loss, batched generation and
its end-of-turn metric, bad input, and an end-to-end run that learns tiny generated chats."""
import json
import os
import random
import signal

import numpy as np
import pytest
import torch

import train_full_sft
from model import TinyMindConfig, TinyMindForCausalLM
from model.data.chat import SFTDataset, encode_chat
from model.data.packing import PackedDataset, packed_collate, pad_collate
from model.training.chat import held_out_prompts
from model.training.evaluation import chat_token_losses, end_of_turn_rate, generate_replies
from model.training.runtime import init_runtime
from tests import TOKENIZER, torchrun

THINGS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow", "rose": "red",
          "plum": "purple", "orange": "orange"}


def color_chat(rng: random.Random) -> dict:
    """A chat a nano model can learn in a few dozen steps: fixed facts, varied wording, 1-2 turns."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": "Answer in one short sentence."})
    for _ in range(rng.randint(1, 2)):
        thing = rng.choice(sorted(THINGS))
        question = rng.choice(["What color is the {}?", "Tell me the color of the {}.", "{} color?"]).format(thing)
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": f"The {thing} is {THINGS[thing]}."}]
    return {"conversations": messages}


def write_chats(path, count: int, seed: int):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(count):
            f.write(json.dumps(color_chat(rng), ensure_ascii=False) + "\n")


def nano_model(vocab_size: int, seed: int = 0) -> TinyMindForCausalLM:
    torch.manual_seed(seed)
    return TinyMindForCausalLM(TinyMindConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2)).eval()


# ================================================================================================ the loss mask


def render_by_hand(messages):
    """The ChatML text and the character spans the loss must cover (each assistant reply, its <think> block and
    its <|im_end|>), built here independently of the tokenizer's template."""
    text, spans = "", []
    for message in messages:
        if message["role"] != "assistant":
            text += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
            continue
        text += "<|im_start|>assistant\n"
        start = len(text)
        if message.get("reasoning_content"):
            text += f"<think>\n{message['reasoning_content']}\n</think>\n\n"
        text += message["content"] + "<|im_end|>"
        spans.append((start, len(text)))
        text += "\n"
    return text, spans


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer, tmp_path):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! 你好。", "reasoning_content": "a greeting; greet back"},
                {"role": "user", "content": "What is 2+2? Say <think> if unsure."},
                {"role": "assistant", "content": "4\nfour"},
                {"role": "user", "content": "谢谢"},
                {"role": "assistant", "content": "不客气"}]
    text, spans = render_by_hand(messages)
    assert tokenizer.apply_chat_template(messages, tokenize=False) == text  # reasoning_content is rendered, not lost
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    expected = [int(any(s <= a and b <= e for s, e in spans)) for a, b in encoded["offset_mapping"]]
    straddling = [(a, b) for a, b in encoded["offset_mapping"] if any(a < s < b or a < e < b for s, e in spans)]
    assert not straddling, "a token crosses an assistant-span boundary"

    ids, mask = encode_chat(tokenizer, messages)
    assert ids == encoded["input_ids"]
    assert mask == expected  # token by token
    eos = tokenizer.eos_token_id
    assert sum(1 for i, t in enumerate(ids) if t == eos and mask[i]) == 3  # every reply's <|im_end|> is trained

    # SFTDataset turns that mask into labels; the model shifts them, so position t learns token t+1.
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"conversations": messages}, ensure_ascii=False) + "\n", encoding="utf-8")
    item = SFTDataset(str(data), tokenizer, 512, show_progress=False)[0]
    assert item["input_ids"].tolist() == ids
    assert item["labels"].tolist() == [t if m else -100 for t, m in zip(ids, mask)]


def test_truncation_drop_or_keep_prefix(tokenizer, tmp_path):
    data = tmp_path / "long.jsonl"
    long_reply = " ".join(["word"] * 200)
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": "talk"},
                                                  {"role": "assistant", "content": long_reply}]}) + "\n"
                    + json.dumps(color_chat(random.Random(0))) + "\n", encoding="utf-8")
    dropped = SFTDataset(str(data), tokenizer, 64, truncation="drop", show_progress=False)
    assert len(dropped) == 1 and dropped.stats["dropped_too_long"] == 1
    kept = SFTDataset(str(data), tokenizer, 64, truncation="keep_prefix", show_progress=False)
    assert len(kept) == 2 and kept.stats["truncated"] == 1
    cut = kept[0]
    assert len(cut["input_ids"]) == 64 and tokenizer.eos_token_id not in cut["labels"].tolist()  # cut mid-reply


def test_tool_schemas_in_a_minimind_system_message_are_rendered_and_not_learned(tokenizer, tmp_path):
    # MiniMind's tool-calling chats put the schemas in the system message's "functions" field
    schema = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    messages = [{"role": "system", "content": "Be brief.", "functions": [schema]},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                  "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps({"conversations": messages}) + "\n", encoding="utf-8")
    item = SFTDataset(str(data), tokenizer, 512, show_progress=False)[0]
    text = tokenizer.decode(item["input_ids"])
    learned = tokenizer.decode([t for t in item["labels"].tolist() if t != -100])
    assert '"name": "get_weather", "parameters"' in text and "<tools>" in text  # the schema is in the prompt
    assert learned == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' \
                      'Sunny.<|im_end|>'


def test_held_out_split_is_random_disjoint_and_finds_its_conversations_again(tokenizer, tmp_path):
    data = tmp_path / "chats.jsonl"
    rows = [{"conversations": [{"role": "user", "content": f"question {i}"},
                               {"role": "assistant", "content": f"answer {i}"}]} for i in range(200)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    train = SFTDataset(str(data), tokenizer, 64, show_progress=False)
    val = train.split_held_out(0.05, seed=3)
    held_out_lines = val.line_numbers.tolist()
    assert len(val) == 10 and len(train) == 190
    assert not set(held_out_lines) & set(train.line_numbers.tolist()) and np.ptp(held_out_lines) > 10
    again = SFTDataset(str(data), tokenizer, 64, show_progress=False)
    assert again.split_held_out(0.05, seed=3).line_numbers.tolist() == held_out_lines  # the same on every rank
    prompts = held_out_prompts(str(data), 100, set(held_out_lines))
    assert [reference for _, reference in prompts] == [f"answer {n - 1}" for n in held_out_lines]
    assert [tokenizer.decode(val[i]["input_ids"]).count(f"answer {n - 1}<") for i, n in
            enumerate(val.line_numbers)] == [1] * 10


def test_chat_cache_is_the_same_from_one_or_two_processes_and_reused(tokenizer, tmp_path, monkeypatch):
    import model.data.chat as dataset_module
    data = tmp_path / "chats.jsonl"
    write_chats(data, 1200, seed=5)  # > 1 chunk of lines, so two workers really split it
    with open(data, "a") as f:
        f.write("{broken\n")
    single = SFTDataset(str(data), tokenizer, 128, skip_bad_lines=True, show_progress=False,
                        cache_dir=str(tmp_path / "c1"), num_proc=1)
    double = SFTDataset(str(data), tokenizer, 128, skip_bad_lines=True, show_progress=False,
                        cache_dir=str(tmp_path / "c2"), num_proc=2)
    assert len(single) == len(double) == 1200 and single.stats["bad_lines"] == double.stats["bad_lines"] == 1
    assert single.line_numbers.tolist() == double.line_numbers.tolist() == list(range(1, 1201))
    for i in (0, 1, 599, 1199):
        assert torch.equal(single[i]["input_ids"], double[i]["input_ids"])
        assert torch.equal(single[i]["labels"], double[i]["labels"])
    ids, _ = encode_chat(tokenizer, json.loads(open(data).readlines()[599])["conversations"])
    assert double[599]["input_ids"].tolist() == ids
    # opened again: read from the cache, not tokenized; without --skip_bad_lines the skipped line is an error
    monkeypatch.setattr(dataset_module, "build_chat_cache", lambda *a, **k: pytest.fail("rebuilt the cache"))
    assert len(SFTDataset(str(data), tokenizer, 64, skip_bad_lines=True, show_progress=False,
                          cache_dir=str(tmp_path / "c2"))) == len(single.lengths()[single.lengths() <= 64])
    with pytest.raises(Exception, match=rf"{data}:1201: not valid JSON"):
        SFTDataset(str(data), tokenizer, 128, show_progress=False, cache_dir=str(tmp_path / "c2"))


def test_a_failed_chat_cache_build_leaves_nothing_behind(tokenizer, tmp_path):
    data = tmp_path / "chats.jsonl"
    write_chats(data, 1100, seed=6)
    lines = open(data).read().splitlines()
    lines[700] = json.dumps({"conversations": [{"role": "bot", "content": "hi"}]})
    lines[1000] = "{broken"
    data.write_text("\n".join(lines) + "\n")
    for num_proc in (1, 2):
        cache_dir = tmp_path / f"cache{num_proc}"
        with pytest.raises(Exception, match=rf"{data}:701: message 0 has role 'bot'"):  # the first in the file
            SFTDataset(str(data), tokenizer, 128, show_progress=False, cache_dir=str(cache_dir), num_proc=num_proc)
        assert not list(cache_dir.iterdir())


def test_tokenizing_workers_drop_an_inherited_sigterm_handler(tokenizer):
    """A forked worker inherits the trainer's save-and-stop SIGTERM handler; kept, it makes Pool.terminate() (on
    a bad line) wait forever for a worker that ignores the signal. The suite once hung there."""
    import model.data.chat as dataset_module
    previous = (signal.signal(signal.SIGTERM, lambda *_: None), signal.getsignal(signal.SIGINT))
    try:
        dataset_module._init_tokenizing_worker(tokenizer)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


# ================================================================================================ packing


def test_packed_and_padded_batches_give_the_same_loss_per_sample(tokenizer, tmp_path):
    write_chats(tmp_path / "chats.jsonl", 24, seed=1)
    dataset = SFTDataset(str(tmp_path / "chats.jsonl"), tokenizer, 128, show_progress=False)
    model = nano_model(len(tokenizer))
    alone = []
    with torch.no_grad():
        for i in range(len(dataset)):
            losses, mask, _ = chat_token_losses(model, pad_collate([dataset[i]]))
            alone.append(losses.double().sum().item())
            assert mask.sum() > 0

        packed = PackedDataset(dataset, 128, seed=0)
        assert len(packed) < len(dataset) / 2  # several conversations really share a row
        losses, _, _ = chat_token_losses(model, packed_collate([packed[i] for i in range(len(packed))]))
        for row, members in enumerate(packed.bins):
            start = 0
            for index in members:
                n = len(dataset[index]["input_ids"])
                # positions start..start+n-2 predict this sample's tokens 1..n-1; position start+n-1 would predict
                # the next sample's <|im_start|>, whose label is -100, so nothing leaks across samples.
                torch.testing.assert_close(losses[row, start:start + n - 1].double().sum().item(), alone[index],
                                           rtol=1e-5, atol=1e-5)
                start += n
            assert losses[row, start - 1:].abs().sum() == 0

        padded, _, _ = chat_token_losses(model, pad_collate([dataset[i] for i in range(6)]))
        for i in range(6):
            torch.testing.assert_close(padded[i].double().sum().item(), alone[i], rtol=1e-5, atol=1e-5)


# ================================================================================================ generation


class ScriptedModel(torch.nn.Module):
    """Stands in for a model whose greedy replies are known: appends the given tokens to each prompt row."""

    def __init__(self, replies):
        super().__init__()
        self.replies, self.calls = replies, []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        self.calls.append((input_ids, attention_mask))
        rows = [(reply + [0] * max_new_tokens)[:max_new_tokens] for reply in self.replies[:len(input_ids)]]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_end_of_turn_rate_counts_only_replies_that_close_their_turn(tokenizer):
    runtime = init_runtime("cpu", "float32", 0)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    word = tokenizer.encode("fine", add_special_tokens=False)
    replies = [word + [eos], word * 8, word + [bos] + word + [eos], [eos]]
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a much longer question here"}],
               [{"role": "user", "content": "x"}], [{"role": "user", "content": "y"}]]
    model = ScriptedModel(replies)
    out = generate_replies(model, tokenizer, prompts, runtime, max_new_tokens=8)
    assert [r["ended_with_im_end"] for r in out] == [True, False, False, True]
    assert out[0]["text"] == "fine" and out[0]["tokens"] == len(word)
    assert end_of_turn_rate(out) == 0.5
    input_ids, attention_mask = model.calls[0]
    assert input_ids[0, 0] == tokenizer.pad_token_id and attention_mask[0, 0] == 0  # left padding
    assert attention_mask[1].all()


def test_batched_greedy_replies_match_one_at_a_time(tokenizer):
    runtime = init_runtime("cpu", "float32", 0, num_threads=1)
    model = nano_model(len(tokenizer), seed=3)
    prompts = [[{"role": "user", "content": "hi"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is the sky?"}],
               [{"role": "user", "content": "谢谢你"}]]
    batched = generate_replies(model, tokenizer, prompts, runtime, max_new_tokens=6)
    single = [generate_replies(model, tokenizer, [p], runtime, max_new_tokens=6)[0] for p in prompts]
    assert [r["text"] for r in batched] == [r["text"] for r in single]


# ================================================================================================ the script


def run_args(tmp_path, steps=40, extra=()):
    if not (tmp_path / "chats.jsonl").exists():
        write_chats(tmp_path / "chats.jsonl", 300, seed=0)
        write_chats(tmp_path / "chats_val.jsonl", 24, seed=1)
    return ["--data_path", str(tmp_path / "chats.jsonl"), "--tokenizer_path", TOKENIZER,
            "--save_dir", str(tmp_path / "out"), "--from_weight", "none", "--preset", "nano",
            "--max_steps", str(steps), "--batch_size", "4", "--max_seq_len", "128", "--learning_rate", "5e-3",
            "--log_interval", "10", "--eval_interval", "0", "--eval_prompts", "8", "--max_new_tokens", "12",
            "--dtype", "float32", "--num_threads", "1", "--device", "cpu", *extra]


def test_sft_lowers_held_out_assistant_loss(tmp_path, capsys):
    results = train_full_sft.main(run_args(tmp_path))
    before, after = results["before"], results["after"]
    assert after["val_loss"] < before["val_loss"] - 3.0, (before, after)
    assert after["end_of_turn_rate"] >= before["end_of_turn_rate"]
    assert (tmp_path / "out" / "full_sft_64.pth").exists()
    output = capsys.readouterr().out
    assert f"val_loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}" in output
    assert "packing:" in output and "rows of up to 128 tokens" in output


def test_data_without_a_val_file_holds_out_part_of_itself(tmp_path, capsys):
    write_chats(tmp_path / "sft_mini_512.jsonl", 300, seed=0)  # MiniMind's files come without a _val.jsonl
    args = run_args(tmp_path, steps=2, extra=["--val_fraction", "0.1"])
    args[args.index("--data_path") + 1] = str(tmp_path / "sft_mini_512.jsonl")
    results = train_full_sft.main(args)
    assert "30 of its conversations chosen at random (--val_fraction 0.1) are held out" in capsys.readouterr().out
    assert results["after"]["end_of_turn_rate"] is not None and (tmp_path / "out" / "full_sft_64.pth").exists()


def test_weights_remember_their_tokenizer_and_refuse_another(tmp_path):
    import shutil

    from model.checkpoint import load_weights
    from model.inference import load_model_for_inference
    own = tmp_path / "own_tokenizer"
    shutil.copytree(TOKENIZER, own, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    train_full_sft.main(run_args(tmp_path, steps=1, extra=["--tokenizer_path", str(own), "--eval_prompts", "0"]))
    _, config = load_weights(str(tmp_path / "out" / "full_sft_64.pth"))
    assert config.tokenizer_path == str(own) and len(config.tokenizer_digest) == 16
    loaded = load_model_for_inference(weight="full_sft", save_dir=str(tmp_path / "out"), hidden_size=64,
                                      device="cpu", verbose=False)
    assert os.path.samefile(loaded.tokenizer.name_or_path, own)  # chat finds the tokenizer without a flag
    other = tmp_path / "other_tokenizer"
    shutil.copytree(own, other)
    vocab = json.loads((own / "tokenizer.json").read_text(encoding="utf-8"))
    vocab["model"]["merges"] = vocab["model"]["merges"][::-1]  # same size, other ids: nothing else would notice
    (other / "tokenizer.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    args = run_args(tmp_path, steps=1, extra=["--tokenizer_path", str(other), "--eval_prompts", "0",
                                              "--save_weight", "again"])
    args[args.index("--from_weight") + 1] = "full_sft"
    args.remove("--preset"), args.remove("nano")
    with pytest.raises(SystemExit, match=f"was trained with the tokenizer in {own}/"):
        train_full_sft.main(args + ["--hidden_size", "64"])


def test_bad_line_is_reported_with_path_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    good = json.dumps(color_chat(random.Random(0)))
    data.write_text(good + "\n" + json.dumps({"conversations": [{"role": "bot", "content": "hi"}]}) + "\n")
    args = run_args(tmp_path, extra=["--val_data_path", str(tmp_path / "chats_val.jsonl")])
    args[args.index("--data_path") + 1] = str(data)
    with pytest.raises(SystemExit, match=rf"{data}:2: message 0 has role 'bot'"):
        train_full_sft.main(args)
    data.write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(SystemExit, match=rf"{data}:3: not valid JSON"):
        train_full_sft.main(args)


def test_missing_pretrained_weights_is_a_clear_error(tmp_path):
    args = run_args(tmp_path)
    args[args.index("--from_weight") + 1] = "pretrain"
    args.remove("--preset"), args.remove("nano")
    with pytest.raises(SystemExit, match="no 'pretrain' weights"):
        train_full_sft.main(args)


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_in_sync(tmp_path):
    args = run_args(tmp_path, steps=4)
    result = torchrun("train_full_sft.py", args, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ranks in sync: yes" in result.stdout and "x 2 ranks" in result.stdout
    assert "val_loss" in result.stdout and " -> " in result.stdout
