"""train_grpo.py, model/training/rollouts.py and rewards.py: left-padded cached rollouts, completion masks, reward
functions (built-in, custom by path, reward model), zero advantage for equal rewards, the ratio at one iteration, the
loss normaliser under gradient accumulation, exact resume, SIGTERM, and a short GRPO run that raises the reward of a
toy task."""
import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from transformers import GenerationConfig

import train_grpo
from model import TinyMindConfig, TinyMindForCausalLM
from model.checkpoint import save_weights
from model.data.chat import encode_chat
from model.training import rewards as R
from model.training import rollouts
from model.training.losses import group_advantages
from model.training.runtime import init_runtime
from model.training.trainer import Trainer
from tests import ROOT, TOKENIZER, torchrun

EOS = 2


def nano_model(seed=0, sharpen=4.0) -> TinyMindForCausalLM:
    """A random nano model; `sharpen` scales its weights so greedy choices are far from ties (a near-tie could flip
    on float rounding and make two correct implementations disagree)."""
    torch.manual_seed(seed)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=6400, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(sharpen)
    return model.eval()


def prompt_items(tokenizer, questions, **columns):
    from model.data.chat import encode_prompt
    items = []
    for i, q in enumerate(questions):
        messages = [{"role": "user", "content": q}]
        items.append({"prompt": messages, "prompt_ids": encode_prompt(tokenizer, messages),
                      "columns": {k: v[i] for k, v in columns.items()}})
    return items


def greedy(max_new_tokens=12, **kwargs):
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=EOS,
                            **kwargs)


def run_args(tmp_path, data, steps=2, extra=()):
    return ["--data_path", str(data), "--tokenizer_path", TOKENIZER, "--save_dir", str(tmp_path / "out"),
            "--preset", "nano", "--from_weight", "none", "--max_steps", str(steps), "--batch_size", "2",
            "--num_generations", "4", "--max_gen_len", "8",
            "--eval_samples", "4", "--eval_interval", "0", "--dtype", "float32", "--num_threads", "1",
            "--device", "cpu", *extra]


def write_prompts(path, count=16, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            a, b = rng.randrange(10), rng.randrange(10)
            f.write(json.dumps({"conversations": [{"role": "user", "content": f"{a} + {b} = ?"}],
                                "answer": str(a + b), "id": i}) + "\n")
    return path


def read_log(tmp_path, name="grpo"):
    with open(tmp_path / "out" / "logs" / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f]


# ============================================================================================== rollouts and masks


def test_completion_mask_stops_after_the_first_im_end():
    ids = torch.tensor([[5, 6, EOS, 7, EOS],
                        [5, EOS, 0, 0, 0],
                        [5, 6, 7, 8, 9],  # never ends: truncated, every token counts
                        [EOS, 5, 5, 5, 5]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert torch.equal(rollouts.completion_mask_from_ids(ids, EOS), expected)


def test_rollout_texts_end_before_im_end_and_keep_think_tags(tokenizer):
    ids = tokenizer("<think>\nx\n</think>\n<answer>\n3\n</answer>", add_special_tokens=False)["input_ids"]
    completion = torch.tensor([ids + [EOS, 7, 8], ids[:3] + [9] * (len(ids) - 3 + 3)])
    mask = rollouts.completion_mask_from_ids(completion, EOS)
    texts = rollouts.decode_completions(tokenizer, completion, mask, EOS)
    assert texts[0] == "<think>\nx\n</think>\n<answer>\n3\n</answer>"
    assert mask[0].sum() == len(ids) + 1 and mask[1].sum() == completion.shape[1]


def test_left_padded_cached_rollout_equals_uncached_and_one_by_one(tokenizer):
    model = nano_model()
    items = prompt_items(tokenizer, ["1 + 2 = ?", "Tom has 15 apples and gets 4 more. How many apples now?",
                                     "你好", "19 - 7 = ?"])
    batched = rollouts.generate_rollout(model, tokenizer, items, 2, greedy(), "cpu")
    assert batched.prompt_mask[:, 0].tolist().count(0) >= 4, "the prompts should need left padding"
    uncached = rollouts.generate_rollout(model, tokenizer, items, 2, greedy(use_cache=False), "cpu")

    def rows(rollout):
        return [ids[:n] for ids, n in zip(rollout.completion_ids.tolist(), rollout.completion_mask.sum(1).tolist())]

    assert rows(batched) == rows(uncached)
    one_by_one = [row for item in items
                  for row in rows(rollouts.generate_rollout(model, tokenizer, [item], 1, greedy(), "cpu")) * 2]
    assert rows(batched) == one_by_one
    assert len({tuple(r) for r in one_by_one}) > 1, "different prompts should give different completions"

    # The update's log-probs (one forward over left-padded prompt + completion) equal the unpadded ones.
    logps, _ = rollouts.completion_logprobs(model, batched, temperature=0.7)
    for i in range(0, len(batched), 2):
        alone = rollouts.generate_rollout(model, tokenizer, [items[i // 2]], 1, greedy(), "cpu")
        single, _ = rollouts.completion_logprobs(model, alone, temperature=0.7)
        n = int(alone.completion_mask.sum())
        torch.testing.assert_close(logps[i, :n], single[0, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logps[i + 1, :n], single[0, :n], atol=1e-5, rtol=1e-5)


def test_logprobs_are_those_of_the_tempered_distribution(tokenizer):
    model = nano_model(sharpen=1.0)
    items = prompt_items(tokenizer, ["1 + 2 = ?", "你好呀"])
    rollout = rollouts.generate_rollout(model, tokenizer, items, 1, greedy(max_new_tokens=5), "cpu")
    logps, _ = rollouts.completion_logprobs(model, rollout, temperature=0.5)
    full = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    logits = model(full, attention_mask=mask).logits[:, rollout.prompt_ids.shape[1] - 1:-1]
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, rollout.completion_ids[..., None])[..., 0]
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=1e-5)


# ============================================================================================== reward functions


def conversational(*texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


def test_format_rewards_strict_soft_and_tag_count():
    good = "<think>\n1 + 2 = 3.\n</think>\n<answer>\n3\n</answer>"
    no_newlines = "<think>1 + 2 = 3.</think> <answer>3</answer>"
    chatty = "Sure! <think>\nadd\n</think>\n<answer>\n3\n</answer> Hope that helps."
    twice = good + "\n<answer>\n4\n</answer>"
    reversed_order = "<answer>\n3\n</answer>\n<think>\nadd\n</think>"
    unclosed = "<think>\n1 + 2 = 3.\n</think>\n<answer>\n3"
    completions = conversational(good, no_newlines, chatty, twice, reversed_order, unclosed)
    assert R.format_reward(None, completions) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert R.soft_format_reward(None, completions) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    assert R.tag_count_reward(None, completions) == [1.0, 1.0, 1.0, 0.5, 1.0, 0.75]
    assert R.format_reward(None, [good, chatty]) == [1.0, 0.0]  # plain-text completions work too


@pytest.mark.parametrize("predicted, reference, match", [
    ("12", "12", True), ("12.0", "12", True), ("12.50", "12.5", True), ("1,000", "1000", True),
    ("1,000.0", "1000", True), ("+7", "7", True), ("-3", "-3", True), ("1/2", "0.5", True),
    ("\\frac{1}{2}", "0.5", True), ("$\\boxed{7}$", "7", True), ("7。", "7", True), ("１２", "12", True),
    ("13", "12", False), ("12.01", "12", False), ("1,00", "100", False), ("-12", "12", False),
    ("Paris.", "paris", True), ("C(10, 5)", "C(10,5)", False), ("", "0", False), (None, "3", False),
])
def test_answers_match_normalises_numbers(predicted, reference, match):
    assert R.answers_match(predicted, reference) is match


def test_answer_reward_reads_the_last_answer_block():
    completions = conversational("<think>\n6 + 6\n</think>\n<answer>\n12.0\n</answer>",
                                 "<answer>11</answer> no wait <answer> 1,2 </answer>",
                                 "<answer>5</answer><answer>12</answer>",
                                 "The answer is 12.",  # no answer block: no credit
                                 "<answer>\n13\n</answer>")
    assert R.answer_reward(None, completions, answer=["12"] * 5) == [1.0, 0.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match='needs an "answer" field'):
        R.answer_reward(None, completions)


def test_weighted_sum_skips_functions_that_do_not_apply():
    def sometimes(prompts, completions, **kwargs):
        return [None, 2.0]

    table = R.score([R.format_reward, sometimes], [None, None], conversational("x", "y"), [[1], [2]], {})
    assert torch.isnan(table[0, 1]) and table[1, 1] == 2.0
    assert R.combine(table, [0.5, 1.0]).tolist() == [0.0, 2.0]


CUSTOM_REWARDS = '''
calls = []

def brevity(prompts, completions, completion_ids, **kwargs):
    """Shorter is better; records what it was given."""
    calls.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **kwargs})
    return [1.0 / len(ids) for ids in completion_ids]
'''


def test_custom_reward_loads_by_path_and_receives_dataset_columns(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_for_test.py").write_text(CUSTOM_REWARDS)
    by_file = R.load_reward_function(f"{tmp_path / 'my_rewards_for_test.py'}:brevity")
    assert by_file(None, ["a"], [[1, 2]]) == [0.5]
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_prompts(tmp_path / "sums.jsonl")
    train_grpo.main(run_args(tmp_path, data, steps=1,
                             extra=["--reward_funcs", "answer,my_rewards_for_test:brevity", "--reward_weights", "1,2"]))
    import my_rewards_for_test
    call = my_rewards_for_test.calls[0]  # the first training rollout (evaluation scores one completion per prompt)
    n = len(call["completions"])
    assert n == 2 * 4 and len(call["answer"]) == len(call["id"]) == len(call["prompts"]) == n
    assert call["answer"][0:4] == [call["answer"][0]] * 4, "a prompt's columns are repeated for its G completions"
    assert call["prompts"][0][-1]["role"] == "user"
    assert call["completions"][0][0]["role"] == "assistant"
    assert all(isinstance(i, int) for ids in call["completion_ids"] for i in ids)
    log = [r for r in read_log(tmp_path) if "reward" in r]
    assert "rewards/brevity/mean" in log[0] and "rewards/answer/mean" in log[0]
    expected = log[0]["rewards/answer/mean"] + 2 * log[0]["rewards/brevity/mean"]
    assert log[0]["reward"] == pytest.approx(expected, rel=1e-5)


def test_bad_reward_settings_are_clear_errors(tmp_path):
    data = write_prompts(tmp_path / "sums.jsonl")
    with pytest.raises(SystemExit, match="unknown reward function 'acurracy'"):
        train_grpo.main(run_args(tmp_path, data, extra=["--reward_funcs", "acurracy"]))
    with pytest.raises(SystemExit, match="has 1 values for 2 reward functions"):
        train_grpo.main(run_args(tmp_path, data, extra=["--reward_weights", "1"]))
    with pytest.raises(SystemExit, match="needs --reward_model"):
        train_grpo.main(run_args(tmp_path, data, extra=["--reward_funcs", "reward_model"]))
    no_answer = tmp_path / "open.jsonl"
    no_answer.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(SystemExit, match='needs an "answer" field on every line'):
        train_grpo.main(run_args(tmp_path, no_answer))


def test_reward_model_scores_with_the_last_token_logit(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    functions, names, weights = R.build_reward_functions(["answer"], [1.0], reward_model=str(tmp_path / "rm"))
    assert names == ["answer", "reward_model"] and weights == [1.0, 1.0]
    scorer = functions[1]
    prompts = [[{"role": "user", "content": "Write a line about the moon."}]] * 2
    completions = conversational("The moon is bright tonight.", "moon")
    scores = scorer(prompts, completions)
    for prompt, completion, got in zip(prompts, completions, scores):
        text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert got == pytest.approx(scorer.model(ids).logits[0, 0].item(), abs=1e-5)
    assert scores[0] != scores[1]


def test_our_checkpoint_with_a_value_head_scores_the_last_real_token(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               num_key_value_heads=1, intermediate_size=64,
                                               vocab_size=len(tokenizer))).eval()
    path = str(tmp_path / "rm_32.pth")
    save_weights(model, path)
    head = torch.nn.Linear(32, 1)
    torch.save({**torch.load(path, weights_only=True), "score.weight": head.weight.detach(),
                "score.bias": head.bias.detach()}, path)
    functions, names, _ = R.build_reward_functions(["reward_model"], None, reward_model=path)
    scorer = functions[0]
    prompts = [[{"role": "user", "content": "Write a line about the moon."}]] * 2
    completions = conversational("The moon is bright tonight, and the sea is calm below it.", "moon")
    scores = scorer(prompts, completions)  # rows of different lengths: the shorter one is right-padded
    for prompt, completion, got in zip(prompts, completions, scores):
        text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = head(model.model(ids)[0][0, -1]).item()
        assert got == pytest.approx(expected, abs=1e-5)
    assert scores[0] != scores[1]
    torch.save(model.state_dict(), path)  # no head: a clear error
    with pytest.raises(ValueError, match="no value head"):
        R.build_reward_functions(["reward_model"], None, reward_model=path)


# ============================================================================================== advantages and loss


def constant_reward(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def test_equal_rewards_give_zero_advantage_and_zero_gradient_end_to_end(tokenizer):
    model = nano_model(sharpen=1.0)
    items = prompt_items(tokenizer, ["1 + 2 = ?", "3 + 4 = ?"], answer=["3", "7"])
    sampling = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.0, top_k=0, pad_token_id=0,
                                eos_token_id=EOS)
    torch.manual_seed(0)
    rollout = rollouts.generate_rollout(model, tokenizer, items, 4, sampling, "cpu")
    args = train_grpo.parse_args(["--loss_type", "grpo"])
    rewards = R.combine(rollouts.score_rollout(rollout, [constant_reward]), [1.0])
    rollout.advantages = group_advantages(rewards, 4, args.scale_rewards)
    assert torch.equal(rollout.advantages, torch.zeros(8))
    model.train()
    for loss_type in ("grpo", "dapo", "dr_grpo", "cispo"):
        args.loss_type = loss_type
        loss, _ = train_grpo.policy_loss(model, rollout, args)
        model.zero_grad()
        loss.backward()
        assert loss.item() == 0.0
        assert all(p.grad is None or not p.grad.any() for p in model.parameters()), loss_type
    # ...whereas rewards that differ within a group do move the model
    rollout.advantages = group_advantages(torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2]), 4, "group")
    loss, _ = train_grpo.policy_loss(model, rollout, args)
    model.zero_grad()
    loss.backward()
    assert any(p.grad is not None and p.grad.any() for p in model.parameters())


def test_equal_rewards_leave_the_weights_unchanged(tmp_path):
    """Through main(): every group has equal rewards, so every step's gradient is exactly zero and AdamW (no
    weight decay) does not move the weights at all."""
    data = write_prompts(tmp_path / "sums.jsonl")
    module = tmp_path / "constant.py"
    module.write_text("def one(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n")
    start = str(tmp_path / "start.pth")
    save_weights(nano_model(sharpen=1.0), start)
    train_grpo.main(run_args(tmp_path, data, steps=3, extra=["--from_weight", start, "--reward_funcs",
                                                             f"{module}:one", "--learning_rate", "1e-2"]))
    records = [r for r in read_log(tmp_path) if "loss" in r]
    assert [r["grad_norm"] for r in records] == [0.0] * 3 and all(r["frac_reward_zero_std"] == 1 for r in records)
    before, after = torch.load(start), torch.load(tmp_path / "out" / "grpo_64.pth")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_one_iteration_has_ratio_one_and_no_clipping_more_iterations_do_not(tmp_path):
    data = write_prompts(tmp_path / "sums.jsonl", count=32)
    common = ["--reward_funcs", f"{tmp_path / 'r.py'}:even_ids", "--learning_rate", "3e-2"]
    (tmp_path / "r.py").write_text("def even_ids(prompts, completions, completion_ids, **kwargs):\n"
                                   "    return [sum(i % 2 == 0 for i in ids) / len(ids) for ids in completion_ids]\n")
    train_grpo.main(run_args(tmp_path, data, steps=3, extra=common))
    records = [r for r in read_log(tmp_path) if "loss" in r]
    assert all(r["ratio_mean"] == 1.0 and r["clip_ratio/region_mean"] == 0.0 for r in records)
    assert all(r["grad_norm"] > 0 for r in records)

    train_grpo.main(run_args(tmp_path, data, steps=4, extra=common + ["--num_iterations", "2", "--beta", "0.1"]))
    records = [r for r in read_log(tmp_path) if "loss" in r]
    first, second = [r for r in records if r["iteration"] == 0], [r for r in records if r["iteration"] == 1]
    assert len(first) == len(second) == 2
    # pi_old is the sampling policy: the first update sees ratio 1, the second one sees how far the first moved
    assert all(abs(r["ratio_mean"] - 1) < 1e-5 for r in first)
    assert all(abs(r["ratio_mean"] - 1) > 1e-4 for r in second)
    assert all(r["kl"] >= 0 for r in records) and records[0]["kl"] < 1e-6 < records[1]["kl"]


def test_dropout_is_off_so_the_first_update_has_ratio_one(tmp_path):
    """With two updates per rollout pi_old is computed once (in eval mode); a policy that kept dropout would see a
    ratio != 1 and clip on its very first update. TRL disables dropout in GRPO; so do we (config dropout 0.5)."""
    data = write_prompts(tmp_path / "sums.jsonl")
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=6400, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, dropout=0.5,
                                               attention_dropout=0.5))
    start = str(tmp_path / "start.pth")
    save_weights(model, start)
    train_grpo.main(run_args(tmp_path, data, steps=1, extra=["--from_weight", start, "--num_iterations", "2",
                                                            "--log_interval", "1", "--eval_samples", "0"]))
    first = [r for r in read_log(tmp_path) if "loss" in r][0]
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and first["clip_ratio/region_mean"] == 0


def test_dapo_normaliser_is_the_same_with_gradient_accumulation(tmp_path, tokenizer):
    """One micro-batch of 16 completions, or the same 16 split in two micro-batches: the same gradient."""
    model = nano_model(sharpen=1.0)
    items = prompt_items(tokenizer, ["1 + 2 = ?", "Tom has 15 apples and 3 more. How many apples?"])
    sampling = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.0, top_k=0, pad_token_id=0,
                                eos_token_id=EOS)
    torch.manual_seed(1)
    rollout = rollouts.generate_rollout(model, tokenizer, items, 8, sampling, "cpu")
    rollout.completion_mask[0, 3:] = 0  # unequal lengths, so a wrong normaliser would show
    rollout.advantages = torch.randn(16)
    start = str(tmp_path / "start.pth")
    save_weights(model, start)
    grads = []
    for accumulation, parts in ((1, [rollout]), (2, [rollout.select(list(range(8))),
                                                     rollout.select(list(range(8, 16)))])):
        args = train_grpo.parse_args(run_args(tmp_path, "unused", extra=["--from_weight", start, "--accumulation_steps",
                                                                        str(accumulation), "--loss_type", "dapo"]))
        runtime = init_runtime("cpu", "float32", 0, 1)
        trainer = Trainer(args, nano_model(sharpen=1.0), runtime, "grpo")
        steps = train_grpo.GRPOSteps(args, trainer, runtime, tokenizer, list(range(16)), [], [], [])
        steps.update(parts)  # the backward passes of one optimizer step
        grads.append([p.grad.clone() for p in trainer.raw_model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


# ============================================================================================== whole runs


def test_run_logs_rollout_metrics_and_saves_weights(tmp_path, capsys):
    data = write_prompts(tmp_path / "sums.jsonl")
    write_prompts(tmp_path / "sums_val.jsonl", count=4, seed=1)
    result = train_grpo.main(run_args(tmp_path, data, steps=2, extra=["--dynamic_sampling", "1"]))
    assert (tmp_path / "out" / "grpo_64.pth").exists() and result["before"] is not None
    records = read_log(tmp_path)
    steps = [r for r in records if "loss" in r]
    for key in ("reward", "reward_std", "rewards/format/mean", "rewards/answer/std", "accuracy", "ratio_mean",
                "clip_ratio/region_mean", "completion_length", "rollout_time", "update_time", "rollout_share",
                "dropped_groups"):
        assert key in steps[0], key
    evals = [r for r in records if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 2] and "eval/accuracy" in evals[0]
    assert "held-out reward" in capsys.readouterr().out


def digit_model(path, tokenizer, steps=40):
    """A nano model SFT-ed (here, in a few seconds) to answer "Pick digits" with six random digits: a policy
    that samples diverse answers, which is what GRPO needs to have something to compare."""
    torch.manual_seed(0)
    model = nano_model(sharpen=1.0).train()
    rng = random.Random(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        rows = []
        for _ in range(16):
            reply = " ".join(str(rng.randrange(10)) for _ in range(6))
            ids, mask = encode_chat(tokenizer, [{"role": "user", "content": "Pick digits"},
                                                {"role": "assistant", "content": reply}])
            rows.append((ids, mask))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)] + [-100] * (width - len(ids))
                               for ids, mask in rows])
        loss = model(input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_weights(model, path)


EVEN_DIGITS = '''
def even_digits(prompts, completions, **kwargs):
    """Share of the digits in the reply that are even."""
    rewards = []
    for completion in completions:
        digits = [c for c in completion[0]["content"] if c.isdigit()]
        rewards.append(sum(int(c) % 2 == 0 for c in digits) / len(digits) if digits else 0.0)
    return rewards
'''


@pytest.mark.slow
def test_grpo_raises_the_reward_of_a_toy_task(tmp_path, tokenizer):
    """Start: a policy that picks digits uniformly (reward ~0.5: half are even). GRPO alone, rewarded for even
    digits, must push the sampled reward clearly up within 12 steps."""
    start = str(tmp_path / "digits.pth")
    digit_model(start, tokenizer)
    data = tmp_path / "digits.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": "Pick digits"}]}) + "\n"
                            for _ in range(80)))
    (tmp_path / "toy_rewards.py").write_text(EVEN_DIGITS)
    train_grpo.main(run_args(tmp_path, data, steps=12, extra=[
        "--from_weight", start, "--reward_funcs", f"{tmp_path / 'toy_rewards.py'}:even_digits", "--batch_size", "4",
        "--num_generations", "8", "--max_gen_len", "16", "--learning_rate", "3e-3"]))
    rewards = [r["reward"] for r in read_log(tmp_path) if "loss" in r]
    assert len(rewards) == 12
    assert 0.3 < rewards[0] < 0.7, rewards  # the first rollout comes from the untouched, uniform policy
    assert sum(rewards[-4:]) / 4 > rewards[0] + 0.25, rewards


def even_ids_reward_and_start(tmp_path) -> tuple[str, str]:
    """A reward that varies between samples (share of even token ids, given by path as a user would) and a saved
    unsharpened nano model to start from: the setup of the runs that compare two ways of training."""
    (tmp_path / "r.py").write_text("def even_ids(prompts, completions, completion_ids, **kwargs):\n"
                                   "    return [sum(i % 2 == 0 for i in ids) / len(ids) for ids in completion_ids]\n")
    start = str(tmp_path / "start.pth")
    save_weights(nano_model(sharpen=1.0), start)
    return f"{tmp_path / 'r.py'}:even_ids", start


def test_resume_continues_exactly(tmp_path):
    """Rollouts are sampled, so this also checks that the sampling RNG and the prompt order are restored."""
    data = write_prompts(tmp_path / "sums.jsonl", count=24)
    reward, start = even_ids_reward_and_start(tmp_path)
    flat_lr = ["--from_weight", start, "--reward_funcs", reward, "--learning_rate", "1e-2",
               "--min_lr_ratio", "1.0", "--warmup_steps", "1", "--epochs", "2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    train_grpo.main(run_args(whole, data, steps=8, extra=flat_lr))
    train_grpo.main(run_args(split, data, steps=5, extra=flat_lr))
    train_grpo.main(run_args(split, data, steps=8, extra=flat_lr + ["--from_resume", "1"]))
    expected, resumed = torch.load(whole / "out" / "grpo_64.pth"), torch.load(split / "out" / "grpo_64.pth")
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    rewards = {r["step"]: r["reward"] for r in read_log(whole) if "loss" in r}
    assert all(rewards[r["step"]] == r["reward"] for r in read_log(split) if "loss" in r)


def test_sigterm_writes_a_resume_checkpoint_between_rollouts_and_resuming_matches(tmp_path):
    """GRPO runs in the shared Trainer loop, so preemption (SIGTERM) saves and exits like every stage. With two
    updates per rollout the checkpoint waits for the rollout's second update (a resumed run starts with a fresh
    rollout), and resuming from it gives the weights of an uninterrupted run."""
    data = write_prompts(tmp_path / "sums.jsonl", count=64)
    reward, start = even_ids_reward_and_start(tmp_path)
    flags = ["--from_weight", start, "--reward_funcs", reward, "--learning_rate", "1e-2",
             "--min_lr_ratio", "1.0", "--warmup_steps", "1", "--num_iterations", "2", "--log_interval", "1",
             "--save_interval", "1000", "--eval_samples", "0", "--epochs", "100"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_grpo.py"),
                                *run_args(killed, data, steps=500, extra=flags)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    printed = []
    for line in process.stdout:
        printed.append(line)
        if line.startswith("step 3/"):  # mid-rollout: step 3 is the first update of the second rollout
            process.send_signal(signal.SIGTERM)
            break
    printed += process.stdout.readlines()
    assert process.wait(timeout=120) == 143, "".join(printed[-20:])
    resume = torch.load(killed / "out" / "grpo_64_resume.pth", weights_only=True)
    saved_step = resume["train_state"]["step"]
    assert saved_step >= 4 and saved_step % 2 == 0, saved_step  # at a rollout boundary, after the signal
    assert f"SIGTERM: resume checkpoint written at step {saved_step}" in "".join(printed)

    train_grpo.main(run_args(killed, data, steps=saved_step + 2, extra=flags + ["--from_resume", "1"]))
    train_grpo.main(run_args(whole, data, steps=saved_step + 2, extra=flags))
    expected, resumed = torch.load(whole / "out" / "grpo_64.pth"), torch.load(killed / "out" / "grpo_64.pth")
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_deepspeed_engine_applies_the_scheduled_rate_and_matches_plain_pytorch(tmp_path):
    """Under DeepSpeed the update of an optimizer step is applied by the engine's step() after the last micro-batch;
    it must use this step's scheduled learning rate (a warmup that starts at 1/3 of the peak here), not the one the
    optimizer held before, and land on the plain-PyTorch run's weights (ZeRO-2, one CPU process)."""
    pytest.importorskip("deepspeed")
    data = write_prompts(tmp_path / "sums.jsonl", count=24)
    reward, start = even_ids_reward_and_start(tmp_path)
    flags = ["--from_weight", start, "--reward_funcs", reward, "--learning_rate", "1e-2",
             "--warmup_steps", "3", "--accumulation_steps", "2", "--log_interval", "1", "--eval_samples", "0"]
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    train_grpo.main(run_args(plain, data, steps=3, extra=flags))
    result = torchrun("train_grpo.py", run_args(zero, data, steps=3, extra=flags + ["--deepspeed", "ds_config.json"]),
                      nproc=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    logged = [(r["step"], r["lr"]) for r in read_log(zero) if "loss" in r]
    assert logged == [(r["step"], r["lr"]) for r in read_log(plain) if "loss" in r] == [
        (1, pytest.approx(1e-2 / 3)), (2, pytest.approx(2e-2 / 3)), (3, pytest.approx(1e-2))]
    expected, got = torch.load(plain / "out" / "grpo_64.pth"), torch.load(zero / "out" / "grpo_64.pth")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_in_sync(tmp_path):
    data = write_prompts(tmp_path / "sums.jsonl", count=32)
    args = run_args(tmp_path, data, steps=2, extra=["--scale_rewards", "batch"])
    result = torchrun("train_grpo.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ranks in sync: yes" in result.stdout
    assert "x 2 ranks per rollout" in result.stdout
