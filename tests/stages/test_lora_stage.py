"""train_lora.py end to end on a random nano "SFT model" and tiny generated identity chats: only adapters train, the
base file stays bitwise unchanged, the adapter file holds only adapter tensors, and base + adapter (or the merged
checkpoint) reproduces the trained model; on a MoE model too, whose router biases LoRA must leave alone."""
import hashlib
import io
import json
import os
import random
import re
import sys

import pytest
import torch

import train_lora
from model import TinyMindConfig, TinyMindForCausalLM
from model.checkpoint import load_weights, save_weights, weight_path
from model.lora import DEFAULT_TARGETS, MLA_TARGETS, apply_lora, load_lora
from tests import TOKENIZER

VOCAB = 6400
QUESTIONS = ["Who are you?", "What is your name?", "Tell me your name.", "Introduce yourself.", "你是谁？",
             "你叫什么名字？"]
ANSWERS = ["I am TinyMind.", "My name is TinyMind.", "I'm TinyMind, a small model.", "我是TinyMind。"]


def write_identity(path, count, seed):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(count):
            chat = [{"role": "user", "content": rng.choice(QUESTIONS)},
                    {"role": "assistant", "content": rng.choice(ANSWERS)}]
            f.write(json.dumps({"conversations": chat}, ensure_ascii=False) + "\n")


def write_general(path, count, seed):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(count):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            chat = [{"role": "user", "content": f"{a} + {b} = ?"}, {"role": "assistant", "content": str(a + b)}]
            f.write(json.dumps({"conversations": chat}) + "\n")


def sha1(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def lora_args(root, steps=40, extra=()):
    return ["--data_path", str(root / "identity.jsonl"), "--general_val_path", str(root / "general_val.jsonl"),
            "--tokenizer_path", TOKENIZER, "--save_dir", str(root / "out"), "--max_steps", str(steps),
            "--batch_size", "2", "--max_seq_len", "128", "--learning_rate", "5e-3", "--lora_r", "4",
            "--replay_ratio", "0", "--log_interval", "8", "--eval_interval", "0", "--eval_prompts", "6",
            "--max_new_tokens", "10", "--dtype", "float32", "--num_threads", "1", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One LoRA run shared by the tests below (it is the slow part): a random nano model stands in for full_sft."""
    root = tmp_path_factory.mktemp("lora")
    write_identity(root / "identity.jsonl", 120, seed=0)
    write_identity(root / "identity_val.jsonl", 16, seed=1)
    write_general(root / "general_val.jsonl", 16, seed=2)
    torch.manual_seed(0)
    base = TinyMindForCausalLM(TinyMindConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2))
    base_file = root / "out" / "full_sft_64.pth"
    save_weights(base, str(base_file))
    base_hash = sha1(base_file)
    results = train_lora.main(lora_args(root, extra=["--merge", "1", "--export_peft", str(root / "peft")]))
    return {"root": root, "base_file": base_file, "base_hash": base_hash, "results": results}


def test_base_weights_on_disk_are_bitwise_unchanged(trained):
    assert sha1(trained["base_file"]) == trained["base_hash"]
    assert trained["results"]["adapter"] == str(trained["root"] / "out" / "lora" / "lora_identity_64.pth")


def test_adapter_file_holds_only_adapter_tensors_and_their_settings(trained):
    payload = torch.load(trained["results"]["adapter"], weights_only=True)
    assert set(payload) == {"lora", "config"}
    keys = list(payload["lora"])
    assert keys and all(k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight") for k in keys)
    assert len(keys) == 2 * 2 * len(DEFAULT_TARGETS)  # A and B for 7 projections in each of 2 layers
    assert payload["config"]["r"] == 4 and payload["config"]["alpha"] == 16.0
    assert payload["config"]["targets"] == list(DEFAULT_TARGETS)
    assert any(v.abs().sum() > 0 for k, v in payload["lora"].items() if "lora_B" in k)  # B left zero: no training
    base_bytes = os.path.getsize(trained["base_file"])
    assert os.path.getsize(trained["results"]["adapter"]) < base_bytes / 5


def test_base_plus_adapter_reproduces_the_trained_model(trained):
    out = trained["root"] / "out"
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    state, config = load_weights(str(trained["base_file"]))

    def fresh():
        model = TinyMindForCausalLM(config)
        model.load_state_dict(state, strict=False)
        return model.eval()

    # The resume checkpoint holds the trained model exactly as it was in memory (base + adapters).
    trained_model = apply_lora(fresh(), r=4, alpha=16, verbose=False)
    trained_model.load_state_dict(torch.load(out / "lora_identity_64_resume.pth", weights_only=True)["model"])
    reloaded = load_lora(fresh(), trained["results"]["adapter"])
    with torch.no_grad():
        expected = trained_model(ids).logits
        assert not torch.allclose(expected, fresh()(ids).logits, atol=1e-4)  # the adapter does change the model
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
        merged_state, merged_config = load_weights(trained["results"]["merged"])
        merged = TinyMindForCausalLM(merged_config)
        merged.load_state_dict(merged_state, strict=False)
        torch.testing.assert_close(merged.eval()(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert trained["results"]["merged"] == str(out / "lora_identity_merged_64.pth")
    assert sorted(os.listdir(trained["root"] / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_peft_export_loads_with_its_base_from_the_adapter_directory_alone(trained, monkeypatch):
    """--export_peft writes the base as a transformers directory beside the adapter and names it in
    adapter_config.json, so AutoPeftModelForCausalLM needs only the adapter's path, from any working directory,
    and computes what our merged checkpoint computes."""
    from peft import AutoPeftModelForCausalLM
    root, results = trained["root"], trained["results"]
    assert results["peft_base_dir"] == str(root / "peft") + "_base"
    adapter_config = json.loads((root / "peft" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == os.path.abspath(results["peft_base_dir"])
    monkeypatch.chdir(root / "out")
    theirs = AutoPeftModelForCausalLM.from_pretrained(str(root / "peft"), dtype=torch.float32).eval()
    merged_state, merged_config = load_weights(results["merged"])
    merged = TinyMindForCausalLM(merged_config)
    merged.load_state_dict(merged_state, strict=False)
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding, as batched generation uses
    with torch.no_grad():
        expected = merged.eval()(ids, attention_mask=mask).logits[mask.bool()]
        torch.testing.assert_close(theirs(ids, attention_mask=mask).logits[mask.bool()], expected,
                                   rtol=1e-5, atol=1e-5)


def test_adapter_learns_the_identity_chats_without_hurting_the_general_ones_much(trained, capsys):
    results = trained["results"]
    before, after = results["before"], results["after"]
    assert after["val_loss"] < before["val_loss"] - 0.5, (before, after)  # a random base learns slowly
    assert "keyword_rate" in after and results["within_margin"] in (True, False)
    assert results["general_loss_rise"] == pytest.approx(after["general_val_loss"] - before["general_val_loss"])


def test_neftune_noise_changes_training_but_not_evaluation(trained, tmp_path):
    """--neftune_noise_alpha reaches the model: from the same base and seed the adapter trains differently, while the
    held-out metrics before training (eval mode, no noise) are the same as without it."""
    runs = {}
    for alpha in ("0", "10"):
        out = tmp_path / f"alpha{alpha}"
        out.mkdir()
        for suffix in (".pth", ".json"):
            source = trained["base_file"].with_suffix(suffix)
            if source.exists():
                (out / source.name).write_bytes(source.read_bytes())
        args = lora_args(trained["root"], steps=4, extra=["--save_dir", str(out), "--neftune_noise_alpha", alpha])
        results = train_lora.main(args)
        runs[alpha] = results["before"], load_lora(TinyMindForCausalLM(TinyMindConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
            results["adapter"])
    assert runs["0"][0] == runs["10"][0]
    plain, noisy = (dict(model.named_parameters()) for _, model in (runs["0"], runs["10"]))
    adapter_names = [name for name in plain if "lora_" in name]
    assert adapter_names and any(not torch.equal(plain[n], noisy[n]) for n in adapter_names)


def test_lora_on_a_moe_model_base_plus_adapter_is_the_trained_model(tmp_path):
    """The Trainer calls update_moe_biases after every step; in a LoRA run it must leave the aux-free router biases
    of the base as they are, since the adapter file holds only A/B. --bias_update_speed 0.05 makes any bias step
    move many tokens to other experts. Unpacked batches: padded rows go through the MoE layers too."""
    write_identity(tmp_path / "identity.jsonl", 24, seed=0)
    write_identity(tmp_path / "identity_val.jsonl", 4, seed=1)
    write_general(tmp_path / "general_val.jsonl", 4, seed=2)
    torch.manual_seed(0)
    config = TinyMindConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, use_moe=True, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=64, first_k_dense_replace=1)
    base_file = weight_path(str(tmp_path / "base"), "full_sft", config)
    save_weights(TinyMindForCausalLM(config), base_file)
    results = train_lora.main(lora_args(tmp_path, steps=6, extra=[
        "--from_weight", base_file, "--bias_update_speed", "0.05", "--packing", "0", "--eval_prompts", "0",
        "--merge", "1"]))
    out = tmp_path / "out"
    assert results["adapter"] == str(out / "lora" / "lora_identity_64_moe.pth")
    state, config = load_weights(base_file)

    def fresh():
        model = TinyMindForCausalLM(config)
        model.load_state_dict(state, strict=False)
        return model.eval()

    # What got adapters: attention (2 layers x 4), the dense layer's FFN and layer 1's shared expert (3 each);
    # not the routed experts (stacked 3D parameters) nor the router.
    adapted = {k.rsplit(".lora_", 1)[0] for k in torch.load(results["adapter"], weights_only=True)["lora"]}
    assert len(adapted) == 8 + 3 + 3 and "model.layers.1.mlp.shared_experts.down_proj" in adapted
    assert not any(".experts." in name or name.endswith("mlp.gate") for name in adapted)
    # The trained model exactly as it was in memory (base + adapters) is in the resume checkpoint.
    trained_state = torch.load(out / "lora_identity_64_moe_resume.pth", weights_only=True)["model"]
    biases = [k for k in state if k.endswith("e_score_correction_bias")]
    assert biases and all(torch.equal(trained_state[k], state[k]) for k in biases)  # the base's biases, untouched
    trained_model = apply_lora(fresh(), r=4, alpha=16, verbose=False)
    trained_model.load_state_dict(trained_state)
    reloaded = load_lora(fresh(), results["adapter"])  # what eval_model --lora_name does
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained_model(ids).logits
        assert not torch.allclose(expected, fresh()(ids).logits, atol=1e-4)  # the adapter does change the model
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)
        merged_state, merged_config = load_weights(results["merged"])
        merged = TinyMindForCausalLM(merged_config)
        merged.load_state_dict(merged_state, strict=False)
        torch.testing.assert_close(merged.eval()(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_bad_line_is_reported_with_path_and_line(trained):
    data = trained["root"] / "bad.jsonl"
    data.write_text('{"conversations": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    args = lora_args(trained["root"], extra=["--val_data_path", str(trained["root"] / "identity_val.jsonl")])
    args[args.index("--data_path") + 1] = str(data)
    with pytest.raises(SystemExit, match=rf"{data}:1: no assistant message to learn from"):
        train_lora.main(args)


def test_missing_sft_weights_is_a_clear_error(tmp_path):
    write_identity(tmp_path / "identity.jsonl", 8, seed=0)
    write_identity(tmp_path / "identity_val.jsonl", 4, seed=1)
    write_general(tmp_path / "general_val.jsonl", 4, seed=2)
    with pytest.raises(SystemExit, match="no 'full_sft' weights"):
        train_lora.main(lora_args(tmp_path))


def test_lora_targets_flag():
    config = TinyMindConfig(use_mla=True)
    assert train_lora.lora_targets("q_proj, v_proj", config) == ("q_proj", "v_proj")
    assert train_lora.lora_targets("all", config) == DEFAULT_TARGETS + MLA_TARGETS
    assert train_lora.lora_targets(r".*layers\.0\..*_proj", config) == r".*layers\.0\..*_proj"


def segments(batch) -> list[tuple[int, list[int]]]:
    """(row, token ids) of each conversation packed into a collated batch: position ids restart at 0 for each
    (and are 0 on padding, which comes out as one-token segments)."""
    found = []
    for row in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist()
        ends = starts[1:] + [batch["input_ids"].shape[1]]
        for a, b in zip(starts, ends):
            found.append((row, batch["input_ids"][row, a:b].tolist()))
    return found


def save_tiny_sft_model(root):
    """A one-layer, 32-wide SFT checkpoint at <root>/out/full_sft_32.pth, for tests of the replay batches."""
    torch.manual_seed(0)
    save_weights(TinyMindForCausalLM(TinyMindConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, num_key_value_heads=1)),
                 str(root / "out" / "full_sft_32.pth"))


def test_replay_batches_hold_general_chats_at_the_asked_ratio(tmp_path, monkeypatch):
    """Through the real training loop: every batch train_lora's loss sees holds about --replay_ratio of its
    tokens from the replay file, and each epoch replays chats the previous one did not."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    write_identity(tmp_path / "identity.jsonl", 40, seed=0)
    write_identity(tmp_path / "identity_val.jsonl", 4, seed=1)
    with open(tmp_path / "general.jsonl", "w", encoding="utf-8") as f:  # 400 different sums
        for a in range(20, 40):
            for b in range(20, 40):
                chat = [{"role": "user", "content": f"{a} + {b} = ?"}, {"role": "assistant", "content": str(a + b)}]
                f.write(json.dumps({"conversations": chat}) + "\n")
    write_general(tmp_path / "general_val.jsonl", 4, seed=2)
    save_tiny_sft_model(tmp_path)
    batches, real_loss_fn = [], train_lora.loss_fn

    def recording_loss(model, batch):
        batches.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
        return real_loss_fn(model, batch)

    monkeypatch.setattr(train_lora, "loss_fn", recording_loss)
    ratio = 0.5
    train_lora.main(lora_args(tmp_path, steps=1000, extra=[
        "--replay_data_path", str(tmp_path / "general.jsonl"), "--replay_ratio", str(ratio), "--epochs", "2",
        "--eval_prompts", "0", "--lora_r", "2"]))
    assert len(batches) >= 4
    shares, replayed_by_half = [], [set(), set()]
    for step, batch in enumerate(batches):
        own = replayed = 0
        for _, ids in segments(batch):
            ids = [t for t in ids if t != tokenizer.pad_token_id]
            if not ids:
                continue  # padding after a row's last conversation (position ids 0 there too)
            text = tokenizer.decode(ids)
            if "TinyMind" in text:
                own += len(ids)
            else:
                assert " + " in text, text  # nothing else is in these rows
                replayed += len(ids)
                replayed_by_half[2 * step // len(batches)].add(text)
        shares.append(replayed / (own + replayed))
    assert all(abs(share - ratio) < 0.1 for share in shares), shares  # every batch, not just on average
    assert abs(sum(shares) / len(shares) - ratio) < 0.03, shares
    # the second epoch replays other chats than the first (400 different sums: enough for both)
    assert replayed_by_half[1] and not replayed_by_half[0] & replayed_by_half[1]


def test_replay_skip_replies_leaves_matching_chats_out_of_every_batch(tmp_path, monkeypatch, capsys):
    """--replay_skip_replies REGEX: a general chat with an assistant reply starting with a match is never replayed;
    the others still are. A pattern that matches every chat, or is no regular expression, is a clear error."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    write_identity(tmp_path / "identity.jsonl", 24, seed=0)
    write_identity(tmp_path / "identity_val.jsonl", 4, seed=1)
    write_general(tmp_path / "general_val.jsonl", 4, seed=2)
    with open(tmp_path / "general.jsonl", "w", encoding="utf-8") as f:  # sums, every third one a verse reply
        for a in range(20, 80):
            reply = f"The next line is: {a}" if a % 3 == 0 else str(a + 1)
            chat = [{"role": "user", "content": f"{a} + 1 = ?"}, {"role": "assistant", "content": reply}]
            f.write(json.dumps({"conversations": chat}) + "\n")
    save_tiny_sft_model(tmp_path)
    texts, real_loss_fn = [], train_lora.loss_fn

    def recording_loss(model, batch):
        texts.extend(tokenizer.decode([t for t in ids if t != tokenizer.pad_token_id]) for _, ids in segments(batch))
        return real_loss_fn(model, batch)

    monkeypatch.setattr(train_lora, "loss_fn", recording_loss)
    replay = ["--replay_data_path", str(tmp_path / "general.jsonl"), "--replay_ratio", "0.5"]
    train_lora.main(lora_args(tmp_path, steps=1000, extra=[*replay, "--replay_skip_replies", "The next line",
                                                           "--epochs", "2", "--eval_prompts", "0", "--lora_r", "2"]))
    assert "20 chats with a reply matching 'The next line' left out, 40 kept" in capsys.readouterr().out
    replayed = [t for t in texts if " + 1 = ?" in t]
    assert len(replayed) > 10 and not any("The next line" in t for t in replayed)
    for pattern, message in (("\\d|The", "every conversation has a reply matching"), ("(", "--replay_skip_replies")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            train_lora.main(lora_args(tmp_path, extra=[*replay, "--replay_skip_replies", pattern]))


def test_replay_mix_rows_depend_only_on_seed_and_epoch(tmp_path):
    """A resumed run rebuilds the epoch it stopped in: the rows of epoch e are the same whether the mix went
    through epochs 0..e-1 first or jumped there; the general chats of consecutive epochs do not repeat while the
    file lasts; unpacked, the conversations hold the ratio on average."""
    from transformers import AutoTokenizer

    from model.data.chat import SFTDataset
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    write_identity(tmp_path / "identity.jsonl", 30, seed=0)
    write_general(tmp_path / "general.jsonl", 300, seed=1)
    own = SFTDataset(str(tmp_path / "identity.jsonl"), tokenizer, 128, show_progress=False)
    general = SFTDataset(str(tmp_path / "general.jsonl"), tokenizer, 128, show_progress=False)
    walked = train_lora.ReplayMix(own, general, 0.4, 128, packed=True, seed=3)
    rows = []
    for epoch in range(3):
        walked.set_epoch(epoch)
        rows.append(list(walked.rows))
    jumped = train_lora.ReplayMix(own, general, 0.4, 128, packed=True, seed=3)
    jumped.set_epoch(2)
    assert jumped.rows == rows[2]
    jumped.set_epoch(1)  # backwards too
    assert jumped.rows == rows[1]
    drawn = [[c for _, replayed in epoch_rows for c in replayed] for epoch_rows in rows]
    assert not set(drawn[0]) & set(drawn[1]) and len(drawn[0]) == len(set(drawn[0]))
    own_tokens, replayed_tokens = walked.token_counts()
    assert abs(replayed_tokens / (own_tokens + replayed_tokens) - 0.4) < 0.05
    assert all(len(own_part) for own_part, _ in rows[0])  # each adapter chat sits in one row, with its replay
    assert sorted(i for own_part, _ in rows[0] for i in own_part) == list(range(len(own)))
    unpacked = train_lora.ReplayMix(own, general, 0.4, 128, packed=False, seed=3)
    assert len(unpacked) == len(own) + round(len(own) * 0.4 / 0.6)
    assert [len(unpacked[i]["input_ids"]) for i in range(len(own))] == own.lengths().tolist()


def test_general_chats_too_long_to_share_a_row_are_replayed_alone(tmp_path):
    """A general chat longer than the room beside the adapter's chats is not skipped: it gets a row of its own when
    the stream reaches it, so long replies (code, recitals) are replayed too; short ones still share rows."""
    from transformers import AutoTokenizer

    from model.data.chat import SFTDataset
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    write_identity(tmp_path / "identity.jsonl", 30, seed=0)
    write_general(tmp_path / "general.jsonl", 60, seed=1)
    with open(tmp_path / "general.jsonl", "a", encoding="utf-8") as f:
        for k in range(6):
            chat = [{"role": "user", "content": f"count to {50 + k}"},
                    {"role": "assistant", "content": " ".join(str(n) for n in range(50 + k))}]
            f.write(json.dumps({"conversations": chat}) + "\n")
    own = SFTDataset(str(tmp_path / "identity.jsonl"), tokenizer, 128, show_progress=False)
    general = SFTDataset(str(tmp_path / "general.jsonl"), tokenizer, 128, show_progress=False)
    mix = train_lora.ReplayMix(own, general, 0.4, 128, packed=True, seed=3)
    lengths = general.lengths()
    long = {i for i in range(len(general)) if lengths[i] > mix.shared_room}
    assert len(long) == 6 == mix.replayed_alone()
    replayed = []
    for epoch in range(4):
        mix.set_epoch(epoch)
        for own_part, general_part in mix.rows:
            assert len(general_part) == 1 and not own_part if set(general_part) & long else own_part
            replayed += general_part
            assert len(mix[mix.rows.index((own_part, general_part))]["input_ids"]) <= 128
    assert long <= set(replayed)  # every long chat came up within four epochs
    own_tokens, replayed_tokens = mix.token_counts()
    assert 0.35 < replayed_tokens / (own_tokens + replayed_tokens) < 0.6


def test_bad_replay_line_is_reported_with_path_and_line(tmp_path):
    write_identity(tmp_path / "identity.jsonl", 8, seed=0)
    write_identity(tmp_path / "identity_val.jsonl", 4, seed=1)
    write_general(tmp_path / "general_val.jsonl", 4, seed=2)
    bad = tmp_path / "replay.jsonl"
    write_general(bad, 1, seed=3)
    with open(bad, "a", encoding="utf-8") as f:
        f.write('{"conversations": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(SystemExit, match=rf"{bad}:2: no assistant message to learn from"):
        train_lora.main(lora_args(tmp_path, extra=["--replay_data_path", str(bad), "--replay_ratio", "0.5"]))


def test_replay_ratio_outside_zero_to_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        train_lora.parse_args(["--replay_ratio", "1"])
    assert "--replay_ratio must be in [0, 1)" in capsys.readouterr().err


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("tty", [True, False])
def test_long_held_out_evaluation_shows_a_bar_only_on_a_terminal(tmp_path, monkeypatch, tty):
    """The bar (labelled with the held-out file) is for a person watching a terminal; redirected into a log, its
    carriage returns would pile up into one endless line, so a non-tty stdout gets no bar text at all."""
    from transformers import AutoTokenizer

    from model.data.chat import SFTDataset
    from model.training.evaluation import MIN_BATCHES_FOR_BAR, assistant_token_loss
    from model.training.runtime import Runtime
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    write_identity(tmp_path / "held_out.jsonl", 2 * MIN_BATCHES_FOR_BAR, seed=0)
    chats = SFTDataset(str(tmp_path / "held_out.jsonl"), tokenizer, 32, show_progress=False)
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1))
    stdout = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)
    # max_seq_len 32 fits one chat per packed row (a few are dropped as too long): 16 batches of one row
    loss = assistant_token_loss(model, chats, Runtime(torch.device("cpu"), torch.float32), 1, 32)
    monkeypatch.undo()
    assert loss > 0
    assert ("eval held_out.jsonl" in stdout.getvalue()) == tty
    if not tty:
        assert stdout.getvalue() == ""
