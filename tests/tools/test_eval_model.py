"""eval_model.py scripted and interactive: answers equal direct generation with the right prompt (chat template for
chat stages, BOS + text for pretrain), history, seeds, LoRA adapters, MoE/MLA checkpoints, clear errors, and bf16
loading that casts only the weights (RoPE frequencies and the MoE bias stay fp32)."""
import json
import os

import pytest
import torch

import eval_model
from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
from model.checkpoint import save_weights
from model.inference import build_prompt, default_generation_config, load_model_for_inference, trim_history
from tests import TOKENIZER

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

PROMPTS = ["你好，请介绍一下你自己", "What is the capital of France?"]


def make_checkpoint(out_dir, name, vocab_size, seed=0, **overrides) -> TinyMindForCausalLM:
    """A tiny random model saved as the training scripts save one: <name>.pth + <name>.json."""
    torch.manual_seed(seed)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=vocab_size, **{**PRESETS["nano"], **overrides})).eval()
    save_weights(model, os.path.join(out_dir, f"{name}.pth"))
    return model


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("out")
    make_checkpoint(path, "pretrain_64", len(tokenizer), seed=0)
    make_checkpoint(path, "full_sft_64", len(tokenizer), seed=1)
    return path


def run(out_dir, tmp_path, *extra, prompts=PROMPTS):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    output = tmp_path / "answers.jsonl"
    eval_model.main(["--save_dir", str(out_dir), "--tokenizer_path", TOKENIZER, "--prompts", str(prompt_file),
                     "--output", str(output), "--max_new_tokens", "8", "--device", "cpu", *extra])
    return [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]


def greedy_reference(model, tokenizer, prompt_text, max_new_tokens=8):
    ids = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    config = default_generation_config(tokenizer, temperature=0, repetition_penalty=1.0, max_new_tokens=max_new_tokens)
    with torch.no_grad():
        out = model.generate(ids, generation_config=config)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ids.shape[1]


def load(out_dir, name):
    state = torch.load(os.path.join(out_dir, f"{name}.pth"), weights_only=True)
    model = TinyMindForCausalLM(TinyMindConfig.from_json_file(os.path.join(out_dir, f"{name}.json")))
    model.load_state_dict(state)
    return model.eval()


def test_chat_checkpoint_answers_through_the_chat_template(out_dir, tmp_path, tokenizer, capsys):
    results = run(out_dir, tmp_path, "--weight", "full_sft", "--temperature", "0", "--repetition_penalty", "1.0")
    model = load(out_dir, "full_sft_64")
    for prompt, result in zip(PROMPTS, results, strict=True):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        answer, prompt_tokens = greedy_reference(model, tokenizer, chat)
        assert result["answer"] == answer and result["prompt_tokens"] == prompt_tokens
        assert result["new_tokens"] <= 8 and result["finish_reason"] in ("stop", "length")
    printed = capsys.readouterr().out
    assert all(prompt in printed for prompt in PROMPTS) and results[0]["answer"] in printed


def test_pretrain_checkpoint_continues_text(out_dir, tmp_path, tokenizer):
    results = run(out_dir, tmp_path, "--weight", "pretrain", "--temperature", "0", "--repetition_penalty", "1.0")
    model = load(out_dir, "pretrain_64")
    for prompt, result in zip(PROMPTS, results, strict=True):
        answer, prompt_tokens = greedy_reference(model, tokenizer, "<|im_start|>" + prompt)
        assert result["answer"] == answer and result["prompt_tokens"] == prompt_tokens


def test_recorded_stage_decides_the_mode_whatever_the_file_is_called(tmp_path, tokenizer):
    """A pretrain checkpoint renamed (say, to what it is trained on) still continues text, and a chat stage's
    checkpoint named like a pretrain one still chats: the stage is recorded in the config JSON. A LoRA adapter on
    top keeps its base's mode."""
    model = make_checkpoint(tmp_path, "base_64", len(tokenizer))
    save_weights(model, str(tmp_path / "wiki_base_64.pth"), stage="pretrain")
    save_weights(model, str(tmp_path / "pretrain_then_sft_64.pth"), stage="full_sft")
    modes = {name: load_model_for_inference(load_from=str(tmp_path / f"{name}.pth"), tokenizer_path=TOKENIZER,
                                            device="cpu", verbose=False).mode
             for name in ("wiki_base_64", "pretrain_then_sft_64", "base_64")}
    assert modes == {"wiki_base_64": "continue", "pretrain_then_sft_64": "chat", "base_64": "chat"}

    from model.lora import apply_lora, save_lora
    save_lora(apply_lora(model, r=2, alpha=4, verbose=False), str(tmp_path / "lora" / "lora_x_64.pth"))
    loaded = load_model_for_inference(load_from=str(tmp_path / "wiki_base_64.pth"), lora_name="lora_x",
                                      save_dir=str(tmp_path), tokenizer_path=TOKENIZER, device="cpu", verbose=False)
    assert loaded.mode == "continue"


def test_history_turns_sends_earlier_exchanges(out_dir, tmp_path, tokenizer):
    alone = run(out_dir, tmp_path, "--weight", "full_sft", "--temperature", "0")
    with_history = run(out_dir, tmp_path, "--weight", "full_sft", "--temperature", "0", "--history_turns", "1")
    assert alone[1]["prompt_tokens"] < with_history[1]["prompt_tokens"]
    conversation = [{"role": "user", "content": PROMPTS[0]},
                    {"role": "assistant", "content": with_history[0]["answer"]},
                    {"role": "user", "content": PROMPTS[1]}]
    expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert with_history[1]["prompt_tokens"] == len(tokenizer(expected, add_special_tokens=False)["input_ids"])


def test_trim_history_keeps_system_and_last_turns():
    messages = [{"role": "system", "content": "s"}] + [
        {"role": role, "content": f"{role}{i}"} for i in range(3) for role in ("user", "assistant")] + [
        {"role": "user", "content": "now"}]
    assert [m["content"] for m in trim_history(messages, 0)] == ["s", "now"]
    assert [m["content"] for m in trim_history(messages, 1)] == ["s", "user2", "assistant2", "now"]
    assert len(trim_history(messages, 10)) == len(messages)


def test_sampling_is_reproducible_with_a_seed(out_dir, tmp_path):
    first = run(out_dir, tmp_path, "--weight", "full_sft", "--temperature", "1.0", "--top_k", "50", "--seed", "7")
    again = run(out_dir, tmp_path, "--weight", "full_sft", "--temperature", "1.0", "--top_k", "50", "--seed", "7")
    other = run(out_dir, tmp_path, "--weight", "full_sft", "--temperature", "1.0", "--top_k", "50", "--seed", "8")
    assert [r["answer"] for r in first] == [r["answer"] for r in again]
    assert [r["answer"] for r in first] != [r["answer"] for r in other]


def test_show_speed_builtin_prompts_and_json_summary(out_dir, tmp_path, capsys):
    summary_file = tmp_path / "summaries" / "samples_full_sft.json"
    eval_model.main(["--save_dir", str(out_dir), "--tokenizer_path", TOKENIZER, "--weight", "full_sft", "--prompts",
                     "builtin", "--max_new_tokens", "4", "--show_speed", "--device", "cpu", "--output",
                     str(summary_file)])
    printed = capsys.readouterr().out
    assert printed.count("tokens/s") == len(eval_model.BUILTIN_CHAT_PROMPTS)
    summary = json.loads(summary_file.read_text(encoding="utf-8"))  # one object, as scripts/report.py reads it
    assert summary["model"] == "full_sft_64" and list(summary["samples"]) == eval_model.BUILTIN_CHAT_PROMPTS


def test_interactive_chat_reads_until_exit(out_dir, monkeypatch, capsys):
    typed = iter(["你好", "/clear", "", "再见", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    eval_model.main(["--save_dir", str(out_dir), "--tokenizer_path", TOKENIZER, "--weight", "full_sft",
                     "--max_new_tokens", "4", "--device", "cpu", "--history_turns", "2"])
    printed = capsys.readouterr().out
    assert printed.count("🤖:") == 2 and "(history cleared)" in printed


def test_lora_adapter_is_loaded_and_merged(out_dir, tmp_path, tokenizer):
    from model.lora import apply_lora, remove_lora, save_lora
    model = apply_lora(load(out_dir, "full_sft_64"), r=4, alpha=8, verbose=False)
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.5)  # a trained-looking adapter: B = 0 would change nothing
    save_lora(model, os.path.join(out_dir, "lora", "lora_test_64.pth"))
    merged = remove_lora(model, merge=True).eval()
    results = run(out_dir, tmp_path, "--weight", "full_sft", "--lora_name", "lora_test", "--temperature", "0",
                  "--repetition_penalty", "1.0")
    plain = run(out_dir, tmp_path, "--weight", "full_sft", "--temperature", "0", "--repetition_penalty", "1.0")
    chat = build_prompt(tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    assert results[0]["answer"] == greedy_reference(merged, tokenizer, chat)[0]
    assert [r["answer"] for r in results] != [r["answer"] for r in plain]
    with pytest.raises(SystemExit, match="LoRA adapter not found"):
        run(out_dir, tmp_path, "--weight", "full_sft", "--lora_name", "nope")


@pytest.mark.parametrize("variant", [dict(use_moe=True, num_experts=4, num_experts_per_tok=2),
                                     dict(use_mla=True, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                          v_head_dim=16)], ids=["moe", "mla"])
def test_moe_and_mla_checkpoints_need_no_model_flags(tmp_path, tokenizer, variant):
    out = tmp_path / "out"
    suffix = "_moe" if variant.get("use_moe") else "_mla"
    model = make_checkpoint(out, f"full_sft_64{suffix}", len(tokenizer), seed=2, **variant)
    results = run(out, tmp_path, "--load_from", str(out / f"full_sft_64{suffix}.pth"), "--temperature", "0",
                  "--repetition_penalty", "1.0")
    assert results[0]["answer"] == greedy_reference(model, tokenizer, build_prompt(
        tokenizer, [{"role": "user", "content": PROMPTS[0]}]))[0]
    # a stage name finds it too, and --use_moe/--use_mla pick it when a dense file of that stage is beside it
    make_checkpoint(out, "full_sft_64", len(tokenizer), seed=5)
    flag = "--use_moe" if variant.get("use_moe") else "--use_mla"
    picked = run(out, tmp_path, "--weight", "full_sft", flag, "1", "--temperature", "0", "--repetition_penalty", "1.0")
    assert [r["answer"] for r in picked] == [r["answer"] for r in results]
    with pytest.raises(SystemExit, match="several 'full_sft' weights"):
        run(out, tmp_path, "--weight", "full_sft")


def test_clear_errors(out_dir, tmp_path):
    with pytest.raises(SystemExit, match="no 'dpo' weights"):
        run(out_dir, tmp_path, "--weight", "dpo")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    torch.save(load(out_dir, "full_sft_64").state_dict(), lonely / "full_sft_64.pth")
    with pytest.raises(SystemExit, match="config JSON beside it"):
        run(lonely, tmp_path, "--weight", "full_sft")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"oops": 1}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: expected an object"):
        eval_model.main(["--save_dir", str(out_dir), "--tokenizer_path", TOKENIZER, "--prompts", str(bad)])
    with pytest.raises(SystemExit, match="--prompts file not found"):
        eval_model.main(["--save_dir", str(out_dir), "--tokenizer_path", TOKENIZER, "--prompts", "nope.txt"])


# ============================================================= bf16 inference keeps RoPE's frequencies in fp32

MLA = dict(use_mla=True, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
MOE = dict(use_moe=True, num_experts=4, num_experts_per_tok=2)


def position_sensitive_checkpoint(path, vocab_size, **overrides) -> str:
    """A nano model whose attention depends on position. At init scale, queries and keys are so small that every
    token attends almost uniformly and RoPE hardly matters; x10 on their projections makes attention sharp, as a
    trained model's is, so a wrong rotation shows in the logits."""
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=vocab_size, **{**PRESETS["nano"], **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("q_proj", "k_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj")):
                param.mul_(10)
    save_weights(model, str(path))
    return str(path)


def bf16_error_near_and_far(model_fp32, model_bf16, vocab_size, length=2048, window=256) -> tuple[float, float]:
    """Largest logit difference bf16 vs fp32 over the first `window` positions and over the last ones. Near the
    start, rounding RoPE's frequencies cannot add up to much (the angle error grows with query-key distance), so
    that is the model's ordinary bf16 error; far from the start it must stay the same size."""
    ids = torch.randint(3, vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = (model_bf16(ids).logits.float() - model_fp32(ids).logits.float()).abs()[0]
    return error[:window].max().item(), error[-window:].max().item()


def assert_weights_cast_buffers_kept(model, dtype, reference):
    """Every parameter in `dtype`; every floating buffer still fp32 and equal to the fp32 model's."""
    assert {p.dtype for p in model.parameters()} == {dtype}
    reference_buffers = dict(reference.named_buffers())
    buffers = {name: b for name, b in model.named_buffers() if b.is_floating_point()}
    assert any(name.endswith("inv_freq") for name in buffers)
    for name, buffer in buffers.items():
        assert buffer.dtype == torch.float32, f"{name} was cast to {buffer.dtype}"
        assert torch.equal(buffer, reference_buffers[name]), name


@pytest.mark.parametrize("source", ["dense", "mla", "llama_dir"])
def test_bfloat16_inference_keeps_rope_in_fp32_at_long_positions(tmp_path, tokenizer, source):
    """Loading with --dtype bfloat16 casts the weights only. Casting RoPE's inv_freq too (model.to(bf16)) ran a
    different model from the trained one: the far error was 2.7-9x the near one (seeds 0-4 of this model; 7x for
    dense, 5x for MLA at seed 0), against at most 1.05x when the frequencies stay fp32."""
    path = position_sensitive_checkpoint(tmp_path / "full_sft_64.pth", len(tokenizer),
                                         **(MLA if source == "mla" else {}))
    if source == "llama_dir":  # a transformers directory: load_transformers_dir, then the same cast
        from scripts import convert_model
        convert_model.main(["--load_from", path, "--out_dir", str(tmp_path / "export"), "--tokenizer_path",
                            TOKENIZER])
        path = str(tmp_path / "export")
    loaded = {dtype: load_model_for_inference(load_from=path, tokenizer_path=TOKENIZER, device="cpu", dtype=dtype,
                                              verbose=False).model for dtype in ("float32", "bfloat16")}
    assert_weights_cast_buffers_kept(loaded["bfloat16"], torch.bfloat16, loaded["float32"])
    near, far = bf16_error_near_and_far(loaded["float32"], loaded["bfloat16"], len(tokenizer))
    assert far < 2 * near, f"bf16 logit error {far:.4f} at positions 1792-2047 vs {near:.4f} at 0-255"


def test_bfloat16_inference_keeps_the_moe_bias_in_fp32(tmp_path, tokenizer):
    """The MoE router's balancing bias is a buffer, not a weight: it stays fp32 in a bf16 model, loaded from our
    checkpoint or from the transformers directory convert_model writes for MoE (model_type tinymind)."""
    from scripts import convert_model
    torch.manual_seed(0)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **{**PRESETS["nano"], **MOE}))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(std=1e-3)  # steps bf16 would round away
    save_weights(model, str(tmp_path / "full_sft_64_moe.pth"))
    convert_model.main(["--load_from", str(tmp_path / "full_sft_64_moe.pth"), "--out_dir", str(tmp_path / "export"),
                        "--tokenizer_path", TOKENIZER])
    for path in (tmp_path / "full_sft_64_moe.pth", tmp_path / "export"):
        loaded = load_model_for_inference(load_from=str(path), tokenizer_path=TOKENIZER, device="cpu",
                                          dtype="bfloat16", verbose=False).model
        assert_weights_cast_buffers_kept(loaded, torch.bfloat16, model)


HELD_OUT = [  # one record of each kind a heldout: file may hold, and one with no prompt to ask (skipped)
    {"conversations": [{"role": "assistant", "content": "opening line only"}]},
    {"conversations": [{"role": "system", "content": "你是一个熟悉中国古典诗词的助手。"},
                       {"role": "user", "content": "《静夜思》的下一句是什么？床前明月光，"},
                       {"role": "assistant", "content": "疑是地上霜。"}]},
    {"conversations": [{"role": "user", "content": "嗨"}, {"role": "assistant", "content": "嗨！"},
                       {"role": "user", "content": "你叫什么"}, {"role": "assistant", "content": "我叫TinyMind。"}]},
    {"conversations": [{"role": "user", "content": "6 + 10 = ?"}], "answer": "16"},
    {"chosen": [{"role": "user", "content": "3 + 4 = ?"}, {"role": "assistant", "content": "3 + 4 = 7"}],
     "rejected": [{"role": "user", "content": "3 + 4 = ?"}, {"role": "assistant", "content": "8"}],
     "type": "wrong_sum"},
    {"text": "《静夜思》 唐·李白\n床前明月光，\n疑是地上霜。\n举头望明月，"},
]


def test_held_out_prompts_are_answered_beside_their_references(out_dir, tmp_path, tokenizer, capsys):
    """heldout:<file>: each record's turns before its last assistant reply are the prompt (system message and
    earlier exchanges included, exactly as the chat template renders them), that reply (or "answer") the reference;
    --out_of_domain adds open prompts marked as such; the .json summary keeps all of it for the report."""
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in HELD_OUT), encoding="utf-8")
    summary_file = tmp_path / "summaries" / "samples_full_sft.json"
    eval_model.main(["--save_dir", str(out_dir), "--tokenizer_path", TOKENIZER, "--weight", "full_sft", "--prompts",
                     f"heldout:{data}", "--num_prompts", "4", "--out_of_domain", "1", "--temperature", "0",
                     "--repetition_penalty", "1.0", "--max_new_tokens", "6", "--device", "cpu",
                     "--output", str(summary_file)])
    results = json.loads(summary_file.read_text(encoding="utf-8"))["results"]
    assert [r["prompt"] for r in results] == ["《静夜思》的下一句是什么？床前明月光，", "你叫什么", "6 + 10 = ?",
                                              "3 + 4 = ?", eval_model.OUT_OF_DOMAIN_CHAT_PROMPTS[0]]
    assert [r.get("reference") for r in results] == ["疑是地上霜。", "我叫TinyMind。", "16", "3 + 4 = 7", None]
    assert [r["domain"] for r in results] == ["in domain"] * 4 + ["out of domain"]
    model = load(out_dir, "full_sft_64")
    for record, result in zip(HELD_OUT[1:5], results):
        messages = record.get("conversations") or record["chosen"]
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        answer, prompt_tokens = greedy_reference(model, tokenizer, chat, max_new_tokens=6)
        assert result["answer"] == answer and result["prompt_tokens"] == prompt_tokens
    assert results[1]["context"] == HELD_OUT[2]["conversations"][:2]
    printed = capsys.readouterr().out
    assert "📖 reference: 疑是地上霜。" in printed and "[out of domain]" in printed


def test_held_out_pretraining_text_asks_for_the_next_line(tmp_path):
    items = eval_model.read_prompts(f"heldout:{write_jsonl(tmp_path, HELD_OUT)}", "continue", 10)
    assert items[-1]["prompt"] == "《静夜思》 唐·李白\n床前明月光，\n" and items[-1]["reference"] == "疑是地上霜。"
    assert len(items) == 5 and all(item["domain"] == "in domain" for item in items)
    assert [p["prompt"] for p in eval_model.out_of_domain_prompts("continue", 2)] == \
        eval_model.OUT_OF_DOMAIN_CONTINUE_PROMPTS


def test_held_out_file_without_prompts_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no record with a prompt"):
        eval_model.read_prompts(f"heldout:{write_jsonl(tmp_path, [{'other': 1}])}", "chat")


def write_jsonl(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
