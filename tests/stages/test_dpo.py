"""train_dpo.py end to end on tiny generated pairs: ln 2 at step 0, a frozen reference, summed log-probs through the
real dataset, precomputed == live reference, bad pairs, and learning a preference that generalises."""
import json
import math

import pytest
import torch

import train_dpo
from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
from model.checkpoint import save_weights
from model.data.chat import encode_chat, final_turn_labels
from model.data.preference import DPODataset
from tests import TOKENIZER, torchrun

SUBJECTS = "the king, the queen, the moon, the river, spring wind, a sword, 春风, 明月, 山水, 江南".split(", ")


def pair(question, chosen, rejected, rejected_question=None):
    return {"chosen": [{"role": "user", "content": question}, {"role": "assistant", "content": chosen}],
            "rejected": [{"role": "user", "content": rejected_question or question},
                         {"role": "assistant", "content": rejected}]}


def write_pairs(path, count, offset=0):
    """A preference a nano model can pick up in a few dozen steps: always answer "yes, <subject>", never "no"."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(offset, offset + count):
            subject = SUBJECTS[i % len(SUBJECTS)]
            question = f"Do you like {subject}? ({i})"
            f.write(json.dumps(pair(question, f"yes, {subject}.", f"no. {subject}"), ensure_ascii=False) + "\n")


def make_checkpoint(path, vocab_size, seed):
    torch.manual_seed(seed)
    save_weights(TinyMindForCausalLM(TinyMindConfig(vocab_size=vocab_size, **PRESETS["nano"])), str(path))
    return str(path)


def base_args(tmp_path, tokenizer, steps=3, extra=()):
    data = tmp_path / "pairs.jsonl"
    out = tmp_path / "out"
    if not data.exists():
        write_pairs(data, 64)
        write_pairs(tmp_path / "pairs_val.jsonl", 16, offset=1000)
        make_checkpoint(out / "full_sft_64.pth", len(tokenizer), seed=0)
    return ["--data_path", str(data), "--tokenizer_path", TOKENIZER, "--save_dir", str(out),
            "--max_steps", str(steps), "--batch_size", "4", "--max_seq_len", "64", "--log_interval", "1",
            "--eval_interval", "0", "--eval_batches", "4", "--dtype", "float32", "--num_threads", "1",
            "--device", "cpu", *extra]


def read_log(tmp_path, name="dpo"):
    with open(tmp_path / "out" / "logs" / f"{name}.jsonl") as f:
        return [json.loads(line) for line in f if "loss" in json.loads(line)]


def test_first_loss_is_exactly_ln2_when_policy_equals_reference(tmp_path, tokenizer):
    result = train_dpo.main(base_args(tmp_path, tokenizer, steps=2))
    first = read_log(tmp_path)[0]
    assert first["step"] == 1
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0 and first["rewards/margin"] == 0
    assert abs(result["before"]["dpo_loss"] - math.log(2)) < 1e-6
    assert (tmp_path / "out" / "dpo_64.pth").exists() and result["weights"].endswith("dpo_64.pth")


def test_dropout_is_off_so_training_starts_at_ln2_from_a_dropout_checkpoint(tmp_path, tokenizer):
    """TRL's disable_dropout: a checkpoint configured with dropout 0.5 still starts at exactly ln 2 in train mode,
    and its saved config keeps the dropout the stages after it may want."""
    args = base_args(tmp_path, tokenizer, steps=1)
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **{**PRESETS["nano"], "dropout": 0.5,
                                                                              "attention_dropout": 0.5}))
    save_weights(model, str(tmp_path / "out" / "full_sft_64.pth"))
    train_dpo.main(args)
    assert abs(read_log(tmp_path)[0]["loss"] - math.log(2)) < 1e-6
    assert json.loads((tmp_path / "out" / "dpo_64.json").read_text())["dropout"] == 0.5


@pytest.mark.parametrize("loss_type, expected",
                         [("hinge", 1.0), ("ipo", (1 / (2 * 0.1)) ** 2), ("robust", math.log(2))])
def test_other_loss_types_start_where_their_formula_says(tmp_path, tokenizer, loss_type, expected):
    """Policy == reference makes every log-ratio 0: hinge relu(1 - 0) = 1, IPO (0 - 1/(2 beta))^2, robust ln 2."""
    train_dpo.main(base_args(tmp_path, tokenizer, steps=1, extra=["--loss_type", loss_type,
                                                                  "--label_smoothing", "0.1"]))
    assert read_log(tmp_path)[0]["loss"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("precompute", ["0", "1"])
def test_resume_keeps_the_starting_weights_as_reference(tmp_path, tokenizer, monkeypatch, precompute):
    """Interrupted at step 2 and resumed, the run ends with exactly the weights of the uninterrupted one: the
    reference must come from --from_weight, not from the resumed (already trained) policy."""
    args = base_args(tmp_path, tokenizer, steps=4, extra=["--learning_rate", "1e-3", "--save_interval", "2",
                                                          "--precompute_ref", precompute])
    train_dpo.main(args + ["--save_weight", "whole"])

    class StopAtStepTwo(train_dpo.Trainer):
        def save(self, final=False):
            super().save(final)
            if self.state.step == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(train_dpo, "Trainer", StopAtStepTwo)
    with pytest.raises(KeyboardInterrupt):
        train_dpo.main(args + ["--save_weight", "resumed"])
    monkeypatch.undo()
    train_dpo.main(args + ["--save_weight", "resumed", "--from_resume", "1"])
    whole = torch.load(tmp_path / "out" / "whole_64.pth", weights_only=True)
    resumed = torch.load(tmp_path / "out" / "resumed_64.pth", weights_only=True)
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_reference_gets_no_gradient_and_keeps_its_weights(tmp_path, tokenizer, monkeypatch):
    references, original = [], train_dpo.frozen_copy

    def capture(model):
        references.append(original(model))
        return references[-1]

    monkeypatch.setattr(train_dpo, "frozen_copy", capture)
    train_dpo.main(base_args(tmp_path, tokenizer, steps=4, extra=["--learning_rate", "1e-3"]))
    (reference,) = references
    start = torch.load(tmp_path / "out" / "full_sft_64.pth", weights_only=True)
    trained = torch.load(tmp_path / "out" / "dpo_64.pth", weights_only=True)
    assert not reference.training
    for name, param in reference.named_parameters():
        assert not param.requires_grad and param.grad is None, name
        assert torch.equal(param.detach(), start[name]), f"reference weight {name} changed"
    assert any(not torch.equal(trained[k], start[k]) for k in start), "the policy should have trained"
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert losses[-1] < losses[0], losses


def test_cached_pairs_equal_a_direct_encoding_with_keep_start_truncation(tmp_path, tokenizer):
    """Each pair read back from the cache (1 or 2 tokenizing processes) is the chat template's encoding, labels on
    the final reply only, cut to max_seq_len from the end; a pair whose reply is cut away entirely is dropped."""
    rows = [pair(f"question {i}", "yes " * (i % 7 + 1), "no " * (i % 5 + 1)) for i in range(1100)]
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    rows[3] = {side: history + rows[3][side] for side in ("chosen", "rejected")}  # multi-turn: last reply only
    rows[5] = pair("long " * 80, "yes", "no")  # the prompt alone fills max_seq_len: dropped
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    max_seq_len = 40
    expected = []
    for row in rows:
        sides = []
        for side in ("chosen", "rejected"):
            ids, mask = encode_chat(tokenizer, row[side])
            labels = final_turn_labels(ids, mask)[:max_seq_len]
            sides.append((ids[:max_seq_len], labels))
        if all(any(label != -100 for label in labels) for _, labels in sides):
            expected.append(sides)
    for num_proc in (1, 2):
        pairs = DPODataset(str(path), tokenizer, max_seq_len, show_progress=False, num_proc=num_proc,
                           cache_dir=str(tmp_path / f"cache{num_proc}"))
        assert len(pairs) == len(expected) == 1099 and pairs.stats["dropped_no_completion"] == 1
        for i in (0, 3, 4, 5, 700, 1098):
            item = pairs[i]
            for side, (ids, labels) in zip(("chosen", "rejected"), expected[i]):
                assert item[f"{side}_input_ids"].tolist() == ids and item[f"{side}_labels"].tolist() == labels
    assert tokenizer.decode([t for t in pairs[3]["chosen_labels"].tolist() if t != -100]).startswith("yes")


def test_duplicated_completion_has_twice_the_logprob_end_to_end(tmp_path, tokenizer):
    """Sum, not mean: through DPODataset, the collate and the model. The model is made context-free (constant
    embeddings, attention and MLP outputs zeroed): every position predicts the same distribution, so each token
    scores the same wherever it stands, and the doubled reply must score exactly twice the single one, apart from
    the one closing <|im_end|> both replies end with."""
    text = "明月松间照。"
    path = tmp_path / "double.jsonl"
    path.write_text(json.dumps(pair("吟诗", text, text + text), ensure_ascii=False) + "\n", encoding="utf-8")
    pairs = train_dpo.IndexedPairs(DPODataset(str(path), tokenizer, 64, show_progress=False))
    batch = train_dpo.collate_pairs([pairs[0]])
    single_ids = [t for t in batch["labels"][0].tolist() if t != -100]
    double_ids = [t for t in batch["labels"][1].tolist() if t != -100]
    assert double_ids == single_ids[:-1] * 2 + [tokenizer.eos_token_id], "the reply should tokenize as two copies"

    torch.manual_seed(0)
    config = TinyMindConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **PRESETS["nano"])
    model = TinyMindForCausalLM(config).eval()
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        embeddings.copy_(torch.randn(config.hidden_size).expand_as(embeddings))
        for name, param in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                param.zero_()
        single, double, single_n, double_n, out = train_dpo.pair_logps(model, batch)
        eos_logp = torch.log_softmax(out.logits[0, 0].float(), -1)[tokenizer.eos_token_id]
    assert double_n.item() - 1 == 2 * (single_n.item() - 1)
    torch.testing.assert_close(double - eos_logp, 2 * (single - eos_logp), rtol=0, atol=1e-4)
    assert (single - eos_logp).abs().item() > 1.0  # non-trivial: a mean over tokens would not double


@pytest.mark.parametrize("other_reference", [False, True])
def test_precomputed_reference_gives_the_same_losses_as_the_live_one(tmp_path, tokenizer, other_reference):
    """From step 2 on (and from step 1 with another --ref_weight) the loss depends on each pair's reference
    log-probs, so shuffled batches must look up the right rows of the precomputed table."""
    args = base_args(tmp_path, tokenizer, steps=4, extra=["--learning_rate", "1e-3"])
    if other_reference:
        args += ["--ref_weight", make_checkpoint(tmp_path / "ref" / "other_64.pth", len(tokenizer), seed=1)]
    train_dpo.main(args + ["--save_weight", "live"])
    train_dpo.main(args + ["--save_weight", "pre", "--precompute_ref", "1"])
    live, pre = read_log(tmp_path, "live"), read_log(tmp_path, "pre")
    assert (abs(live[0]["loss"] - math.log(2)) > 1e-3) == other_reference
    assert abs(live[1]["loss"] - math.log(2)) > 1e-3
    assert len(live) == len(pre) == 4
    for a, b in zip(live, pre):
        for key in ("loss", "rewards/chosen", "rewards/rejected"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_pair_with_different_prompts_is_reported_with_path_and_line(tmp_path, tokenizer):
    args = base_args(tmp_path, tokenizer)
    bad = tmp_path / "bad.jsonl"
    lines = [pair("q1", "a", "b"), pair("q2", "a", "b", rejected_question="another question")]
    bad.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    args[args.index("--data_path") + 1] = str(bad)
    with pytest.raises(SystemExit, match=rf"{bad}:2: chosen and rejected have different prompts"):
        train_dpo.main(args)


def test_training_opens_the_held_out_preference_margin(tmp_path, tokenizer):
    result = train_dpo.main(base_args(tmp_path, tokenizer, steps=24, extra=["--learning_rate", "2e-3",
                                                                          "--log_interval", "8"]))
    before, after = result["before"], result["after"]
    assert after["logp_margin"] > before["logp_margin"] + 5
    assert after["pref_accuracy"] == 1.0
    assert after["reward_accuracy"] == 1.0 and after["reward_margin"] > 0.5
    assert after["dpo_loss"] < 0.5


@pytest.mark.slow
def test_two_process_gloo_run_with_precomputed_reference(tmp_path, tokenizer):
    """Each rank scores half the pairs; the all-reduced table must serve both ranks' shuffled batches."""
    args = base_args(tmp_path, tokenizer, steps=3, extra=["--precompute_ref", "1"])
    result = torchrun("train_dpo.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ranks in sync: yes" in result.stdout and "x 2 ranks" in result.stdout
    first = read_log(tmp_path)[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6


TYPES = ["wrong_sum", "looping_reply", None]  # None: a line without "type" (MiniMind's data)


def write_typed_pairs(path, count, offset=0):
    """Pairs of three kinds: two named by a "type", one without (counted overall, not per type)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(offset, offset + count):
            kind = TYPES[i % 3]
            subject = SUBJECTS[i % len(SUBJECTS)]
            rejected = f"no. {subject}" if kind != "looping_reply" else f"{subject} {subject} {subject}"
            row = pair(f"Do you like {subject}? ({i})", f"yes, {subject}.", rejected)
            f.write(json.dumps(row if kind is None else {**row, "type": kind}, ensure_ascii=False) + "\n")


def test_pair_types_are_carried_and_cached_complete_or_absent(tmp_path, tokenizer):
    from model.data.jsonl import token_cache_path
    from model.data.preference import TYPES_FORMAT_VERSION, pair_types
    path = tmp_path / "typed.jsonl"
    write_typed_pairs(path, 9)
    cache_dir = str(tmp_path / "cache")
    pairs = DPODataset(str(path), tokenizer, 64, show_progress=False, cache_dir=cache_dir)
    assert pairs.types == TYPES * 3 and [pairs[i]["type"] for i in range(3)] == TYPES
    assert pair_types(train_dpo.IndexedPairs(torch.utils.data.Subset(pairs, [1, 2]))) == TYPES[1:]
    side = token_cache_path(str(path), tokenizer, cache_dir, suffix="dpo") + ".types.json"
    stored = json.loads(open(side).read())
    assert stored["version"] == TYPES_FORMAT_VERSION and stored["names"] == ["looping_reply", "wrong_sum"]
    assert stored["codes"][:3] == [1, 0, -1]
    # a damaged or other-version file counts as absent and is rebuilt; a valid one is read, not rebuilt
    for damaged in ("{not json", json.dumps({**stored, "version": TYPES_FORMAT_VERSION + 1, "codes": [0] * 9})):
        open(side, "w").write(damaged)
        assert DPODataset(str(path), tokenizer, 64, show_progress=False, cache_dir=cache_dir).types == TYPES * 3
        assert json.loads(open(side).read()) == stored
    open(side, "w").write(json.dumps({**stored, "codes": [0] * 9}))  # trusted when it matches: read back as is
    assert DPODataset(str(path), tokenizer, 64, show_progress=False, cache_dir=cache_dir).types == ["looping_reply"] * 9
    untyped = tmp_path / "untyped.jsonl"
    write_pairs(untyped, 4)
    assert DPODataset(str(untyped), tokenizer, 64, show_progress=False, cache_dir=cache_dir).types == [None] * 4


def test_held_out_accuracy_per_type_equals_a_direct_count(tmp_path, tokenizer):
    """by_type/<type>/pref_accuracy and reward_accuracy, before and after, are the share of that type's held-out
    pairs where log pi(chosen) > log pi(rejected), and where the implicit reward of chosen is higher: recounted
    pair by pair here with the starting and the trained weights."""
    from model.checkpoint import load_weights
    data, val = tmp_path / "typed.jsonl", tmp_path / "typed_val.jsonl"
    write_typed_pairs(data, 48)
    write_typed_pairs(val, 14, offset=500)
    args = base_args(tmp_path, tokenizer, steps=6, extra=["--learning_rate", "1e-3", "--eval_batches", "10"])
    args[args.index("--data_path") + 1] = str(data)
    result = train_dpo.main(args)

    def model_from(path):
        state, config = load_weights(str(path))
        model = TinyMindForCausalLM(config).eval()
        model.load_state_dict(state, strict=False)
        return model

    start, trained = model_from(tmp_path / "out" / "full_sft_64.pth"), model_from(tmp_path / "out" / "dpo_64.pth")
    pairs = train_dpo.IndexedPairs(DPODataset(str(val), tokenizer, 64, show_progress=False))
    counts = {}
    with torch.no_grad():
        for i in range(len(pairs)):
            batch = train_dpo.collate_pairs([pairs[i]])
            ref_c, ref_r, *_ = train_dpo.pair_logps(start, batch)
            pol_c, pol_r, *_ = train_dpo.pair_logps(trained, batch)
            kind = pairs[i]["type"]
            row = counts.setdefault(kind, [0, 0, 0, 0])
            row[0] += 1
            row[1] += int(ref_c.item() > ref_r.item())  # before: pi = pi_ref, the rewards are all zero
            row[2] += int(pol_c.item() > pol_r.item())
            row[3] += int((pol_c - ref_c).item() > (pol_r - ref_r).item())
    before, after = result["before"], result["after"]
    assert set(counts) == set(TYPES)
    for kind in ("wrong_sum", "looping_reply"):
        n, pref_before, pref_after, reward_after = counts[kind]
        key = f"by_type/{kind}/"
        assert after[key + "pairs"] == before[key + "pairs"] == n
        assert before[key + "pref_accuracy"] == pytest.approx(pref_before / n)
        assert before[key + "reward_accuracy"] == 0.0
        assert after[key + "pref_accuracy"] == pytest.approx(pref_after / n)
        assert after[key + "reward_accuracy"] == pytest.approx(reward_after / n)
    assert not any(k.startswith("by_type/None") for k in after)
    assert after["pref_accuracy"] == pytest.approx(sum(r[2] for r in counts.values()) / len(pairs), abs=1e-6)
    summary = json.loads((tmp_path / "out" / "summaries" / "dpo.json").read_text())
    assert summary["by_type/wrong_sum/reward_accuracy_after"] == after["by_type/wrong_sum/reward_accuracy"]
    assert summary["by_type/looping_reply/pref_accuracy_before"] == before["by_type/looping_reply/pref_accuracy"]


def test_untyped_pairs_report_no_types(tmp_path, tokenizer):
    result = train_dpo.main(base_args(tmp_path, tokenizer, steps=1))
    assert not any(k.startswith("by_type/") for k in result["after"])
