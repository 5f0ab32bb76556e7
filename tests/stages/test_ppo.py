"""train_ppo.py end to end on tiny generated prompts and a random nano reward model: it runs, logs PPO's metrics,
saves the policy (not the value model), resumes exactly, starts its value model from the reward model, reads both
DPO pairs and prompt files, names a bad line by file:line, and a short run raises the reward of a toy task."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import train_ppo
from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
from model.checkpoint import save_weights
from model.data.chat import encode_chat
from tests import ROOT, TOKENIZER

SUBJECTS = "the king, the queen, the moon, the river, spring wind, a sword, 春风, 明月, 山水, 江南".split(", ")


def pair(question, chosen, rejected):
    return {"chosen": [{"role": "user", "content": question}, {"role": "assistant", "content": chosen}],
            "rejected": [{"role": "user", "content": question}, {"role": "assistant", "content": rejected}],
            "type": "toy"}


def write_pairs(path, count, offset=0):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(offset, offset + count):
            subject = SUBJECTS[i % len(SUBJECTS)]
            f.write(json.dumps(pair(f"Do you like {subject}? ({i})", f"yes, {subject}.", f"no. {subject}"),
                               ensure_ascii=False) + "\n")
    return path


def nano(vocab_size, seed):
    torch.manual_seed(seed)
    return TinyMindForCausalLM(TinyMindConfig(vocab_size=vocab_size, **PRESETS["nano"]))


def save_reward_model(path, vocab_size, seed=1, head=None):
    """A reward checkpoint as train_reward.py writes it: our weights + "score.weight" [1, hidden] + config JSON."""
    model = nano(vocab_size, seed)
    save_weights(model, str(path))
    state = torch.load(path, weights_only=True)
    if head is None:
        torch.manual_seed(seed)
        head = torch.randn(1, model.config.hidden_size) * 0.5
    torch.save({**state, "score.weight": head}, path)
    return str(path)


def setup(tmp_path, tokenizer):
    data = tmp_path / "pairs.jsonl"
    out = tmp_path / "out"
    if not data.exists():
        write_pairs(data, 32)
        write_pairs(tmp_path / "pairs_val.jsonl", 6, offset=1000)
        save_weights(nano(len(tokenizer), 0), str(out / "full_sft_64.pth"))
        save_reward_model(out / "reward_64.pth", len(tokenizer))
    return data, out


def run_args(tmp_path, tokenizer, steps=2, extra=()):
    data, out = setup(tmp_path, tokenizer)
    return ["--data_path", str(data), "--tokenizer_path", TOKENIZER, "--save_dir", str(out),
            "--max_steps", str(steps), "--batch_size", "2", "--accumulation_steps", "1", "--num_mini_batches", "2",
            "--num_ppo_epochs", "2", "--max_gen_len", "6", "--max_seq_len", "64", "--log_interval", "1",
            "--eval_samples", "4", "--eval_batch_size", "4", "--dtype", "float32", "--num_threads", "1",
            "--device", "cpu", *extra]


def read_log(out, name="ppo"):
    with open(out / "logs" / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f]


def test_run_logs_ppo_metrics_saves_the_policy_and_reports_held_out_numbers(tmp_path, tokenizer, capsys):
    result = train_ppo.main(run_args(tmp_path, tokenizer, steps=4))
    out = tmp_path / "out"
    saved = torch.load(out / "ppo_64.pth", weights_only=True)
    assert set(saved) == set(TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer),
                                                                **PRESETS["nano"])).state_dict())
    assert json.loads((out / "ppo_64.json").read_text())["tinymind_stage"] == "ppo"
    resume = torch.load(out / "ppo_64_resume.pth", weights_only=True)
    assert any(k.startswith("value_trunk.") for k in resume["model"]) and "value_head.weight" in resume["model"]
    records = read_log(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("score", "kl", "non_score_reward", "rlhf_reward", "completion_length", "eos_rate", "pg_loss",
                "vf_loss", "pg_clipfrac", "vf_clipfrac", "approxkl", "ratio", "explained_variance", "rollout_time"):
        assert key in steps[0], key
    # Two mini-batches x two PPO epochs per rollout: steps 1-4 share one rollout, so its score is logged 4 times.
    assert len({r["score"] for r in steps}) == 1
    # The first mini-batch update of a rollout runs with the policy that sampled it: ratio 1, nothing clipped.
    assert steps[0]["ratio"] == pytest.approx(1.0, abs=1e-5) and steps[0]["pg_clipfrac"] == 0.0
    evals = [r for r in records if "eval/score" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert evals[0]["eval/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its reference
    assert result["before"]["score"] == evals[0]["eval/score"]
    assert "held-out score" in capsys.readouterr().out


def test_value_model_starts_from_the_reward_model_and_policy_init_is_a_zero_head(tmp_path, tokenizer):
    args_list = run_args(tmp_path, tokenizer)
    args = train_ppo.parse_args(args_list)
    policy = nano(len(tokenizer), 0)
    reward_path = str(tmp_path / "out" / "reward_64.pth")
    trunk, head, _ = train_ppo.value_model(args, policy, reward_path, tokenizer)
    rm = torch.load(reward_path, weights_only=True)
    assert torch.equal(head.weight, rm["score.weight"])
    assert torch.equal(trunk.embed_tokens.weight, rm["model.embed_tokens.weight"])
    # values at every position = the reward model's score had the reply ended there
    scorer_model = nano(len(tokenizer), 1).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    wrapper = train_ppo.PolicyAndValue(policy, trunk, head).eval()
    values = wrapper.values(ids, torch.ones_like(ids), 4)
    with torch.no_grad():
        expected = scorer_model.model(ids)[0][:, -4:-1] @ rm["score.weight"].T
    torch.testing.assert_close(values, expected.squeeze(-1))
    args = train_ppo.parse_args(args_list + ["--value_init", "policy"])
    trunk, head, _ = train_ppo.value_model(args, policy, reward_path, tokenizer)
    assert torch.equal(trunk.embed_tokens.weight, policy.model.embed_tokens.weight) and not head.weight.any()


def test_resume_continues_exactly(tmp_path, tokenizer):
    """Two rollouts of 4 updates; the split run stops after the first rollout and resumes: same weights and logged
    numbers as the uninterrupted run (sampling RNG, prompt order and mini-batch order restored), although the two
    runs evaluate (sampled, from a forked RNG) at different points."""
    flat = ["--learning_rate", "1e-3", "--min_lr_ratio", "1.0", "--warmup_steps", "1", "--save_interval", "4",
            "--eval_interval", "2", "--eval_temperature", "1.0"]  # sampled evaluations must not touch training's RNG
    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    train_ppo.main(run_args(whole, tokenizer, steps=8, extra=flat))
    train_ppo.main(run_args(split, tokenizer, steps=4, extra=flat))
    train_ppo.main(run_args(split, tokenizer, steps=8, extra=flat + ["--from_resume", "1"]))
    expected = torch.load(whole / "out" / "ppo_64.pth", weights_only=True)
    resumed = torch.load(split / "out" / "ppo_64.pth", weights_only=True)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    logged = {r["step"]: (r["score"], r["loss"]) for r in read_log(whole / "out") if "loss" in r}
    assert all(logged[r["step"]] == (r["score"], r["loss"]) for r in read_log(split / "out") if "loss" in r)


def test_sigterm_mid_rollout_checkpoints_at_the_rollout_boundary_and_resuming_matches(tmp_path, tokenizer):
    """Preemption: a SIGTERM during a rollout's updates writes the resume checkpoint after the rollout's last update
    (a resumed run starts with a fresh rollout), and resuming from it gives the uninterrupted run's weights."""
    flags = ["--learning_rate", "1e-3", "--min_lr_ratio", "1.0", "--warmup_steps", "1", "--eval_samples", "0",
             "--save_interval", "1000", "--epochs", "100"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    killed.mkdir(), whole.mkdir()
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_ppo.py"),
                                *run_args(killed, tokenizer, steps=400, extra=flags)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, PYTHONUNBUFFERED="1"))
    printed = []
    for line in process.stdout:
        printed.append(line)
        if line.startswith("step 6/"):  # the second update of the second rollout (4 updates per rollout)
            process.send_signal(signal.SIGTERM)
            break
    printed += process.stdout.readlines()
    assert process.wait(timeout=120) == 143, "".join(printed[-20:])
    saved_step = torch.load(killed / "out" / "ppo_64_resume.pth", weights_only=True)["train_state"]["step"]
    assert saved_step >= 8 and saved_step % 4 == 0, saved_step
    assert f"SIGTERM: resume checkpoint written at step {saved_step}" in "".join(printed)
    train_ppo.main(run_args(killed, tokenizer, steps=saved_step + 4, extra=flags + ["--from_resume", "1"]))
    train_ppo.main(run_args(whole, tokenizer, steps=saved_step + 4, extra=flags))
    expected = torch.load(whole / "out" / "ppo_64.pth", weights_only=True)
    resumed = torch.load(killed / "out" / "ppo_64.pth", weights_only=True)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_prompt_files_and_kl_in_the_loss_run(tmp_path, tokenizer):
    """A GRPO-style prompt file works as well as DPO pairs; --kl_penalty loss logs its KL term."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"{i} + 1 = ?"}],
                                        "answer": str(i + 1)}) + "\n" for i in range(8)))
    args = run_args(tmp_path, tokenizer, steps=2, extra=["--kl_penalty", "loss", "--kl_estimator", "k3",
                                                         "--missing_eos_penalty", "1.0", "--eval_samples", "0"])
    args[args.index("--data_path") + 1] = str(data)
    train_ppo.main(args)
    steps = [r for r in read_log(tmp_path / "out") if "loss" in r]
    assert "kl_loss" in steps[0] and len(steps) == 2
    # max_gen_len 6 cuts every random reply short: all are penalised
    assert steps[0]["score_with_penalty"] == pytest.approx(steps[0]["score"] - 1.0 * (1 - steps[0]["eos_rate"]),
                                                           abs=1e-5)


def test_bad_prompt_line_is_named_by_file_and_line(tmp_path, tokenizer):
    args = run_args(tmp_path, tokenizer)
    bad = tmp_path / "bad.jsonl"
    lines = [pair("q1", "a", "b"), pair("q2", "a", "b"), {"chosen": [{"role": "user", "content": "q3"}]}]
    bad.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args[args.index("--data_path") + 1] = str(bad)
    with pytest.raises(SystemExit, match=rf"{bad}:3: "):
        train_ppo.main(args)


def test_a_missing_reward_model_is_one_clear_error(tmp_path, tokenizer):
    args = run_args(tmp_path, tokenizer) + ["--reward_model", "nothing_here"]
    with pytest.raises(SystemExit, match="no 'nothing_here' weights"):
        train_ppo.main(args)


def sft_yes_or_no(path, tokenizer, steps=30):
    """A nano policy SFT-ed for seconds to answer "Say something" with "yes" or "no" at random, then stop."""
    torch.manual_seed(0)
    model = nano(len(tokenizer), 0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        rows = [encode_chat(tokenizer, [{"role": "user", "content": f"Say something ({i})"},
                                        {"role": "assistant", "content": "yes" if (i + step) % 2 else "no"}])
                for i in range(16)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask)] + [-100] * (width - len(ids))
                               for ids, mask in rows])
        loss = model(input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_weights(model, path)


def bradley_terry_yes_over_no(path, tokenizer, steps=30):
    """A nano reward model trained for seconds (Bradley-Terry) to score "yes" above "no", read the way
    CheckpointRewardScorer reads it: chat template, last real token, head. Saved as train_reward.py saves."""
    torch.manual_seed(1)
    model, head = nano(len(tokenizer), 1), torch.nn.Linear(64, 1, bias=False)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Say something ({i})"},
                                            {"role": "assistant", "content": reply}], tokenize=False)
             for reply in ("yes", "no") for i in range(16)]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    last = batch["attention_mask"].sum(dim=1) - 1
    for _ in range(steps):
        hidden, _ = model.model(batch["input_ids"], attention_mask=batch["attention_mask"])
        scores = head(hidden[torch.arange(len(last)), last]).squeeze(-1)
        loss = -torch.nn.functional.logsigmoid(scores[:16] - scores[16:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_weights(model, str(path))
    torch.save({**torch.load(path, weights_only=True), "score.weight": head.weight.detach()}, path)


@pytest.mark.slow
def test_ppo_raises_the_reward_model_score_of_a_toy_task(tmp_path, tokenizer):
    """A policy that says "yes" or "no" at random, a reward model that prefers "yes": PPO must raise the sampled
    reward-model score clearly within a few rollouts, and the share of "yes" with it."""
    out = tmp_path / "out"
    out.mkdir()
    sft_yes_or_no(str(out / "full_sft_64.pth"), tokenizer)
    bradley_terry_yes_over_no(out / "reward_64.pth", tokenizer)
    data = tmp_path / "say.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"Say something ({i})"}]})
                            + "\n" for i in range(64)))
    train_ppo.main(["--data_path", str(data), "--tokenizer_path", TOKENIZER, "--save_dir", str(out),
                    "--epochs", "2", "--batch_size", "8", "--num_mini_batches", "2", "--num_ppo_epochs", "2",
                    "--max_gen_len", "4", "--temperature", "1.0", "--learning_rate", "3e-3", "--eval_samples", "0",
                    "--log_interval", "1", "--dtype", "float32", "--num_threads", "1", "--device", "cpu"])
    scores = [r["score"] for r in read_log(out) if "loss" in r][::4]  # one per rollout
    assert len(scores) == 8
    assert sum(scores[-2:]) / 2 > scores[0] + 1.0, scores
