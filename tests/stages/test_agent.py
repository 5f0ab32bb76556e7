"""train_agent.py end to end on a nano model: it runs, saves, logs each reward component, resumes exactly, names a
bad prompt line by file:line, and the demo data it ships with is what train_full_sft.py and train_agent.py read
(held-out tasks never in a training file). scripts/eval_toolcall.py on the same checkpoint."""
import json
import os

import pytest
import torch

import train_agent
from model.tools import RESULT_PREFIX, result_value
from scripts import build_agent_data, eval_toolcall
from tests import ROOT, TOKENIZER, torchrun


def write_data(directory, rl_count=16, val_count=4):
    build_agent_data.main(["--out_dir", str(directory), "--sft_count", "8", "--short_count", "4",
                           "--rl_count", str(rl_count), "--val_count", str(val_count)])
    return directory / "demo_agent.jsonl"


def run_args(tmp_path, data, steps=2, extra=()):
    return ["--data_path", str(data), "--tokenizer_path", TOKENIZER, "--save_dir", str(tmp_path / "out"),
            "--preset", "nano", "--from_weight", "none", "--max_steps", str(steps), "--batch_size", "2",
            "--num_generations", "2", "--max_gen_len", "6", "--max_turns", "2", "--eval_samples", "2",
            "--eval_interval", "0", "--dtype", "float32", "--num_threads", "1", "--device", "cpu", *extra]


def read_log(tmp_path):
    with open(tmp_path / "out" / "logs" / "agent.jsonl") as f:
        return [json.loads(line) for line in f]


def even_ids_reward(tmp_path):
    """A reward that varies between random samples (the share of even token ids the policy generated), so the
    advantages are not all zero and the weights move: what an exact-resume check needs."""
    path = tmp_path / "r.py"
    path.write_text("def even_ids(prompts, completions, completion_ids, **kw):\n"
                    "    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]\n")
    return f"{path}:even_ids"


def test_runs_saves_and_logs_each_reward_component(tmp_path):
    data = write_data(tmp_path)
    result = train_agent.main(run_args(tmp_path, data))
    assert os.path.exists(result["weights"]) and result["weights"].endswith("agent_64.pth")
    records = [r for r in read_log(tmp_path) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for name in ("tool_format", "tool_args", "final_answer"):
        assert all(f"rewards/{name}/mean" in r for r in records)
    assert all({"reward", "turns", "completion_length"} <= r.keys() for r in records)
    evals = [r for r in read_log(tmp_path) if "eval/success" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert {"eval/well_formed", "eval/args_correct", "eval/called_tool"} <= evals[0].keys()
    assert set(result["before"]) >= {"success", "well_formed", "args_correct"}


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_in_sync(tmp_path):
    """Under torchrun each rank plays its share of the episodes; the update all-reduces, so the ranks' weights must
    stay identical (the trainer's checksum line) with a reward that differs between episodes."""
    data = write_data(tmp_path, rl_count=16)
    result = torchrun("train_agent.py", run_args(tmp_path, data, extra=["--reward_funcs",
                                                                        even_ids_reward(tmp_path)]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ranks in sync: yes" in result.stdout
    assert "x 2 ranks per rollout" in result.stdout
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == [1, 2]


def test_resume_continues_exactly(tmp_path):
    data = write_data(tmp_path, rl_count=12)
    flat = ["--reward_funcs", even_ids_reward(tmp_path), "--learning_rate", "1e-2", "--min_lr_ratio", "1.0",
            "--warmup_steps", "1", "--epochs", "2", "--eval_samples", "0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    train_agent.main(run_args(whole, data, steps=4, extra=flat))
    train_agent.main(run_args(split, data, steps=2, extra=flat))
    train_agent.main(run_args(split, data, steps=4, extra=flat + ["--from_resume", "1"]))
    expected, resumed = torch.load(whole / "out" / "agent_64.pth"), torch.load(split / "out" / "agent_64.pth")
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    rewards = {r["step"]: r["reward"] for r in read_log(whole) if "loss" in r}
    assert all(rewards[r["step"]] == r["reward"] for r in read_log(split) if "loss" in r)
    assert any(r["grad_norm"] > 0 for r in read_log(whole) if "loss" in r)  # the weights did move


@pytest.mark.parametrize("line, message", [
    ({"conversations": [{"role": "user", "content": "2 + 2?"}], "call": {"name": "calculator",
                                                                        "arguments": {"expression": "2 + 2"}}},
     'missing the "answer" field'),
    ({"conversations": [{"role": "user", "content": "2 + 2?"}], "answer": "4", "call": "calculator"},
     '"call" must be'),
    ({"conversations": "2 + 2?", "answer": "4"}, "conversation"),
])
def test_a_bad_prompt_line_is_named_by_file_and_line(tmp_path, line, message):
    data = write_data(tmp_path)
    lines = data.read_text().splitlines()
    lines.insert(2, json.dumps(line))
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match=rf"demo_agent.jsonl:3: .*{message}"):
        train_agent.main(run_args(tmp_path, data))
    # skipped and counted with --skip_bad_lines 1
    train_agent.main(run_args(tmp_path, data, steps=1, extra=["--skip_bad_lines", "1", "--eval_samples", "0"]))


def test_eval_toolcall_reports_the_same_metrics(tmp_path):
    data = write_data(tmp_path)
    result = train_agent.main(run_args(tmp_path, data, steps=1))
    out = tmp_path / "eval.json"
    results = eval_toolcall.main(["--weight", result["weights"], "--save_dir", str(tmp_path / "out"),
                                  "--data_path", str(tmp_path / "demo_agent_val.jsonl"), "--samples", "2",
                                  "--max_turns", "2", "--max_gen_len", "6", "--device", "cpu", "--dtype", "float32",
                                  "--output", str(out)])
    overall = results["agent_64"]["overall"]
    assert overall["episodes"] == 2
    for key in ("success", "well_formed", "args_correct", "called_tool"):
        assert overall[key] == pytest.approx(result["after"][key])  # greedy: the same episodes as training's eval
    assert json.loads(out.read_text())["agent_64"]["overall"] == overall
    episodes = results["agent_64"]["episodes"]
    assert sum(e["success"] for e in episodes) == pytest.approx(overall["success"] * len(episodes))
    # two checkpoints: the second against the first, task by task (a copy of the same weights: nothing differs)
    weights = tmp_path / "out" / "agent_64.pth"
    copy = tmp_path / "out" / "copy_64.pth"
    copy.write_bytes(weights.read_bytes())
    copy.with_suffix(".json").write_text(weights.with_suffix(".json").read_text())
    both = eval_toolcall.main(["--weight", str(weights), str(copy), "--data_path",
                               str(tmp_path / "demo_agent_val.jsonl"), "--samples", "2", "--max_turns", "2",
                               "--max_gen_len", "6", "--device", "cpu", "--dtype", "float32"])
    assert both["copy_64"]["against_first"] == {"newly_solved": 0, "newly_failed": 0, "mcnemar_p": 1.0}
    assert "against_first" not in both["agent_64"]


def test_eval_toolcall_compares_checkpoints_task_by_task():
    """Each checkpoint after the first: the tasks it alone solves, those only the first solves, the exact McNemar
    p (a binomial(n, 1/2) tail, two-sided), here against values worked by hand."""
    assert eval_toolcall.mcnemar_exact_p(5, 0) == pytest.approx(2 / 32)
    assert eval_toolcall.mcnemar_exact_p(13, 4) == pytest.approx(2 * (1 + 17 + 136 + 680 + 2380) / 2 ** 17)
    assert eval_toolcall.mcnemar_exact_p(3, 3) == 1.0 and eval_toolcall.mcnemar_exact_p(0, 0) == 1.0
    before = {"episodes": [{"success": s} for s in (True, False, False, True, False)]}
    after = {"episodes": [{"success": s} for s in (True, True, True, False, False)]}
    assert eval_toolcall.paired_comparison(before, after) == {
        "newly_solved": 2, "newly_failed": 1, "mcnemar_p": pytest.approx(1.0)}
    with pytest.raises(ValueError):  # episodes of different task lists are not comparable
        eval_toolcall.paired_comparison(before, {"episodes": after["episodes"][:4]})


def test_shipped_demo_data_is_deterministic_held_out_and_readable(tmp_path):
    """The generator reproduces the shipped files byte for byte; no held-out task is in a training file; the SFT
    chats render through the chat template with both assistant turns trained and the tool result not."""
    build_agent_data.main(["--out_dir", str(tmp_path)])
    for name in build_agent_data.FILES.values():
        with open(os.path.join(ROOT, "dataset", name), encoding="utf-8") as shipped:
            assert (tmp_path / name).read_text(encoding="utf-8") == shipped.read(), name

    def tasks(name):
        with open(os.path.join(ROOT, "dataset", name), encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        keys = set()
        for r in records:
            call = r.get("call") or next(m for m in r["conversations"] if m.get("tool_calls"))["tool_calls"][0]
            keys.add(build_agent_data.task_key(call["name"], call["arguments"]))
        return keys
    train = tasks("demo_agent_sft.jsonl") | tasks("demo_agent.jsonl")
    held = tasks("demo_agent_val.jsonl") | tasks("demo_agent_sft_val.jsonl")
    assert held and not train & held
    for name in build_agent_data.FILES.values():
        assert os.path.getsize(os.path.join(ROOT, "dataset", name)) < 3e6

    from transformers import AutoTokenizer

    from model.data.chat import encode_chat, template_inputs
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    with open(os.path.join(ROOT, "dataset", "demo_agent_sft.jsonl"), encoding="utf-8") as f:
        chat = json.loads(f.readline())["conversations"]
    messages, tools = template_inputs(chat)
    ids, mask = encode_chat(tokenizer, messages, tools=tools)
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert chat[3]["content"] == RESULT_PREFIX + result_value(chat[3]["content"])
    answer = result_value(chat[3]["content"])
    assert trained.startswith("<tool_call>\n{") and trained.endswith(f"The answer is {answer}.<|im_end|>")
    assert f"<|im_start|>tool\n{chat[3]['content']}<|im_end|>" not in trained


def test_guess_share_drops_the_call_from_that_share_of_calculator_chats_only(tmp_path):
    """--guess_share: the changed chats keep their question and final reply and lose the call and the tool's
    message; every other chat, and every other file, is the shipped one."""
    build_agent_data.main(["--out_dir", str(tmp_path), "--guess_share", "0.5", "--guess_seed", "3"])

    def read(folder, name):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    shipped = read(os.path.join(ROOT, "dataset"), "demo_agent_sft.jsonl")
    built = read(tmp_path, "demo_agent_sft.jsonl")
    assert len(built) == len(shipped)
    changed = [(old, new) for old, new in zip(shipped, built) if old != new]
    calculator = [chat for chat in shipped if build_agent_data.calls(chat, "calculator")]
    assert 0.4 < len(changed) / len(calculator) < 0.6
    for old, new in changed:
        assert build_agent_data.calls(old, "calculator") and not any(t.get("tool_calls") for t in new["conversations"])
        question = old["conversations"][1 if old["conversations"][0]["role"] == "system" else 0]
        assert new["conversations"][-2:] == [question, old["conversations"][-1]]
    for name in ("demo_agent_sft_val.jsonl", "demo_agent.jsonl", "demo_agent_val.jsonl"):
        assert read(tmp_path, name) == read(os.path.join(ROOT, "dataset"), name)
