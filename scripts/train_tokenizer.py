#!/usr/bin/env python3
"""Train TinyMind's byte-level BPE tokenizer and write it, with its chat template, to model/.

The vocabulary
    6,400 entries by default (`--vocab_size`), like MiniMind's: a small vocabulary keeps the embedding and output
    layers of a few-million-parameter model small. It is made of
      * 9 added tokens with fixed ids (the model code and the data rely on these ids):
            0 <|endoftext|>  padding, and "unknown" for libraries that want one (byte-level BPE never needs it)
            1 <|im_start|>   start of a chat message (also registered as bos)
            2 <|im_end|>     end of a chat message: the eos the model must learn to emit after every reply
            3 <think>   4 </think>   5 <answer>   6 </answer>   7 <tool_call>   8 </tool_call>
        0-2 are special tokens (skip_special_tokens=True drops them when decoding). 3-8 are ordinary added
        tokens, as in Qwen3: each is always one token, yet stays in decoded text so reward functions can find them.
      * the 256 byte symbols (ids 9-264), so any text can be encoded and nothing is ever unknown;
      * merges learned from the training data (ids 265 and up).

Training data
    By default dataset/demo_pretrain.jsonl and dataset/demo_sft.jsonl (`--data`): classical Chinese poems and
    classics, Shakespeare, and the SFT chats. On that data about 2,050 of the 6,450 distinct Chinese characters
    became single tokens, and they make up 94% of the Chinese text; rarer characters are spelled with 2-3 byte
    tokens. English words mostly become one or two tokens. Train on your own corpus with `--data` if it differs much
    from the demo data (the demo pretraining text averages 219 tokens per document, 1.9 characters per token).

How tokens look
    Byte-level BPE works on UTF-8 bytes and, like GPT-2, shows each byte as a printable character. So in
    `tokenizer.convert_ids_to_tokens(...)` and in tokenizer.json a space looks like 'Ġ', a newline like 'Ċ', and a
    Chinese character like 'ä½ł' (its three bytes). That is only how the vocabulary is displayed:
    `tokenizer.decode(ids)` returns the original text exactly.

Chat template (ChatML, as Qwen and MiniMind use)
    <|im_start|>system\\n{system}<|im_end|>\\n          only if the first message is a system message (no default)
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|im_end|>\\n
    An assistant message with `reasoning_content` renders as '<think>\\n{reasoning}\\n</think>\\n\\n{content}',
    `tool_calls` as '<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>', `tools` are listed in the
    system message, and `add_generation_prompt=True` appends '<|im_start|>assistant\\n'. Each assistant message's
    content and its <|im_end|> sit inside {% generation %}, so
    `apply_chat_template(..., return_dict=True, return_assistant_tokens_mask=True)` marks exactly the tokens an SFT
    loss should train on. Rendering is prefix-stable: the first k messages render to a prefix of the whole chat.

Usage:
    python -m scripts.train_tokenizer                                   # 6,400 tokens -> model/
    python -m scripts.train_tokenizer --vocab_size 8000 --data my.jsonl --out_dir /tmp/tok
    python -m scripts.train_tokenizer --data dataset/pretrain_hq.jsonl dataset/sft_mini_512.jsonl --max_mb 200 \\
        --out_dir out/gpu/tokenizer                                     # MiniMind's data (the GPU recipe)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

REPO_ROOT = Path(__file__).resolve().parents[1]

# (token, special?) in id order: the ids are part of TinyMind's interface, never reorder.
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<answer>", False),
    ("</answer>", False),
    ("<tool_call>", False),
    ("</tool_call>", False),
]
PAD_TOKEN = UNK_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
MODEL_MAX_LENGTH = 32768

# Whitespace between tags is eaten by the '-' markers, so the template can be laid out readably.
CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}'
        '\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
        {#- rendered above #}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
            {%- if message.reasoning_content %}
                {{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
            {%- endif %}
            {%- if message.content %}
                {{- message.content }}
            {%- endif %}
            {%- for tool_call in message.tool_calls or [] %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if message.content or not loop.first %}
                    {{- '\\n' }}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
            {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def iter_texts(paths: list[Path], max_mb: float = 0) -> Iterator[str]:
    """Pretraining text and the contents of chat messages (the template's own tokens are added tokens anyway), from
    the first `max_mb` megabytes of each file (0: all of it)."""
    for path in paths:
        with path.open(encoding="utf-8") as f:
            read = 0
            for line in f:
                read += len(line.encode("utf-8"))
                if max_mb and read > max_mb * 1e6:
                    break
                if not line.strip():
                    continue
                sample = json.loads(line)
                if "text" in sample:
                    yield sample["text"]
                for key in ("conversations", "chosen", "rejected"):
                    for message in sample.get(key, []):
                        yield message["content"]


def train_tokenizer(paths: list[Path], vocab_size: int, max_mb: float = 0) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token, _ in ADDED_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those absent from the data
        show_progress=True,
    )
    tokenizer.train_from_iterator(iter_texts(paths, max_mb), trainer=trainer)
    # The trainer registers every added token as special; mark <think> ... </tool_call> as ordinary added tokens.
    serialized = json.loads(tokenizer.to_str())
    is_special = dict(ADDED_TOKENS)
    for added in serialized["added_tokens"]:
        added["special"] = is_special[added["content"]]
    tokenizer = Tokenizer.from_str(json.dumps(serialized, ensure_ascii=False))
    for token_id, (token, _) in enumerate(ADDED_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, f"{token} must have id {token_id}"
    return tokenizer


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # otherwise decode("a , b") would return "a, b"
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }


def report(out_dir: Path, paths: list[Path], max_mb: float = 0) -> None:
    """Load the result the way training code will, and print what a reader wants to know about it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    print(f"vocabulary: {len(tokenizer)} tokens; added: "
          + ", ".join(f"{token}={tokenizer.convert_tokens_to_ids(token)}" for token, _ in ADDED_TOKENS))
    for text in ["床前明月光，疑是地上霜。", "To be, or not to be, that is the question.", "TinyMind 🙂 3 + 5 = 8"]:
        ids = tokenizer.encode(text)
        print(f"{text!r}: {len(ids)} tokens {tokenizer.convert_ids_to_tokens(ids)}")
    for path in paths:
        texts = list(iter_texts([path], min(max_mb or 20, 20)))  # 20 MB tell the rate as well as 2 GB
        tokens = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
        characters = sum(map(len, texts))
        print(f"{path.name}: {len(texts)} texts, {tokens / len(texts):.1f} tokens per text, "
              f"{characters / tokens:.2f} characters per token")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab_size", type=int, default=6400, help="vocabulary size, added tokens included")
    demo_files = [REPO_ROOT / "dataset" / "demo_pretrain.jsonl", REPO_ROOT / "dataset" / "demo_sft.jsonl"]
    parser.add_argument("--data", type=Path, nargs="+", default=demo_files,
                        help="jsonl files with {'text'} or {'conversations'} samples to learn merges from")
    parser.add_argument("--out_dir", type=Path, default=REPO_ROOT / "model",
                        help="where tokenizer.json and tokenizer_config.json are written")
    parser.add_argument("--max_mb", type=float, default=0,
                        help="learn from the first N MB of each file only (0: all): training time and memory "
                             "grow with the text")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tokenizer = train_tokenizer(args.data, args.vocab_size, args.max_mb)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out_dir / "tokenizer.json"))
    with (args.out_dir / "tokenizer_config.json").open("w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, ensure_ascii=False, indent=2)
        f.write("\n")
    print(f"wrote {args.out_dir / 'tokenizer.json'} and {args.out_dir / 'tokenizer_config.json'}")
    report(args.out_dir, args.data, args.max_mb)


if __name__ == "__main__":
    main()
