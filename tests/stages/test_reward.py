"""train_reward.py end to end on tiny generated pairs: the checkpoint GRPO's CheckpointRewardScorer reads gives the
scores the stage trained and evaluated, resume, margins and types from the data, bad lines named by file:line, and
learning a preference that generalises to held-out pairs."""
import json
import math

import pytest
import torch

import train_reward
from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
from model.checkpoint import load_weights, save_weights
from model.data.preference import DPODataset, IndexedPairs, collate_pairs
from model.training.reward_model import RewardModel, pair_rewards
from model.training.rewards import CheckpointRewardScorer
from tests import TOKENIZER, torchrun

SUBJECTS = "the king, the queen, the moon, the river, spring wind, a sword, 春风, 明月, 山水, 江南".split(", ")


def pair(question, chosen, rejected, **fields):
    return {"chosen": [{"role": "user", "content": question}, {"role": "assistant", "content": chosen}],
            "rejected": [{"role": "user", "content": question}, {"role": "assistant", "content": rejected}],
            **fields}


def write_pairs(path, count, offset=0, margin=None):
    """A preference a nano model picks up in a few dozen steps: "yes, <subject>." over "no. <subject>". Two
    "type"s, as the demo data names the kind of rejected answer."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(offset, offset + count):
            subject = SUBJECTS[i % len(SUBJECTS)]
            fields = {"type": "refusal" if i % 2 else "denial"}
            if margin is not None:
                fields["margin"] = margin
            row = pair(f"Do you like {subject}? ({i})", f"yes, {subject}.", f"no. {subject}", **fields)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def base_args(tmp_path, tokenizer, steps=3, extra=()):
    data = tmp_path / "pairs.jsonl"
    out = tmp_path / "out"
    if not data.exists():
        write_pairs(data, 64)
        write_pairs(tmp_path / "pairs_val.jsonl", 16, offset=1000)
        torch.manual_seed(0)
        save_weights(TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS["nano"])),
                     str(out / "full_sft_64.pth"))
    return ["--data_path", str(data), "--tokenizer_path", TOKENIZER, "--save_dir", str(out),
            "--max_steps", str(steps), "--batch_size", "4", "--max_seq_len", "64", "--log_interval", "1",
            "--eval_interval", "0", "--eval_batches", "4", "--dtype", "float32", "--num_threads", "1",
            "--device", "cpu", *extra]


def read_log(tmp_path, name="reward"):
    with open(tmp_path / "out" / "logs" / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f if "loss" in json.loads(line)]


def test_checkpoint_scores_in_checkpoint_reward_scorer_as_in_training(tmp_path, tokenizer):
    """The saved file is what GRPO's --reward_model reads: CheckpointRewardScorer, rendering each (prompt, reply)
    itself, gives the scores of the stage's own forward pass, and its held-out margin is the stage's."""
    result = train_reward.main(base_args(tmp_path, tokenizer, steps=3, extra=["--learning_rate", "1e-3"]))
    path = tmp_path / "out" / "reward_64.pth"
    assert result["weights"] == str(path)
    assert json.loads((tmp_path / "out" / "reward_64.json").read_text())["tinymind_stage"] == "reward"
    state, config = load_weights(str(path))
    assert state["score.weight"].shape == (1, 64) and "score.bias" not in state
    start = torch.load(tmp_path / "out" / "full_sft_64.pth", weights_only=True)
    assert set(state) == set(start) | {"score.weight"}

    scorer = CheckpointRewardScorer(str(path), tokenizer_path=TOKENIZER, batch_size=5)
    rows = [json.loads(line) for line in open(tmp_path / "pairs_val.jsonl", encoding="utf-8")]
    prompts = [row["chosen"][:-1] for row in rows] * 2
    completions = [[row["chosen"][-1]] for row in rows] + [[row["rejected"][-1]] for row in rows]
    scored = torch.tensor(scorer(prompts, completions))

    language_model = TinyMindForCausalLM(config)
    model = RewardModel(language_model)
    model.load_state_dict(state)
    pairs = IndexedPairs(DPODataset(str(tmp_path / "pairs_val.jsonl"), tokenizer, 64, show_progress=False))
    batch = collate_pairs([pairs[i] for i in range(len(pairs))], tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected, _ = pair_rewards(model.eval(), batch)
    torch.testing.assert_close(scored, torch.cat([chosen, rejected]), atol=1e-5, rtol=0)
    n = len(rows)
    assert result["after"]["margin"] == pytest.approx((scored[:n] - scored[n:]).mean().item(), abs=1e-5)
    assert result["after"]["accuracy"] == pytest.approx((scored[:n] > scored[n:]).float().mean().item())


def test_training_learns_a_preference_that_holds_on_held_out_pairs(tmp_path, tokenizer):
    result = train_reward.main(base_args(tmp_path, tokenizer, steps=12, extra=["--learning_rate", "2e-3",
                                                                             "--log_interval", "4"]))
    before, after = result["before"], result["after"]
    assert after["accuracy"] == 1.0 and after["margin"] > before["margin"] + 1
    assert after["loss"] < 0.3 < before["loss"]
    assert after["accuracy/refusal"] == after["accuracy/denial"] == 1.0  # per "type" of the data
    assert {"accuracy/refusal", "accuracy/denial"} <= set(before)
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [4, 8, 12]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"} <= set(log[0])


def test_resume_ends_with_the_weights_of_the_uninterrupted_run(tmp_path, tokenizer, monkeypatch):
    """The head is part of the resume checkpoint: a run stopped at step 2 and resumed ends bit for bit where the
    uninterrupted one does."""
    args = base_args(tmp_path, tokenizer, steps=4, extra=["--learning_rate", "1e-3", "--save_interval", "2"])
    train_reward.main(args + ["--save_weight", "whole"])

    class StopAtStepTwo(train_reward.Trainer):
        def save(self, final=False):
            super().save(final)
            if self.state.step == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(train_reward, "Trainer", StopAtStepTwo)
    with pytest.raises(KeyboardInterrupt):
        train_reward.main(args + ["--save_weight", "resumed"])
    monkeypatch.undo()
    result = train_reward.main(args + ["--save_weight", "resumed", "--from_resume", "1"])
    assert result["before"] is None  # a resumed run has no "before"
    whole = torch.load(tmp_path / "out" / "whole_64.pth", weights_only=True)
    resumed = torch.load(tmp_path / "out" / "resumed_64.pth", weights_only=True)
    assert set(whole) == set(resumed) and "score.weight" in whole
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_margin_field_is_subtracted_inside_the_loss(tmp_path, tokenizer):
    """TRL: -log sigmoid(r_c - r_r - margin). A margin of 6 makes the first loss about 6; --use_margin 0 or no
    field leaves it near ln 2 (the head starts small, so r_c - r_r is small)."""
    args = base_args(tmp_path, tokenizer, steps=1)
    plain = train_reward.main(args + ["--save_weight", "plain"])
    write_pairs(tmp_path / "pairs.jsonl", 64, margin=6.0)
    write_pairs(tmp_path / "pairs_val.jsonl", 16, offset=1000, margin=6.0)
    with_margin = train_reward.main(args + ["--save_weight", "with_margin"])
    ignored = train_reward.main(args + ["--save_weight", "ignored", "--use_margin", "0"])
    assert ignored["before"] == pytest.approx(plain["before"])
    first = {name: read_log(tmp_path, name)[0]["loss"] for name in ("plain", "with_margin", "ignored")}
    assert abs(first["plain"] - math.log(2)) < 0.3 and first["ignored"] == pytest.approx(first["plain"], abs=1e-6)
    assert 5 < first["with_margin"] < 7
    # the held-out loss uses the held-out pairs' margins; accuracy and margin are the plain r_c - r_r
    assert with_margin["before"]["loss"] > 5 and with_margin["before"]["accuracy"] == plain["before"]["accuracy"]


def test_bad_lines_are_named_by_file_and_line(tmp_path, tokenizer):
    args = base_args(tmp_path, tokenizer)
    bad = tmp_path / "bad.jsonl"
    rows = [json.dumps(pair("q1", "a", "b")), json.dumps(pair("q2", "a", "b")), '{"chosen": [', json.dumps(pair(
        "q3", "a", "b"))]
    bad.write_text("\n".join(rows) + "\n", encoding="utf-8")
    args[args.index("--data_path") + 1] = str(bad)
    with pytest.raises(SystemExit, match=rf"{bad}:3: not valid JSON"):
        train_reward.main(args)
    margins = tmp_path / "margins.jsonl"
    rows = [pair("q1", "a", "b", margin=1.0), pair("q2", "a", "b", margin="high"), pair("q3", "a", "b", margin=1)]
    margins.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    args[args.index("--data_path") + 1] = str(margins)
    with pytest.raises(SystemExit, match=rf"{margins}:2: \"margin\" is 'high', not a finite number"):
        train_reward.main(args)


@pytest.mark.slow
def test_two_process_gloo_run_sums_the_held_out_pairs_over_ranks(tmp_path, tokenizer):
    """Each rank scores half the held-out pairs; the summed metrics must equal a one-process evaluation of the same
    weights, and the ranks end in sync."""
    args = base_args(tmp_path, tokenizer, steps=2, extra=["--learning_rate", "1e-3"])
    result = torchrun("train_reward.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ranks in sync: yes" in result.stdout and "x 2 ranks" in result.stdout
    two_ranks = [json.loads(line) for line in open(tmp_path / "out" / "logs" / "reward.jsonl")
                 if "eval/accuracy" in json.loads(line)][-1]
    state, config = load_weights(str(tmp_path / "out" / "reward_64.pth"))
    model = RewardModel(TinyMindForCausalLM(config))
    model.load_state_dict(state)
    pairs = IndexedPairs(DPODataset(str(tmp_path / "pairs_val.jsonl"), tokenizer, 64, show_progress=False))
    with torch.no_grad():
        chosen, rejected, _ = pair_rewards(model.eval(), collate_pairs([pairs[i] for i in range(len(pairs))]))
    assert two_ranks["eval/margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert two_ranks["eval/accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
