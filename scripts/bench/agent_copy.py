"""Does a tool-calling model answer with what the tool said? The last step of every agent episode, measured alone.

    python -m scripts.bench.agent_copy --weight agent_sft              # out/agent_sft_<hidden>.pth
    python -m scripts.bench.agent_copy --save_dir /tmp/run --weight agent_sft agent --show 3

Each held-out SFT chat (dataset/demo_agent_sft_val.jsonl: system with the schemas, question, the right call, the
tool's result) is given to the model up to the tool message, and the model writes the final reply greedily. Twice:
    right result   the tool message as the data has it: is the reply's answer the tool's result?
    swapped result the tool message replaced by the result of another held-out task of the same tool (another
                   sum, conversion or capital): does the reply follow the tool, give the true answer of the
                   question anyway (the model worked it out or remembered it), or neither?
A model that reads its tool follows the swapped result; one that ignores it answers the same either way. Episode
success (scripts/eval_toolcall.py) can be no better than the call's accuracy times the first rate.
"""
import argparse
import json
import random
from collections import Counter, defaultdict

import torch

from model.agent import extract_final_answer
from model.data.chat import template_inputs
from model.inference import load_model_for_inference
from model.tools import result_value
from model.training.rewards import answers_match

KINDS = ("follows_tool", "true_answer", "neither")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight", nargs="+", default=["agent_sft"], help="stage names or .pth files")
    parser.add_argument("--save_dir", default="out", help="directory the stage names are resolved in")
    parser.add_argument("--hidden_size", type=int, default=None, help="pick <stage>_<hidden>.pth when several exist")
    parser.add_argument("--data_path", default="dataset/demo_agent_sft_val.jsonl",
                        help="tool-calling chats ending with a tool message and the final reply")
    parser.add_argument("--max_gen_len", type=int, default=24, help="token limit of the final reply")
    parser.add_argument("--seed", type=int, default=0, help="which other task's result each chat is given")
    parser.add_argument("--show", type=int, default=0, help="print this many swapped-result replies per model")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    return parser.parse_args(argv)


def read_chats(path: str) -> list[dict]:
    """(task, messages up to the tool message, tool result) of each chat whose last three messages are the call,
    its result and the final reply."""
    chats = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                messages = json.loads(line)["conversations"]
                call, result = messages[-3], messages[-2]
            except (ValueError, KeyError, IndexError, TypeError) as error:
                raise SystemExit(f"{path}:{number}: not a chat line ({error})") from None
            if result.get("role") != "tool" or not call.get("tool_calls"):
                raise SystemExit(f"{path}:{number}: not a chat ending with a tool call, its result and a reply")
            chats.append({"task": call["tool_calls"][0]["name"], "messages": messages[:-1],
                          "result": result["content"]})
    return chats


def swapped_results(chats: list[dict], seed: int) -> list[str]:
    """For each chat, the result of another chat of the same tool whose answer differs from its own."""
    rng = random.Random(seed)
    by_task = defaultdict(list)
    for chat in chats:
        by_task[chat["task"]].append(chat["result"])
    swapped = []
    for chat in chats:
        own = result_value(chat["result"])
        others = [r for r in by_task[chat["task"]] if not answers_match(result_value(r), own)]
        swapped.append(rng.choice(others) if others else None)
    return swapped


@torch.no_grad()
def final_reply(loaded, messages: list[dict], result: str, max_gen_len: int) -> str:
    messages = messages[:-1] + [{"role": "tool", "content": result}]
    messages, tools = template_inputs(messages)
    tokenizer = loaded.tokenizer
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_dict=True)[
        "input_ids"]
    x = torch.tensor([list(ids)], device=loaded.device)
    out = loaded.model.generate(x, max_new_tokens=max_gen_len, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True)


def measure(loaded, chats: list[dict], swapped: list[str], max_gen_len: int, show: int) -> dict:
    counts = defaultdict(Counter)
    shown = 0
    for chat, other in zip(chats, swapped):
        tally = counts[chat["task"]]
        tally["chats"] += 1
        answer = extract_final_answer(final_reply(loaded, chat["messages"], chat["result"], max_gen_len))
        tally["right_result_answered"] += answers_match(answer, result_value(chat["result"]))
        if other is None:
            continue
        reply = final_reply(loaded, chat["messages"], other, max_gen_len)
        answer = extract_final_answer(reply)
        kind = "follows_tool" if answers_match(answer, result_value(other)) else \
            "true_answer" if answers_match(answer, result_value(chat["result"])) else "neither"
        tally["swapped"] += 1
        tally[kind] += 1
        if shown < show:
            shown += 1
            print(f"  tool said {other!r} (true {chat['result']!r}) -> {reply!r}: {kind}")
    counts["all"] = sum(counts.values(), Counter())
    return {task: dict(tally) for task, tally in counts.items()}


def rate(tally: dict, key: str, of: str) -> str:
    return f"{tally.get(key, 0) / tally[of]:.1%}" if tally.get(of) else "-"


def main(argv=None):
    args = parse_args(argv)
    chats = read_chats(args.data_path)
    swapped = swapped_results(chats, args.seed)
    results = {}
    for weight in args.weight:
        loaded = load_model_for_inference(weight=weight, save_dir=args.save_dir, hidden_size=args.hidden_size,
                                          device=args.device, dtype="float32", mode="chat", verbose=False)
        results[weight] = measure(loaded, chats, swapped, args.max_gen_len, args.show)
        print(f"{weight}: {args.data_path}, final reply after the right call")
        for task, tally in results[weight].items():
            answered = rate(tally, "right_result_answered", "chats")
            follows, true, neither = (rate(tally, kind, "swapped") for kind in KINDS)
            print(f"  {task:15s} n={tally['chats']:<4d} right result -> answered it {answered:>6s} | swapped result -> "
                  f"follows the tool {follows:>6s}, true answer {true:>6s}, neither {neither:>6s}")
    return results


if __name__ == "__main__":
    main()
