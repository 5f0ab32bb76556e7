"""Where a reasoning model's held-out sums go wrong: each greedy reply sorted by its first wrong step.

    python -m scripts.bench.sum_errors --weight out/reason_256.pth
    python -m scripts.bench.sum_errors --weight out/grpo_256.pth --show 5      # + the first 5 replies of each kind
    python -m scripts.bench.sum_errors --weight out/reason_256.pth --samples 8  # + sampled pass@1 and pass@8

The demo's replies work a sum in three lines (docs/reasoning.md): `solve: a + b` restates it, `ones: ...` adds the
ones digits, `tens: ...` the tens digits and the carry, and the answer is the tens result followed by the last
digit of the ones. A reply is counted under the first of these that fails:
    correct        the final answer is right (whatever the steps)
    malformed      not in that shape at all
    skipped        the sum restated, then a wrong answer with no digit steps (`two_digit_sums --quick_sums`' shape)
    copy           the restated operands are not the prompt's
    operation      + where the prompt takes away, or - where it adds
    ones / tens    a wrong line, given the restated sum
    join           every line right, the answer wrongly put together from them
The prompts are the GRPO held-out file's (dataset/demo_grpo_val.jsonl), answered greedily in batches the way
train_grpo.py evaluates, so `correct` equals its held-out accuracy.
"""
import argparse
import re
from collections import Counter

import torch
from transformers import AutoTokenizer, GenerationConfig

from model.checkpoint import load_weights
from model.data.prompts import PromptDataset
from model.model import TinyMindForCausalLM
from model.training.rollouts import generate_rollout
from model.training.runtime import init_runtime

KINDS = ["correct", "malformed", "skipped", "copy", "operation", "ones", "tens", "join"]
WORKED = re.compile(r"solve: (\d+) ([+-]) (\d+)\nones: (\d+) [+-] (\d+) = (\d+)\ntens: (\d+) [+-] (\d+) [+-] (\d+) = "
                    r"(-?\d+)\n</think>\n<answer>\n(-?\d+)\n</answer>")
QUICK = re.compile(r"solve: \d+ [+-] \d+\n</think>\n<answer>\n-?\d+\n</answer>")
ADDS = re.compile(r"\+|more|又得到")


def prompt_sum(question: str) -> tuple[int, str, int]:
    """(a, op, b) of a demo sum prompt: its first two numbers; a word problem adds on 'more' / '又得到'."""
    a, b = (int(n) for n in re.findall(r"\d+", question)[:2])
    return a, "+" if ADDS.search(question) else "-", b


def expected_lines(a: int, op: str, b: int) -> tuple[tuple[int, int, int], tuple[int, int, int, int]]:
    """The ones line (left, right, result) and tens line (a tens, b tens, carry or borrow, result) of a + b / a - b."""
    if op == "+":
        ones = a % 10 + b % 10
        return (a % 10, b % 10, ones), (a // 10, b // 10, ones // 10, a // 10 + b // 10 + ones // 10)
    borrow = int(a % 10 < b % 10)
    top = a % 10 + 10 * borrow
    return (top, b % 10, top - b % 10), (a // 10, b // 10, borrow, a // 10 - b // 10 - borrow)


def worked_lines(reply: str):
    """(restated operands, operation, ones line, tens line, answer) of a reply in the worked shape, or None."""
    match = WORKED.search(reply)
    if match is None:
        return None
    numbers = [int(g) for i, g in enumerate(match.groups(), 1) if i != 2]
    return tuple(numbers[:2]), match[2], tuple(numbers[2:5]), tuple(numbers[5:9]), numbers[9]


def shape(reply: str) -> str:
    """'worked' (digit steps), 'quick' (the sum restated, then the answer at once) or 'other'."""
    return "worked" if WORKED.search(reply) else "quick" if QUICK.search(reply) else "other"


def classify(question: str, reply: str) -> str:
    """The first wrong step of one reply (see KINDS)."""
    a, op, b = prompt_sum(question)
    lines = worked_lines(reply)
    if lines is None:
        answer = re.search(r"<answer>\s*(-?\d+)\s*</answer>", reply)
        if answer and int(answer[1]) == (a + b if op == "+" else a - b):
            return "correct"
        return "skipped" if QUICK.search(reply) else "malformed"
    restated, restated_op, ones, tens, answer = lines
    if answer == (a + b if op == "+" else a - b):
        return "correct"
    if restated != (a, b):
        return "copy"
    if restated_op != op:
        return "operation"
    want_ones, want_tens = expected_lines(a, op, b)
    if ones != want_ones:
        return "ones"
    if tens != want_tens:
        return "tens"
    return "join"


def steps_reward(prompts, completions, **kwargs) -> list[float]:
    """A GRPO reward per digit step (TRL's reward signature): the fraction of five checks a reply passes, namely the
    restated operands, the operation, the ones line, the tens line, and the answer joined from the reply's own lines.
    `train_grpo.py --reward_funcs format,answer,scripts.bench.sum_errors:steps_reward` (docs/grpo.md)."""
    scores = []
    for prompt, completion in zip(prompts, completions):
        a, op, b = prompt_sum(prompt[-1]["content"].split("\n")[0])
        lines = worked_lines(completion if isinstance(completion, str) else completion[-1]["content"])
        if lines is None:
            scores.append(0.0)
            continue
        restated, restated_op, ones, tens, answer = lines
        want_ones, want_tens = expected_lines(a, op, b)
        checks = [restated == (a, b), restated_op == op, ones == want_ones, tens == want_tens,
                  answer == tens[3] * 10 + ones[2] % 10]
        scores.append(sum(checks) / len(checks))
    return scores


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight", required=True, help="a .pth with its config JSON beside it (out/reason_256.pth)")
    parser.add_argument("--data_path", default="dataset/demo_grpo_val.jsonl", help="held-out sum prompts")
    parser.add_argument("--tokenizer_path", default="model", help="directory with tokenizer.json")
    parser.add_argument("--max_gen_len", type=int, default=64, help="reply length limit (the pipeline's GRPO uses 64)")
    parser.add_argument("--batch_size", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: what training would pick)")
    parser.add_argument("--show", type=int, default=0, help="print this many replies of each wrong kind")
    parser.add_argument("--samples", type=int, default=0,
                        help="also sample this many replies per prompt at --temperature: sampled pass@1 (the mean "
                             "over samples, what GRPO's reward averages) and pass@k")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for --samples")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed for --samples")
    return parser.parse_args()


@torch.no_grad()
def main():
    args = parse_args()
    runtime = init_runtime(None, args.dtype, 0)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    state, config = load_weights(args.weight)
    if config is None:
        raise SystemExit(f"{args.weight}: no config JSON beside it")
    model = TinyMindForCausalLM(config)
    model.load_state_dict(state)
    model.to(runtime.device).eval()
    prompts = PromptDataset(args.data_path, tokenizer, 512)
    items = [prompts[i] for i in range(len(prompts))]
    greedy = GenerationConfig(max_new_tokens=args.max_gen_len, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    replies = []
    with runtime.autocast():
        for start in range(0, len(items), args.batch_size):
            replies += generate_rollout(model, tokenizer, items[start:start + args.batch_size], 1, greedy,
                                        runtime.device).texts
    kinds = [classify(item["prompt"][-1]["content"].split("\n")[0], reply) for item, reply in zip(items, replies)]
    counts = Counter(kinds)
    print(f"{args.weight}: {len(items)} held-out prompts, {runtime.dtype}")
    for kind in KINDS:
        print(f"  {kind:<10} {counts[kind]:4d}  {counts[kind] / len(items):6.1%}")
    shapes = Counter(shape(reply) for reply in replies)
    right = Counter(shape(reply) for reply, kind in zip(replies, kinds) if kind == "correct")
    print("  by shape: " + ", ".join(f"{name} {shapes[name]} ({right[name]} right)"
                                    for name in ("worked", "quick", "other")))
    for kind in KINDS[1:]:
        shown = [(item, reply) for item, reply, k in zip(items, replies, kinds) if k == kind][:args.show]
        for item, reply in shown:
            print(f"[{kind}] {item['prompt'][-1]['content'].splitlines()[0]!r} -> {reply!r}")
    if args.samples > 0:
        sampled_accuracy(model, tokenizer, items, args, runtime)


def sampled_accuracy(model, tokenizer, items: list[dict], args, runtime) -> tuple[float, float]:
    """Sampled pass@1 (the mean over k samples, as DeepSeek-R1 reports it) and pass@k: what GRPO optimises is the
    sampled policy, which a greedy score does not see."""
    torch.manual_seed(args.seed)
    sampling = GenerationConfig(max_new_tokens=args.max_gen_len, do_sample=True, temperature=args.temperature,
                                top_p=1.0, top_k=0, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    per_prompt = max(1, args.batch_size // args.samples)
    correct, worked = [], 0
    with runtime.autocast():
        for start in range(0, len(items), per_prompt):
            batch = items[start:start + per_prompt]
            texts = generate_rollout(model, tokenizer, batch, args.samples, sampling, runtime.device).texts
            worked += sum(shape(text) == "worked" for text in texts)
            for i, item in enumerate(batch):
                question = item["prompt"][-1]["content"].split("\n")[0]
                correct.append([classify(question, text) == "correct"
                                for text in texts[i * args.samples:(i + 1) * args.samples]])
    pass1 = sum(map(sum, correct)) / (len(correct) * args.samples)
    pass_k = sum(map(any, correct)) / len(correct)
    print(f"  sampled (T {args.temperature}, {args.samples} per prompt): pass@1 {pass1:.1%}  "
          f"pass@{args.samples} {pass_k:.1%}  worked {worked / (len(correct) * args.samples):.1%}")
    return pass1, pass_k


if __name__ == "__main__":
    main()
