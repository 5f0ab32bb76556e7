"""The committed demo datasets (dataset/*.jsonl): they parse, have the fields each training stage reads, DPO pairs
share their prompts, arithmetic is right, and held-out files share nothing with the training files."""

import json
import re
from functools import lru_cache
from pathlib import Path

import pytest

DATASET_DIR = Path(__file__).resolve().parents[2] / "dataset"

# name -> format; every name has a <name>.jsonl and a <name>_val.jsonl
DATASETS = {
    "demo_pretrain": "text",
    "demo_sft": "chat",
    "demo_lora_identity": "chat",
    "demo_lora_domain": "chat",
    "demo_dpo": "preference",
    "demo_reason": "chat",
    "demo_grpo": "prompt",
    "demo_grpo_champ": "prompt",
}
DPO_TYPES = {"wrong_next_clause", "wrong_poet", "wrong_shakespeare_line", "wrong_sum", "off_topic_reply",
             "looping_reply"}
SPLITS = [(name, suffix) for name in DATASETS for suffix in ("", "_val")]
THINK_ANSWER = re.compile(r"^<think>\n(?P<reasoning>.+)\n</think>\n<answer>\n(?P<answer>.+)\n</answer>$", re.DOTALL)
EQUATION_LINE = re.compile(r"^(?P<left>[\d +\-]+?) = (?P<right>[\d +\-]+)[.。]$")
DIGIT_LINE = re.compile(r"^(?:ones|tens): (?P<left>[\d +\-]+?) = (?P<right>-?\d+)$")  # demo_reason's column steps


@lru_cache(maxsize=None)
def load(name: str, suffix: str = "") -> tuple:
    path = DATASET_DIR / f"{name}{suffix}.jsonl"
    with path.open(encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


def conversation(sample: dict) -> list[dict]:
    return sample.get("conversations") or sample["chosen"]


def check_chat(messages: list[dict], must_end_with_assistant: bool = True):
    assert isinstance(messages, list) and messages
    roles = [m["role"] for m in messages]
    if roles[0] == "system":
        roles = roles[1:]
    assert roles and roles[0] == "user"
    assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2), roles
    if must_end_with_assistant:
        assert roles[-1] == "assistant"
    for message in messages:
        assert set(message) == {"role", "content"}
        assert isinstance(message["content"], str) and message["content"].strip()


def simple_sum(expression: str) -> int:
    """Evaluate '12 + 5 - 3' (digits, +, - and spaces only)."""
    tokens = expression.split()
    total = int(tokens[0])
    for op, number in zip(tokens[1::2], tokens[2::2]):
        total = total + int(number) if op == "+" else total - int(number)
    return total


@pytest.mark.parametrize("name, suffix", SPLITS)
def test_files_parse_and_have_the_fields_their_stage_reads(name, suffix):
    samples = load(name, suffix)
    assert len(samples) >= 10
    kind = DATASETS[name]
    for sample in samples:
        if kind == "text":
            assert set(sample) == {"text"} and sample["text"].strip()
        elif kind == "chat":
            assert set(sample) == {"conversations"}
            check_chat(sample["conversations"])
        elif kind == "preference":
            assert set(sample) == {"chosen", "rejected", "type"}
            assert sample["type"] in DPO_TYPES
            check_chat(sample["chosen"])
            check_chat(sample["rejected"])
        else:
            assert {"conversations", "answer"} <= set(sample)
            check_chat(sample["conversations"], must_end_with_assistant=False)
            assert [m["role"] for m in sample["conversations"]] == ["user"]
            assert isinstance(sample["answer"], str) and sample["answer"].strip()


@pytest.mark.parametrize("name, suffix", SPLITS)
def test_no_duplicate_samples(name, suffix):
    lines = [json.dumps(sample, ensure_ascii=False, sort_keys=True) for sample in load(name, suffix)]
    assert len(lines) == len(set(lines))


@pytest.mark.parametrize("name", DATASETS)
def test_validation_shares_nothing_with_training(name):
    """Not a single sample, and for chats not even a prompt (everything before the last reply), is shared."""
    def keys(samples):
        if DATASETS[name] == "text":
            return {sample["text"] for sample in samples}
        return {json.dumps(conversation(sample)[:-1] if DATASETS[name] != "prompt" else sample["conversations"],
                           ensure_ascii=False) for sample in samples}

    assert not keys(load(name)) & keys(load(name, "_val"))


@pytest.mark.parametrize("suffix", ["", "_val"])
def test_dpo_pairs_share_the_prompt_and_differ_in_the_reply(suffix):
    for pair in load("demo_dpo", suffix):
        chosen, rejected = pair["chosen"], pair["rejected"]
        assert chosen[:-1] == rejected[:-1]
        assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
        assert chosen[-1]["content"] != rejected[-1]["content"]


@pytest.mark.parametrize("suffix", ["", "_val"])
def test_dpo_arithmetic_chosen_is_right_and_rejected_is_wrong(suffix):
    pairs = [p for p in load("demo_dpo", suffix) if re.fullmatch(r"\d+ [+-] \d+ = \d+", p["chosen"][-1]["content"])]
    assert pairs
    for pair in pairs:
        expression, chosen = pair["chosen"][-1]["content"].split(" = ")
        _, rejected = pair["rejected"][-1]["content"].split(" = ")
        assert int(chosen) == simple_sum(expression) != int(rejected)


@pytest.mark.parametrize("suffix", ["", "_val"])
def test_reasoning_answers_are_think_then_answer(suffix):
    for sample in load("demo_reason", suffix):
        for message in sample["conversations"]:
            if message["role"] == "assistant":
                assert THINK_ANSWER.match(message["content"]), message["content"]


@pytest.mark.parametrize("name, suffix", [(n, s) for n in ("demo_reason", "demo_sft") for s in ("", "_val")])
def test_every_equation_in_worked_solutions_is_true(name, suffix):
    checked = 0
    for sample in load(name, suffix):
        reply = sample["conversations"][-1]["content"]
        match = THINK_ANSWER.match(reply)
        if not match:
            continue
        for line in match["reasoning"].splitlines():
            if equation := EQUATION_LINE.match(line) or DIGIT_LINE.match(line):
                assert simple_sum(equation["left"]) == simple_sum(equation["right"]), line
                checked += 1
    assert checked > 50


@pytest.mark.parametrize("name, suffix", [(n, s) for n in ("demo_reason", "demo_sft") for s in ("", "_val")])
def test_worked_answers_match_the_question(name, suffix):
    checked = 0
    for sample in load(name, suffix):
        question, reply = sample["conversations"][-2]["content"], sample["conversations"][-1]["content"]
        match = THINK_ANSWER.match(reply)
        expression = re.search(r"\d+(?: [+-] \d+)+", question)
        if match and expression:
            assert match["answer"] == str(simple_sum(expression.group())), question
            checked += 1
    assert checked > 10


@pytest.mark.parametrize("name", ["demo_reason", "demo_sft"])
@pytest.mark.parametrize("suffix", ["", "_val"])
def test_reasoning_sums_are_worked_digit_by_digit(name, suffix):
    """The worked sums: 'solve: a + b' (or 'step: a + b' inside a three-number sum), then 'ones: a0 + b0 = s' and
    'tens: a1 + b1 + carry = t' (or the borrowing 'ones: 13 - 5 = 8', 'tens: 1 - 0 - 1 = 0'); the answer is t
    followed by the last digit of s."""
    checked = quick = 0
    for sample in load(name, suffix):
        match = THINK_ANSWER.match(sample["conversations"][-1]["content"])
        lines = match["reasoning"].splitlines() if match else []
        if len(lines) == 1 and lines[0].startswith("solve: "):  # a quick reply: the sum restated, answered at once
            assert name == "demo_reason" and suffix == "" and " + " in lines[0], lines
            assert match["answer"] == str(simple_sum(lines[0].removeprefix("solve: "))), lines
            quick += 1
            continue
        for at, line in enumerate(lines):
            if not (sum_line := re.fullmatch(r"(?:solve|step): (\d+ [+-] \d+)", line)):
                continue
            expression = sum_line[1]
            (a_tens, a_ones), (b_tens, b_ones) = (divmod(int(n), 10) for n in expression.split()[::2])
            ones, tens = (int(step.split(" = ")[1]) for step in lines[at + 1:at + 3])
            if "+" in expression:
                assert lines[at + 1:at + 3] == [f"ones: {a_ones} + {b_ones} = {ones}",
                                                f"tens: {a_tens} + {b_tens} + {ones // 10} = {tens}"], lines
            else:
                borrow = int(a_ones < b_ones)
                assert lines[at + 1:at + 3] == [f"ones: {a_ones + 10 * borrow} - {b_ones} = {ones}",
                                                f"tens: {a_tens} - {b_tens} - {borrow} = {tens}"], lines
            assert 10 * tens + ones % 10 == simple_sum(expression), lines
            checked += 1
        if lines and lines[0].startswith("solve: "):
            assert match["answer"] == str(simple_sum(lines[0].removeprefix("solve: "))), lines
    assert checked > (500 if suffix == "" else 30)
    assert quick < checked / 5  # the data's own sums are worked; GRPO is paid to choose working (docs/grpo.md)


@pytest.mark.parametrize("name", ["demo_reason", "demo_sft", "demo_grpo"])
@pytest.mark.parametrize("suffix", ["", "_val"])
def test_sum_prompts_put_a_space_before_every_number(name, suffix):
    """The tokenizer spells '7' after a space as another token than at the start or after a Chinese character; the
    prompts use one spelling, the one the reasoning's 'solve: 7 + 15' copies."""
    checked = 0
    for sample in load(name, suffix):
        question = sample["conversations"][0]["content"]
        if re.search(r"\d+ [+-] \d+|more\.|a friend\.|又得到了|送给朋友", question):
            assert not re.search(r"(?<![ \d])\d", question.split("\n")[0]), question
            checked += 1
    assert checked > 30


@pytest.mark.parametrize("suffix", ["", "_val"])
def test_grpo_answers_are_right(suffix):
    """Bare sums are evaluated; word problems add on 'gets more' / '又得到' and subtract on 'gives' / '送给'."""
    for sample in load("demo_grpo", suffix):
        question = sample["conversations"][0]["content"]
        assert "<think></think>" in question and "<answer></answer>" in question
        if bare := re.search(r"\d+ [+-] \d+", question):
            expected = simple_sum(bare.group())
        else:
            a, b = map(int, re.findall(r"\d+", question)[:2])
            assert ("more" in question or "又得到" in question) != ("gives" in question or "送给" in question)
            expected = a + b if ("more" in question or "又得到" in question) else a - b
        assert sample["answer"] == str(expected), question
        assert 0 <= expected < 200


@pytest.mark.parametrize("suffix", ["", "_val"])
def test_grpo_sums_have_two_digits_and_none_is_worked_in_the_reasoning_data(suffix):
    """GRPO's operands run to 99 (too many sums to recall), every held-out sum has an operand of 20 or more (beyond
    the SFT data's sums), and no GRPO sum is worked or answered in demo_reason: GRPO's prompts are new to the model."""
    def operands(text):
        return [int(n) for n in re.findall(r"\d+", text.split("\n")[0])[:2]]

    numbers = [operands(sample["conversations"][0]["content"]) for sample in load("demo_grpo", suffix)]
    assert all(n < 100 for pair in numbers for n in pair) and max(max(pair) for pair in numbers) >= 90
    if suffix == "_val":
        assert all(max(pair) >= 20 for pair in numbers)
    solved = {m[1] for sample in load("demo_reason")
              if (m := re.match(r"<think>\nsolve: (\d+ [+-] \d+)\n", sample["conversations"][-1]["content"]))}
    asked = {m.group() for sample in load("demo_grpo", suffix)
             if (m := re.search(r"\d+ [+-] \d+", sample["conversations"][0]["content"]))}
    assert len(solved) > 4000 and len(asked) > 20 and not solved & asked


def test_held_out_sums_are_never_asked_in_training():
    """A sum asked in demo_grpo_val is asked (or answered as 'a + b = c') in no training file, so GRPO's validation
    reward measures generalisation. Worked steps of other problems (8 + 2 = 10) may of course use the same facts."""
    def asked_sums(samples):
        found = set()
        for sample in samples:
            for message in conversation(sample):
                if message["role"] == "user":
                    found |= {" ".join(m) for m in re.findall(r"(?<!\d [+-] )\b(\d+) ([+-]) (\d+)\b(?! [+-] \d)",
                                                              message["content"])}
                elif re.fullmatch(r"\d+ [+-] \d+ = \d+", message["content"]):
                    found.add(message["content"].split(" = ")[0])
        return found

    held_out = asked_sums(load("demo_grpo", "_val"))
    assert len(held_out) > 20
    for name in ("demo_grpo", "demo_sft", "demo_reason", "demo_dpo"):
        leaked = held_out & asked_sums(load(name))
        assert not leaked, f"{name}: {sorted(leaked)[:5]}"


def test_held_out_poems_stay_out_of_every_training_file():
    """Lines of the poems in demo_pretrain_val are not in any training file (one version of a poem in one
    collection and a variant in another must not split across train and val). A poem may quote another's line,
    hence a tolerance of a few lines."""
    held_out_lines = {line for sample in load("demo_pretrain", "_val") for line in sample["text"].splitlines()[1:]
                      if len(line) >= 10 and re.search(r"[\u4e00-\u9fff]", line)
                      and not line.startswith(("《", "赏析"))}
    assert len(held_out_lines) > 200
    for name in ("demo_pretrain", "demo_sft", "demo_dpo", "demo_reason", "demo_lora_domain"):
        texts = [sample["text"] for sample in load(name)] if name == "demo_pretrain" else \
            [m["content"] for sample in load(name) for key in ("conversations", "chosen", "rejected")
             for m in sample.get(key, [])]
        training_lines = {line for text in texts for line in text.splitlines()}
        leaked = held_out_lines & training_lines
        assert len(leaked) <= len(held_out_lines) // 200, f"{name}: {sorted(leaked)[:5]}"


def test_more_identity_wordings_are_training_only():
    from scripts.build_demo_data import IDENTITY_QUESTIONS, MORE_IDENTITY_WORDINGS
    for intent, by_lang in MORE_IDENTITY_WORDINGS.items():
        for lang, questions in by_lang.items():
            train, val = IDENTITY_QUESTIONS[intent][lang]
            assert not set(questions) & (set(train) | set(val)), (intent, lang)
    val_questions = {m["content"] for s in load("demo_lora_identity", "_val") for m in s["conversations"]
                     if m["role"] == "user"}
    train_questions = {m["content"] for s in load("demo_lora_identity") for m in s["conversations"]
                       if m["role"] == "user"}
    assert not val_questions & train_questions - {"你好", "嗨", "Hello", "Hi there"}  # greetings open both


def test_identity_answers_name_tinymind():
    for suffix in ("", "_val"):
        samples = load("demo_lora_identity", suffix)
        replies = [m["content"] for s in samples for m in s["conversations"] if m["role"] == "assistant"]
        assert sum("TinyMind" in reply for reply in replies) / len(replies) > 0.5


def test_some_sft_chats_are_multi_turn_and_some_have_a_system_message():
    samples = load("demo_sft")
    assert sum(sum(m["role"] == "user" for m in s["conversations"]) > 1 for s in samples) > 100
    assert sum(s["conversations"][0]["role"] == "system" for s in samples) > 100
    assert sum(bool(re.search(r"[\u4e00-\u9fff]", s["conversations"][-1]["content"])) for s in samples) > 1000


def test_pretraining_mixes_chinese_and_english():
    texts = [sample["text"] for sample in load("demo_pretrain")]
    chinese = sum(bool(re.search(r"[\u4e00-\u9fff]", text)) for text in texts)
    assert 0.25 < chinese / len(texts) < 0.75
    assert max(len(text) for text in texts) < 2000


def test_committed_data_stays_small_and_documented():
    files = sorted(DATASET_DIR.glob("demo_*.jsonl"))  # your own datasets may sit beside them
    # the agent's files come from scripts/build_agent_data.py (checked in tests/stages/test_agent.py)
    agent = {f"demo_agent{part}{suffix}.jsonl" for part in ("", "_sft") for suffix in ("", "_val")}
    assert {f.name for f in files} == {f"{name}{suffix}.jsonl" for name, suffix in SPLITS} | agent
    assert sum(f.stat().st_size for f in files) < 13_000_000
    readme = (DATASET_DIR / "README.md").read_text(encoding="utf-8")
    for f in files:
        assert f.name in readme, f"{f.name} is not described in dataset/README.md"
