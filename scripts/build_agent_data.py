"""Build the demo data for tool-calling SFT and agent RL, deterministically (fixed seed, no downloads):

    python -m scripts.build_agent_data                    # writes the four files below into dataset/

    dataset/demo_agent_sft.jsonl (+ _val)   tool-calling chats in MiniMind's format, for train_full_sft.py:
        system (content null, "functions": the tool schemas) / user question / assistant with "tool_calls" /
        tool "result: <result>" / assistant "The answer is <result>."; then --short_count short chats: the same
        without the system message (no schemas: ~95 tokens instead of ~600)
    dataset/demo_agent.jsonl (+ _val)       RL prompts for train_agent.py:
        {"conversations": [system with "functions", user], "answer": "<result>", "call": {"name", "arguments"},
         "task": "calculator" | "convert_units" | "lookup_capital"}

Three tasks, each answered by one call of a local tool (model/tools.py): arithmetic (calculator), unit conversion
(convert_units) and capital cities (lookup_capital). Answers are computed by the tools themselves, so data and
rewards cannot disagree.

Sized for the demo's 4.6M model (docs/agent.md): the sums' operands run from 2 to 19, the numbers the reasoning model
(where agent SFT starts) learned to copy, and each string argument is written with the space the question has before
it (`{"expression": " 17 + 18"}`), so its tokens are the question's tokens: the tokenizer spells `17` after a quote
with other tokens than ` 17` after a space. The tools and the rewards ignore that space. For the same reason the
tool's message reads "result: 35" (model/tools.py), so the answer's ` 3` `5` are already in it.

The short chats teach the two copies an episode needs (question -> call, tool result -> answer) where they are cheap:
packing puts them into the room each ~600-token chat with schemas leaves in its 768-token row, so 2,000 of them add
a tenth to the rows of an epoch (and fill them: about a third more tokens). Their tasks are drawn after the others,
from their own seed, so the other files do not change with their count.

Held-out tasks are truly held out: a task (tool + arguments, whatever the wording of the question) goes to the _val
files when a stable hash of it (sha256) falls in the held-out share, so no held-out country, sum or conversion
appears in any training file, SFT or RL."""
import argparse
import hashlib
import json
import os
import random

from model.tools import CAPITALS, TOOL_SCHEMAS, result_value, run_tool

CALC_QUESTIONS = ["What is {e}?", "Calculate {e}.", "Compute {e}.", "What does {e} equal?"]
CONVERT_QUESTIONS = ["Convert {v} {a} to {b}.", "What is {v} {a} in {b}?", "How many {b} is {v} {a}?"]
CAPITAL_QUESTIONS = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital of {c}."]
CONVERSIONS = [("km", "m"), ("m", "cm"), ("cm", "mm"), ("m", "km"), ("mi", "km"), ("km", "mi"), ("ft", "m"),
               ("m", "ft"), ("in", "cm"), ("kg", "g"), ("g", "kg"), ("lb", "kg"), ("kg", "lb"), ("oz", "g"),
               ("C", "F"), ("F", "C"), ("C", "K"), ("K", "C")]


def task_key(name: str, arguments: dict) -> str:
    return name + "|" + json.dumps(arguments, sort_keys=True)


def held_out(name: str, arguments: dict, share: float) -> bool:
    """Stable across runs, machines and Python versions (no hash() salt): sha256 of the task."""
    digest = hashlib.sha256(task_key(name, arguments).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < share


def random_task(rng: random.Random) -> tuple[str, str, dict]:
    """(question, tool name, arguments) of one task."""
    kind = rng.choices(["calculator", "convert_units", "lookup_capital"], weights=[0.4, 0.35, 0.25])[0]
    if kind == "calculator":
        op = rng.choice(["+", "-", "*"])
        expression = f"{rng.randint(2, 19)} {op} {rng.randint(2, 19)}"
        return rng.choice(CALC_QUESTIONS).format(e=expression), kind, {"expression": expression}
    if kind == "convert_units":
        a, b = rng.choice(CONVERSIONS)
        value = rng.randint(1, 300) if rng.random() < 0.7 else round(rng.randint(1, 999) / 10, 1)
        question = rng.choice(CONVERT_QUESTIONS).format(v=value, a=a, b=b)
        return question, kind, {"value": value, "from_unit": a, "to_unit": b}
    country = rng.choice(sorted(CAPITALS))
    return rng.choice(CAPITAL_QUESTIONS).format(c=country), kind, {"country": country}


def as_asked(arguments: dict) -> dict:
    """The arguments as the model should write them: each string after a space, as in the question."""
    return {key: " " + value if isinstance(value, str) else value for key, value in arguments.items()}


def system_message() -> dict:
    return {"role": "system", "content": None, "functions": TOOL_SCHEMAS}


def sft_chat(question: str, name: str, arguments: dict, message: str, schemas: bool = True) -> dict:
    """`message`: the tool's message ("result: 391"); the final reply copies its result."""
    system = [system_message()] if schemas else []
    return {"conversations": system + [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": [{"name": name, "arguments": as_asked(arguments)}]},
        {"role": "tool", "content": message},
        {"role": "assistant", "content": f"The answer is {result_value(message)}."}]}


def rl_prompt(question: str, name: str, arguments: dict, message: str) -> dict:
    return {"conversations": [system_message(), {"role": "user", "content": question}],
            "answer": result_value(message), "call": {"name": name, "arguments": as_asked(arguments)}, "task": name}


def build(seed: int, sft_count: int, rl_count: int, val_count: int, held_out_share: float) -> dict:
    """The four splits as lists of records. Training lines come from tasks outside the held-out share, _val lines
    from tasks inside it; each val split holds distinct tasks."""
    rng = random.Random(seed)
    splits = {"sft": [], "sft_val": [], "rl": [], "rl_val": []}
    seen_val = {"sft_val": set(), "rl_val": set()}
    attempts = 0
    while (len(splits["sft"]) < sft_count or len(splits["rl"]) < rl_count or
           len(splits["sft_val"]) < val_count or len(splits["rl_val"]) < val_count):
        attempts += 1
        if attempts > 200 * (sft_count + rl_count + 2 * val_count):
            raise SystemExit("error: could not draw enough distinct held-out tasks; lower --val_count or raise "
                             "--held_out_share")
        question, name, arguments = random_task(rng)
        message = run_tool(name, arguments)
        if message.startswith("error:"):
            continue
        if held_out(name, arguments, held_out_share):
            for split in ("rl_val", "sft_val"):  # RL's held-out prompts first: they are the measured ones
                key = task_key(name, arguments)
                if len(splits[split]) < val_count and key not in seen_val[split]:
                    seen_val[split].add(key)
                    make = rl_prompt if split == "rl_val" else sft_chat
                    splits[split].append(make(question, name, arguments, message))
                    break
        elif len(splits["sft"]) < sft_count and (len(splits["rl"]) >= rl_count or rng.random() < 0.6):
            splits["sft"].append(sft_chat(question, name, arguments, message))
        elif len(splits["rl"]) < rl_count:
            splits["rl"].append(rl_prompt(question, name, arguments, message))
    return splits


def short_chats(seed: int, count: int, held_out_share: float) -> list[dict]:
    """Chats without the schemas, from training tasks only (own generator: the other splits stay as they are)."""
    rng = random.Random(seed + 1)
    chats = []
    while len(chats) < count:
        question, name, arguments = random_task(rng)
        message = run_tool(name, arguments)
        if not message.startswith("error:") and not held_out(name, arguments, held_out_share):
            chats.append(sft_chat(question, name, arguments, message, schemas=False))
    return chats


def answered_at_once(chat: dict) -> dict:
    """The chat without its tool call and tool message: (system,) question, final reply."""
    turns = chat["conversations"]
    return {**chat, "conversations": [turns[0], turns[1], turns[-1]] if turns[0]["role"] == "system"
            else [turns[0], turns[-1]]}


def calls(chat: dict, tool: str) -> bool:
    return any(call["name"] == tool for turn in chat["conversations"] for call in turn.get("tool_calls") or [])


def with_guesses(chats: list[dict], share: float, seed: int) -> tuple[list[dict], int]:
    """The chats with `share` of the calculator ones answered at once (answered_at_once), and how many were: the
    model then has two ways to answer a sum, call the calculator or answer from memory, and agent RL, whose rewards
    pay for the call and the right answer, has a choice to make (docs/agent.md)."""
    rng = random.Random(seed)
    changed = [answered_at_once(chat) if calls(chat, "calculator") and rng.random() < share else chat
               for chat in chats]
    return changed, sum(a is not b for a, b in zip(changed, chats))


FILES = {"sft": "demo_agent_sft.jsonl", "sft_val": "demo_agent_sft_val.jsonl", "rl": "demo_agent.jsonl",
         "rl_val": "demo_agent_val.jsonl"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out_dir", default="dataset", help="directory the four jsonl files are written to")
    parser.add_argument("--seed", type=int, default=21, help="seed of the task generator (fixed: same files every run)")
    parser.add_argument("--sft_count", type=int, default=1000, help="tool-calling chats in demo_agent_sft.jsonl")
    parser.add_argument("--short_count", type=int, default=6000,
                        help="tool-calling chats without the schemas, appended to demo_agent_sft.jsonl")
    parser.add_argument("--rl_count", type=int, default=600, help="RL prompts in demo_agent.jsonl")
    parser.add_argument("--guess_share", type=float, default=0.0,
                        help="share of the calculator chats in demo_agent_sft.jsonl answered without the tool, so "
                             "that agent RL has a choice to make (the demo pipeline's agent SFT uses 0.3; "
                             "docs/agent.md)")
    parser.add_argument("--guess_seed", type=int, default=7, help="which calculator chats --guess_share changes")
    parser.add_argument("--val_count", type=int, default=120, help="held-out lines in each _val file")
    parser.add_argument("--held_out_share", type=float, default=0.12,
                        help="share of all tasks (by sha256 of tool + arguments) reserved for the _val files")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    splits = build(args.seed, args.sft_count, args.rl_count, args.val_count, args.held_out_share)
    splits["sft"] += short_chats(args.seed, args.short_count, args.held_out_share)
    if args.guess_share:
        splits["sft"], changed = with_guesses(splits["sft"], args.guess_share, args.guess_seed)
        print(f"{changed} calculator chats of demo_agent_sft.jsonl answered without the tool")
    os.makedirs(args.out_dir, exist_ok=True)
    for split, records in splits.items():
        path = os.path.join(args.out_dir, FILES[split])
        with open(path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"{path}: {len(records)} lines, {os.path.getsize(path) / 1e6:.2f} MB")
    return {split: len(records) for split, records in splits.items()}


if __name__ == "__main__":
    main()
