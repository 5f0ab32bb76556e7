"""scripts/bench/: the SFT benchmark's padding shares are exact on a small case, the DPO benchmark's loss is DPO's
(ln 2 at step 0, live or precomputed reference), MiniMind's own trainer is timed from its log lines, and no benchmark
imports a stage script (train_*.py)."""
import contextlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
from model.data.preference import IndexedPairs, collate_pairs
from model.training.frozen import frozen_copy
from model.training.preference import precompute_reference_logps
from model.training.runtime import init_runtime
from scripts.bench import bench_dpo, bench_sft
from tests import ROOT

BENCHMARKS = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT, "scripts", "bench"))
                    if name.endswith(".py") and name != "__init__.py")


def test_padding_fractions_are_exact_on_a_small_case():
    fractions = bench_sft.padding_fractions([100, 100, 300, 12], max_seq_len=512, batch_size=2)
    assert fractions["pad_to_max_seq_len"] == pytest.approx(1 - 512 / 2048)
    assert fractions["packed"] == 0.0  # 512 tokens fill exactly one row
    assert fractions["conversations_per_row"] == 4.0
    demo_like = bench_sft.padding_fractions(np.random.default_rng(0).integers(20, 150, 2000), 512, 8)
    assert demo_like["packed"] < 0.05 < demo_like["pad_to_batch_max"] < demo_like["pad_to_max_seq_len"]


def test_minimind_like_lengths_stay_within_the_row():
    lengths = bench_sft.minimind_like_lengths(500, seed=1)
    assert lengths.min() >= 16 and lengths.max() <= 512
    assert 150 < np.median(lengths) < 250  # a log-normal with median 200


def test_dpo_benchmark_loss_is_ln2_at_step_0_with_either_reference():
    runtime = init_runtime("cpu", "float32", 0)
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=64, **PRESETS["nano"]))
    pairs = IndexedPairs(bench_dpo.random_pairs(4, 16, 64, torch.Generator().manual_seed(0)))
    batch = collate_pairs([pairs[i] for i in range(len(pairs))])
    table = precompute_reference_logps(model, pairs, runtime, batch_size=2)
    model.eval()  # no dropout: the policy must be exactly the reference function
    for reference, scores in ((frozen_copy(model), None), (None, table)):
        loss, _ = bench_dpo.make_loss_fn(reference, scores)(model, batch)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("optimizer", ["loop", "fused"])
def test_step_profile_puts_each_adamw_in_the_optimizer_row(optimizer):
    """profile_step attributes a loop AdamW's element-wise ops to the optimizer (by the region that ran them), and the
    rows it prints add up to the whole step."""
    shape = ["--hidden_size", "64", "--num_hidden_layers", "2", "--intermediate_size", "128", "--vocab_size", "256",
             "--batch_size", "2", "--seq_len", "32", "--warmup", "1", "--steps", "1", "--dtype", "float32",
             "--top", "500"]
    done = subprocess.run([sys.executable, "-m", "scripts.bench.profile_step", *shape, "--optimizer", optimizer],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {}
    for line in done.stdout.split("self time by kind:")[1].split("costliest")[0].splitlines()[1:-1]:
        name, share = line.rsplit("ms", 1)
        rows[name.rsplit(None, 1)[0].strip()] = float(share.strip().rstrip("%"))
    assert set(rows) >= {"matmul", "attention", "optimizer", "gradient clipping"}, rows
    assert sum(rows.values()) == pytest.approx(100, abs=0.5)
    assert rows["optimizer"] > 0
    assert ("aten::_fused_adamw_" in done.stdout.split("costliest")[1]) == (optimizer == "fused")


def test_no_benchmark_imports_a_stage_script():
    code = (f"import importlib, sys\nfor name in {BENCHMARKS!r}:\n"
            "    importlib.import_module('scripts.bench.' + name)\n"
            "print(sorted(m for m in sys.modules if m.startswith('train_')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


FAKE_MINIMIND_TRAINER = '''
import argparse, json, math, time
p = argparse.ArgumentParser()
for flag in ("data_path", "device", "dtype"):
    p.add_argument("--" + flag)
for flag in ("epochs", "batch_size", "max_seq_len", "hidden_size", "num_hidden_layers", "accumulation_steps",
             "log_interval", "save_interval", "num_workers"):
    p.add_argument("--" + flag, type=int)
a = p.parse_args()
iters = math.ceil(sum(1 for _ in open(a.data_path)) / a.batch_size)
for step in range(1, iters + 1):
    time.sleep(0.05)
    print(f"Epoch:[1/1]({step}/{iters}), loss: 8.0, logits_loss: 8.0, aux_loss: 0.0, lr: 0.0005, epoch_time: 0.0min")
'''


def test_minimind_run_is_timed_from_its_step_lines(tmp_path):
    """The plumbing that runs MiniMind's own trainer (a stand-in that prints its log format here; the benchmark in
    docs/benchmarks.md ran the real one): shape read from its config, steps timed between its log lines, useful
    tokens counted the way its dataset pads."""
    import shutil
    from scripts.bench import bench_train
    minimind = tmp_path / "minimind"
    for folder in ("trainer", "model", "dataset"):
        (minimind / folder).mkdir(parents=True)
    (minimind / "trainer" / "train_pretrain.py").write_text(FAKE_MINIMIND_TRAINER)
    (minimind / "model" / "model_minimind.py").write_text(
        "class MiniMindConfig:\n    def __init__(self, hidden_size, num_hidden_layers):\n"
        "        self.num_attention_heads, self.num_key_value_heads, self.vocab_size = 8, 4, 6400\n"
        "        self.intermediate_size, self.rope_theta = 1664, 1e6\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ROOT, "model", name), minimind / "model" / name)
    shape = bench_train.minimind_config(str(minimind), 512, 8)
    assert shape["num_key_value_heads"] == 4 and shape["intermediate_size"] == 1664
    args = type("Args", (), dict(warmup=1, steps=3, batch_size=2, seq_len=16, minimind_workers=0))()
    texts = ["短", "一段比较长的文字" * 10, "中等长度的句子。", "x", "y" * 40, "z", "w", "v"]
    config = TinyMindConfig(**{**PRESETS["nano"], "hidden_size": 512, "num_hidden_layers": 8})
    result = bench_train.run_minimind(str(minimind), texts, config, args, torch.device("cpu"))
    useful, total = bench_train.minimind_useful_tokens(texts, os.path.join(ROOT, "model"), 2, 16, 1, 4)
    assert total == 3 * 2 * 15 and 0 < useful < total
    assert result["pad_fraction"] == pytest.approx(1 - useful / total)
    assert 3 * 2 * 15 / 0.05 / 3 > result["all_tok_s"] > 0  # three sleeps of 50 ms at least
    assert not (minimind / "out").exists()  # the checkout is never written to


@pytest.mark.parametrize("question, reply, kind", [
    ("Find 17 + 8.", "solve: 17 + 8\nones: 7 + 8 = 15\ntens: 1 + 0 + 1 = 2\n</think>\n<answer>\n25\n</answer>",
     "correct"),
    ("Mia has 2 books and gets 13 more.", "solve: 2 + 11\nones: 2 + 1 = 3\ntens: 0 + 1 + 0 = 1\n</think>\n<answer>\n"
     "13\n</answer>", "copy"),
    ("请问 15 - 11 等于多少？", "solve: 15 + 11\nones: 5 + 1 = 6\ntens: 1 + 1 + 0 = 2\n</think>\n<answer>\n26\n"
     "</answer>", "operation"),
    ("Find 13 - 5.", "solve: 13 - 5\nones: 3 - 5 = 8\ntens: 1 - 0 - 1 = 0\n</think>\n<answer>\n6\n</answer>", "ones"),
    ("Find 13 - 5.", "solve: 13 - 5\nones: 13 - 5 = 8\ntens: 1 - 0 - 0 = 1\n</think>\n<answer>\n18\n</answer>",
     "tens"),
    ("Find 6 + 17.", "solve: 6 + 17\nones: 6 + 7 = 13\ntens: 0 + 1 + 1 = 2\n</think>\n<answer>\n22\n</answer>",
     "join"),
    ("Find 6 + 17.", "<answer>\n22\n</answer>", "malformed"),
    ("Find 36 + 17.", "solve: 36 + 17\n</think>\n<answer>\n53\n</answer>", "correct"),
    ("Find 36 + 17.", "solve: 36 + 17\n</think>\n<answer>\n43\n</answer>", "skipped"),
])
def test_sum_errors_names_the_first_wrong_step(question, reply, kind):
    from scripts.bench.sum_errors import classify
    assert classify(question, "<think>\n" + reply if reply.startswith("solve") else reply) == kind


def test_sum_errors_tells_worked_replies_from_quick_ones():
    from scripts.bench.sum_errors import shape
    assert shape("<think>\nsolve: 6 + 17\nones: 6 + 7 = 13\ntens: 0 + 1 + 1 = 2\n</think>\n<answer>\n23\n</answer>") \
        == "worked"
    assert shape("<think>\nsolve: 6 + 17\n</think>\n<answer>\n23\n</answer>") == "quick"
    assert shape("<think>\n6 + 17\n</think>\n<answer>\n23\n</answer>") == "other"


def test_sum_errors_sampled_pass_at_1_is_the_mean_over_samples_and_pass_at_k_any(monkeypatch):
    """Two prompts, four samples each: the first right 3 times, the second never -> pass@1 3/8, pass@4 1/2."""
    import types

    from scripts.bench import sum_errors
    right = "<think>\nsolve: 17 + 8\n</think>\n<answer>\n25\n</answer>"
    wrong = right.replace("25", "24")
    calls = []

    def fake_rollout(model, tokenizer, batch, num_generations, config, device):
        calls.append((len(batch), num_generations, config.do_sample))
        texts = [[right, right, wrong, right], [wrong] * 4]
        return types.SimpleNamespace(texts=[t for i in range(len(batch)) for t in texts[i]])

    monkeypatch.setattr(sum_errors, "generate_rollout", fake_rollout)
    items = [{"prompt": [{"role": "user", "content": q}]} for q in ("Find 17 + 8.\nThink...", "Find 1 + 2.")]
    tokenizer = types.SimpleNamespace(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    runtime = types.SimpleNamespace(device="cpu", autocast=contextlib.nullcontext)
    args = types.SimpleNamespace(samples=4, temperature=0.7, seed=0, max_gen_len=8, batch_size=8)
    assert sum_errors.sampled_accuracy(None, tokenizer, items, args, runtime) == (3 / 8, 1 / 2)
    assert calls == [(2, 4, True)]  # both prompts in one batched call, sampled


def test_steps_reward_scores_the_share_of_right_steps():
    from scripts.bench.sum_errors import steps_reward
    prompt = [[{"role": "user", "content": "Find 17 + 8.\nThink inside <think></think>."}]]
    right = "<think>\nsolve: 17 + 8\nones: 7 + 8 = 15\ntens: 1 + 0 + 1 = 2\n</think>\n<answer>\n25\n</answer>"
    ones_wrong = right.replace("7 + 8 = 15", "7 + 8 = 14").replace("25", "24")  # the answer follows its lines
    assert steps_reward(prompt * 3, [[{"role": "assistant", "content": right}], ones_wrong, "no steps"]) == \
        [1.0, 0.8, 0.0]


def test_two_digit_sums_works_each_sum_once_and_keeps_grpo_and_held_out_sums_apart(tmp_path):
    """The docs' experiment data: every reasoning sum worked once, GRPO's sums never worked, held-out sums in no
    training file, and the shipped file's other examples kept."""
    import json
    import re

    from scripts.bench.sum_errors import prompt_sum
    from scripts.bench.two_digit_sums import build, is_two_operand_sum
    counts = build(tmp_path, reason_sums=300, grpo_prompts=200, val_prompts=50, seed=1)

    def read(name):
        return [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]

    worked = [re.match(r"<think>\nsolve: (\d+ [+-] \d+)", s["conversations"][-1]["content"])[1]
              for s in read("demo_reason") if is_two_operand_sum(s)]
    assert len(worked) == len(set(worked)) == 300
    assert counts["reasoning examples"] == 300 + counts["kept from the shipped file"] > 1000

    def asked(name):
        return {"{} {} {}".format(*prompt_sum(s["conversations"][0]["content"].split("\n")[0])) for s in read(name)}

    grpo, held_out = asked("demo_grpo"), asked("demo_grpo_val")
    assert len(grpo) == 200 and len(held_out) == 50
    assert not grpo & set(worked) and not held_out & (grpo | set(worked))
    assert all(max(int(n) for n in s.split()[::2]) >= 20 for s in held_out)


def test_two_digit_sums_quick_sums_skip_the_steps_on_other_sums_and_leave_the_other_files_alone(tmp_path):
    """--quick_sums adds replies that restate the sum and answer at once, on sums no other file holds; the GRPO and
    held-out prompts and the worked replies are those of a build without them."""
    import json
    import re

    from scripts.bench.sum_errors import prompt_sum, shape
    from scripts.bench.two_digit_sums import build
    build(tmp_path / "plain", reason_sums=300, grpo_prompts=200, val_prompts=50, seed=1)
    build(tmp_path / "quick", reason_sums=300, grpo_prompts=200, val_prompts=50, seed=1, quick_sums=120)

    def read(folder, name):
        return (tmp_path / folder / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()

    for name in ("demo_grpo", "demo_grpo_val", "demo_reason_val"):
        assert read("plain", name) == read("quick", name)
    added = sorted(set(read("quick", "demo_reason")) - set(read("plain", "demo_reason")))
    assert sorted(read("quick", "demo_reason")) == sorted(read("plain", "demo_reason") + added)
    replies = [json.loads(line)["conversations"][-1]["content"] for line in added]
    assert len(added) == 120 and all(shape(reply) == "quick" for reply in replies)
    quick = {re.match(r"<think>\nsolve: (\d+ [+-] \d+)\n", reply)[1] for reply in replies}
    elsewhere = {"{} {} {}".format(*prompt_sum(json.loads(line)["conversations"][0]["content"].split("\n")[0]))
                 for name in ("demo_grpo", "demo_grpo_val") for line in read("plain", name)}
    worked = {m[1] for line in read("plain", "demo_reason")
              if (m := re.search(r"<think>\\nsolve: (\d+ [+-] \d+)\\n", line))}
    assert len(quick) == 120 and not quick & (elsewhere | worked) and len(worked) == 300
    assert {sum_.split()[1] for sum_ in quick} == {"+", "-"}
    build(tmp_path / "adds", reason_sums=300, grpo_prompts=200, val_prompts=50, seed=1, quick_sums=120, quick_op="+")
    assert read("adds", "demo_grpo_val") == read("plain", "demo_grpo_val")
    quick_adds = [re.search(r"<think>\\nsolve: \d+ ([+-]) \d+\\n</think>", line)
                  for line in read("adds", "demo_reason")]
    assert [m[1] for m in quick_adds if m] == ["+"] * 120


def test_lora_forgetting_splits_the_same_loss_train_lora_reports(tmp_path, capsys):
    """The split sums back to the general held-out loss train_lora.py measures (assistant_token_loss), before and
    after a (random) adapter; each chat lands in its kind."""
    import json
    import re

    from transformers import AutoTokenizer

    from model.checkpoint import save_weights
    from model.data.chat import SFTDataset
    from model.lora import apply_lora, save_lora
    from model.training.evaluation import assistant_token_loss
    from scripts.bench import lora_forgetting
    from tests import TOKENIZER
    chats = [[{"role": "user", "content": "Find 3 + 4."}, {"role": "assistant", "content": "<think>\nx\n</think>"}],
             [{"role": "user", "content": "“床前明月光”的下一句是什么？"},
              {"role": "assistant", "content": "疑是地上霜"}],
             [{"role": "user", "content": "In Hamlet, what is the line after \"To be\"?"},
              {"role": "assistant", "content": "The next line is: or not to be"}],
             [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好呀"}],
             [{"role": "user", "content": "can you write a stack in Python?"}, {"role": "assistant", "content": "No."}]]
    assert [lora_forgetting.kind_of(c) for c in chats] == lora_forgetting.KINDS
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n" for c in chats))
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=6400, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2))
    save_weights(model, str(tmp_path / "full_sft_64.pth"))
    apply_lora(model, r=4, verbose=False)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    (tmp_path / "lora").mkdir()
    save_lora(model, str(tmp_path / "lora" / "probe_64.pth"))
    lora_forgetting.main(["--save_dir", str(tmp_path), "--lora_name", "probe", "--hidden_size", "64",
                          "--general_val_path", str(val)])
    printed = capsys.readouterr().out
    before, after = map(float, re.search(r"loss (\S+) -> (\S+) \(", printed).groups())
    runtime = init_runtime("cpu", "float32", num_threads=1)
    dataset = SFTDataset(str(val), AutoTokenizer.from_pretrained(TOKENIZER), 512, show_progress=False)
    measured = assistant_token_loss(model.eval(), dataset, runtime, 2, 512)
    assert after == pytest.approx(measured, abs=2e-4)
    model_without = TinyMindForCausalLM(model.config)
    model_without.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items()
                                   if "lora_" not in k})
    assert before == pytest.approx(assistant_token_loss(model_without.eval(), dataset, runtime, 2, 512), abs=2e-4)
    assert before != pytest.approx(after, abs=1e-3)
    assert all(f"| {kind} | 1 |" in printed for kind in lora_forgetting.KINDS)


def test_agent_copy_tells_a_model_that_reads_its_tool_from_one_that_does_not():
    """Scripted models on the shipped held-out agent chats: one that repeats the tool message follows every swapped
    result; one that always answers the data's true result never does."""
    import re
    import types

    from transformers import AutoTokenizer

    from scripts.bench import agent_copy
    from tests import TOKENIZER
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    chats = agent_copy.read_chats(os.path.join(ROOT, "dataset", "demo_agent_sft_val.jsonl"))
    swapped = agent_copy.swapped_results(chats, seed=0)
    assert all(other is not None for other in swapped)

    def scripted(answer_of):
        def generate(x, **kwargs):
            text = tokenizer.decode(x[0].tolist(), skip_special_tokens=False)
            tool = re.findall(r"<\|im_start\|>tool\n(.*?)<\|im_end\|>", text, re.DOTALL)[-1]
            reply = tokenizer.encode(f"The answer is {answer_of(tool, text)}.", add_special_tokens=False)
            return torch.cat([x, torch.tensor([reply + [tokenizer.eos_token_id]])], dim=1)
        return types.SimpleNamespace(model=types.SimpleNamespace(generate=generate), tokenizer=tokenizer,
                                     device=torch.device("cpu"))

    from model.tools import result_value
    reader = agent_copy.measure(scripted(lambda tool, text: result_value(tool)), chats, swapped, 24, 0)["all"]
    assert reader["right_result_answered"] == reader["chats"] == reader["follows_tool"] == len(chats) == 120
    truth = {c["messages"][1]["content"]: result_value(c["result"]) for c in chats}
    knower = agent_copy.measure(scripted(lambda tool, text: next(r for q, r in truth.items() if q in text)),
                                chats, swapped, 24, 0)["all"]
    assert knower["right_result_answered"] == knower["true_answer"] == 120 and "follows_tool" not in knower


def test_attention_bench_times_each_shape_both_ways(capsys):
    from scripts.bench import bench_attention
    assert bench_attention.time_attention(torch.float32, 2, 1, 8, 4, 2, 8, backward=False, repeats=2) > 0
    bench_attention.main(["--rounds", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "as fast" in line]
    assert [line.split(":")[0] for line in lines] == ["decode", "decode", "training"]


@pytest.mark.parametrize("stage", ["grpo", "ppo", "agent"])
def test_rl_seeds_passes_each_stage_only_flags_it_knows(stage):
    """The flags rl_seeds adds to every run parse with the stage script's own parser (--show_completions is GRPO's
    and PPO's; the agent's is --show_episodes)."""
    import importlib

    from scripts.bench import rl_seeds
    script = importlib.import_module(rl_seeds.STAGES[stage][0].removesuffix(".py"))
    args = script.parse_args(["--eval_interval", "5", *rl_seeds.QUIET[stage]])
    assert args.eval_interval == 5
