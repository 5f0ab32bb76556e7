"""The shipped tokenizer (model/tokenizer.json + tokenizer_config.json): exact round trips, fixed ids, chat template.

Everything loads from the repository, offline; the whole file runs in a few seconds.
"""

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO_ROOT / "model"

EXPECTED_IDS = {
    "<|endoftext|>": 0,
    "<|im_start|>": 1,
    "<|im_end|>": 2,
    "<think>": 3,
    "</think>": 4,
    "<answer>": 5,
    "</answer>": 6,
    "<tool_call>": 7,
    "</tool_call>": 8,
}

SYSTEM_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "床前明月光的下一句是什么？"},
    {"role": "assistant", "content": "疑是地上霜。"},
    {"role": "user", "content": "What is 3 + 5?"},
    {"role": "assistant", "content": "8", "reasoning_content": "3 + 5 = 8."},
]
SYSTEM_CHAT_RENDERED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n床前明月光的下一句是什么？<|im_end|>\n"
    "<|im_start|>assistant\n疑是地上霜。<|im_end|>\n"
    "<|im_start|>user\nWhat is 3 + 5?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n3 + 5 = 8.\n</think>\n\n8<|im_end|>\n"
)
TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
TOOL_CHAT = [
    {"role": "user", "content": "What is 2 + 3? Use the tool."},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": "2 + 3 = 5."},
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def train_tokenizer_script():
    """scripts/train_tokenizer.py, imported as the package module it is."""
    from scripts import train_tokenizer
    return train_tokenizer


# ---- vocabulary and ids


def test_vocabulary_size(tokenizer):
    assert len(tokenizer) == 6400


def test_added_token_ids_are_fixed(tokenizer):
    for token, token_id in EXPECTED_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        assert tokenizer.encode(token) == [token_id], f"{token} must be a single token"


def test_role_tokens(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 0)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


def test_nothing_is_added_around_plain_text(tokenizer):
    ids = tokenizer("hello world")["input_ids"]
    assert ids == tokenizer.encode("hello world", add_special_tokens=False)
    assert EXPECTED_IDS["<|im_start|>"] not in ids and EXPECTED_IDS["<|im_end|>"] not in ids


def test_only_chatml_tokens_are_dropped_by_skip_special_tokens(tokenizer):
    """<think> and friends must survive decoding, so reward functions can parse generated text."""
    text = "<|im_start|>assistant\n<think>\nx\n</think>\n<answer>\n1\n</answer><|im_end|><|endoftext|>"
    decoded = tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True)
    assert decoded == "assistant\n<think>\nx\n</think>\n<answer>\n1\n</answer>"


# ---- exact round trips


ROUND_TRIP_TEXTS = {
    "chinese": "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "rare_chinese": "𠀀𪚥龘，鱻靐。",  # outside the BMP / unlikely to be merged: spelled with byte tokens
    "english": "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer",
    "emoji": "I 😀 you 👍🏽! 👩‍👩‍👧 family 🇨🇳",
    "whitespace": "  leading and  double  spaces \t tab\u00a0nbsp\u3000ideographic   ",
    "newlines": "\n\nline one\r\nline two\n\n\n  indented\n",
    "mixed": "TinyMind 说：Hello, 世界! 3 + 5 = 8 ✓ <think>\n想一想\n</think> café naïve",
    "code": "def f(x):\n\treturn {'a': [1, 2]}  # comment\n",
    "punctuation_spacing": "a , b . c ! d ? e ' f",
    "empty": "",
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_TEXTS))
def test_decode_inverts_encode(tokenizer, name):
    text = ROUND_TRIP_TEXTS[name]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.backend_tokenizer.decode(ids, skip_special_tokens=False) == text


def test_byte_level_display(tokenizer):
    """A space shows as 'Ġ' in token strings, yet decodes back to a space."""
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("to be"))
    assert tokens[-1].startswith("Ġ")
    assert tokenizer.convert_tokens_to_string(tokens) == "to be"


def test_common_chinese_characters_are_single_tokens(tokenizer):
    for character in "月光山水春风人之不":
        assert len(tokenizer.encode(character)) == 1, character


# ---- chat template


def render(tokenizer, messages, **kwargs):
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def test_multi_turn_with_system_and_reasoning(tokenizer):
    assert render(tokenizer, SYSTEM_CHAT) == SYSTEM_CHAT_RENDERED


def test_no_default_system_prompt(tokenizer):
    rendered = render(tokenizer, [{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n"


def test_generation_prompt(tokenizer):
    rendered = render(tokenizer, SYSTEM_CHAT[:2], add_generation_prompt=True)
    assert rendered == SYSTEM_CHAT_RENDERED.split("<|im_start|>assistant\n")[0] + "<|im_start|>assistant\n"


def test_tools_and_tool_calls(tokenizer):
    rendered = render(tokenizer, TOOL_CHAT, tools=TOOLS)
    system_block, rest = rendered.split("<|im_end|>\n", 1)
    assert system_block.startswith("<|im_start|>system\n# Tools\n")
    assert json.dumps(TOOLS[0], ensure_ascii=False) in system_block
    assert "<|im_start|>assistant\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2, \"b\": 3}}\n" \
           "</tool_call><|im_end|>\n" in rest
    assert rest.endswith("<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n")


def test_tools_keep_the_system_message(tokenizer):
    rendered = render(tokenizer, [{"role": "system", "content": "Be brief."}] + TOOL_CHAT, tools=TOOLS)
    assert rendered.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert rendered.count("<|im_start|>system") == 1


@pytest.mark.parametrize("chat, tools", [(SYSTEM_CHAT, None), (TOOL_CHAT, TOOLS)])
def test_rendering_is_prefix_stable(tokenizer, chat, tools):
    """Rendering the first k messages gives a prefix of rendering them all (multi-turn SFT and RL rely on it)."""
    full = render(tokenizer, chat, tools=tools)
    for k in range(1, len(chat)):
        assert full.startswith(render(tokenizer, chat[:k], tools=tools))


def masked_runs(tokenizer, ids, mask) -> list[str]:
    """Decoded text of each maximal run of masked tokens."""
    runs, current = [], []
    for token_id, is_assistant in zip(ids, mask):
        if is_assistant:
            current.append(token_id)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_assistant_mask_covers_exactly_replies_and_their_end_tokens(tokenizer):
    encoded = tokenizer.apply_chat_template(SYSTEM_CHAT, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert len(ids) == len(mask)
    assert tokenizer.decode(ids) == SYSTEM_CHAT_RENDERED

    assert masked_runs(tokenizer, ids, mask) == [
        "疑是地上霜。<|im_end|>",
        "<think>\n3 + 5 = 8.\n</think>\n\n8<|im_end|>",
    ]
    # The header before each reply is not trained on; the newline after <|im_end|> is not either.
    assert tokenizer.decode([i for i, m in zip(ids, mask) if not m]).count("<|im_start|>assistant\n") == 2
    end_positions = [position for position, token_id in enumerate(ids) if token_id == EXPECTED_IDS["<|im_end|>"]]
    assert [mask[position] for position in end_positions] == [0, 0, 1, 0, 1]
    assert mask[-1] == 0  # the final "\n"


def test_assistant_mask_token_by_token(tokenizer):
    """Build the expected mask piece by piece: header tokens 0, content + <|im_end|> 1, the rest 0."""
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    encoded = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    pieces = [("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", 0), ("Hello!<|im_end|>", 1), ("\n", 0)]
    expected_ids, expected_mask = [], []
    for text, flag in pieces:
        piece_ids = tokenizer.encode(text)
        expected_ids += piece_ids
        expected_mask += [flag] * len(piece_ids)
    assert encoded["input_ids"] == expected_ids
    assert encoded["assistant_masks"] == expected_mask


def test_assistant_mask_on_the_demo_chats(tokenizer):
    """On real data (multi-turn, system prompts, <think> replies, code) the mask is exactly each reply + <|im_end|>:
    no BPE token straddles a reply's boundary. (A sample of the files keeps the test fast.)"""
    chats = []
    for name, every in [("demo_sft", 10), ("demo_sft_val", 1), ("demo_reason", 10), ("demo_lora_identity_val", 1)]:
        with (REPO_ROOT / "dataset" / f"{name}.jsonl").open(encoding="utf-8") as f:
            chats += [json.loads(line)["conversations"] for i, line in enumerate(f) if i % every == 0]
    assert len(chats) > 500
    for chat in chats:
        encoded = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        expected = [m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant"]
        assert masked_runs(tokenizer, encoded["input_ids"], encoded["assistant_masks"]) == expected


def test_assistant_mask_in_a_padded_batch(tokenizer):
    chats = [SYSTEM_CHAT[1:3], SYSTEM_CHAT]
    encoded = tokenizer.apply_chat_template(chats, tokenize=True, return_dict=True, padding=True,
                                            return_assistant_tokens_mask=True)
    for ids, mask, attention in zip(encoded["input_ids"], encoded["assistant_masks"], encoded["attention_mask"]):
        assert len(ids) == len(mask) == len(attention)
        assert all(m == 0 for m, a in zip(mask, attention) if a == 0), "padding must not be trained on"
        assert mask.count(1) > 0


# ---- the files themselves


def test_config_matches_the_training_script(train_tokenizer_script):
    config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config == train_tokenizer_script.tokenizer_config()
    assert config["add_bos_token"] is False
    assert "{%- generation %}" in config["chat_template"]


def test_no_template_file_overrides_the_config(tokenizer):
    """transformers prefers chat_template.jinja over tokenizer_config.json; a stray one would drop the masks."""
    assert not (MODEL_DIR / "chat_template.jinja").exists()
    assert "generation" in tokenizer.chat_template


def test_added_tokens_in_tokenizer_json(train_tokenizer_script):
    added = json.loads((MODEL_DIR / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    assert [(t["id"], t["content"], t["special"]) for t in added] == [
        (token_id, token, special)
        for token_id, (token, special) in enumerate(train_tokenizer_script.ADDED_TOKENS)]
