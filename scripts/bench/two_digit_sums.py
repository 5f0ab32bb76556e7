"""Reasoning and GRPO data with two-digit sums, each worked once: the experiment of docs/grpo.md ("Two-digit sums").

    python -m scripts.bench.two_digit_sums --out_dir /tmp/two_digit                 # 4,268 sums, as in the docs
    python train_reason.py --from_weight full_sft --data_path /tmp/two_digit/demo_reason.jsonl --epochs 6
    python -m scripts.bench.sum_errors --weight out/reason_256.pth --data_path /tmp/two_digit/demo_grpo_val.jsonl
    python train_grpo.py --from_weight reason --data_path /tmp/two_digit/demo_grpo.jsonl --temperature 0.7 \\
        --max_gen_len 64 --max_steps 40 --eval_interval 10
    python -m scripts.bench.two_digit_sums --out_dir /tmp/quick --quick_sums 600 --quick_op +   # "When the data
        # lets the model skip its working": then reasoning as above, GRPO with --learning_rate 1e-4 --max_steps 60

The shipped dataset/demo_reason.jsonl works each training sum of operands 0..19 twice (1,067 examples), and a model
trained on it for 8 epochs recalls digit lines per sum instead of computing them. Here its two-operand sums are
replaced by --reason_sums distinct sums of operands 0..99 (too many to recall), each worked once in a random
phrasing; the three-number sums, poems and Shakespeare examples stay. GRPO's prompts are --grpo_prompts other
training sums that no reply works, and the held-out prompts are sums held out of every file (the builder's hash,
Sum.held_out) with an operand of 20 or more, one phrasing each. --quick_sums adds replies to still other sums that
restate the sum and answer at once, with no digit steps, so the model has two behaviours for GRPO to choose between.
The shipped data is only read.
"""
import argparse
import json
import random
import shutil
from pathlib import Path

from scripts.build_demo_data import (Sum, all_sums, chat, digit_sum_problem, random_sum_problem, think_answer,
                                     with_format_hint, write_jsonl)

DATASET = Path(__file__).resolve().parents[2] / "dataset"
WORKED_SUM = "<think>\nsolve: "


def is_two_operand_sum(sample: dict) -> bool:
    reply = sample["conversations"][-1]["content"]
    return reply.startswith(WORKED_SUM) and "\nstep: " not in reply


def grpo_prompt(rng: random.Random, problem: Sum) -> dict:
    question, lang = random_sum_problem(rng, problem)
    return {"conversations": [{"role": "user", "content": with_format_hint(question.question, lang)}],
            "answer": question.answer}


def quick_sum_problem(rng: random.Random, problem: Sum) -> tuple[str, str]:
    """digit_sum_problem's prompt with a reply that restates the sum and skips its digit steps: the answer at once."""
    question, lang = random_sum_problem(rng, problem)
    return with_format_hint(question.question, lang), think_answer(f"solve: {problem.expression}", question.answer)


def build(out_dir: Path, reason_sums: int, grpo_prompts: int, val_prompts: int, seed: int,
          quick_sums: int = 0, quick_op: str = "both") -> dict[str, int]:
    rng = random.Random(seed)
    sums = all_sums(limit=100)
    held_out = [s for s in sums if s.held_out() and max(s.a, s.b) >= 20]
    train = [s for s in sums if not s.held_out()]
    rng.shuffle(train)
    rest = [s for s in train[reason_sums + grpo_prompts:] if quick_op in ("both", s.op)]
    if reason_sums + grpo_prompts > len(train) or quick_sums > len(rest):
        raise SystemExit(f"error: {reason_sums} + {grpo_prompts} + {quick_sums} ({quick_op}) sums asked for, "
                         f"{len(train)} training sums exist")
    with (DATASET / "demo_reason.jsonl").open(encoding="utf-8") as f:
        kept = [sample for sample in map(json.loads, f) if not is_two_operand_sum(sample)]
    reasoning = kept + [chat(*digit_sum_problem(rng, problem)) for problem in train[:reason_sums]]
    rng.shuffle(reasoning)
    if quick_sums:  # drawn from a second generator, so the other files stay those of --quick_sums 0
        quick_rng = random.Random(seed + 1)
        reasoning += [chat(*quick_sum_problem(quick_rng, problem)) for problem in rest[:quick_sums]]
        quick_rng.shuffle(reasoning)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "demo_reason.jsonl", reasoning)
    shutil.copy(DATASET / "demo_reason_val.jsonl", out_dir / "demo_reason_val.jsonl")
    rng.shuffle(held_out)
    write_jsonl(out_dir / "demo_grpo_val.jsonl", [grpo_prompt(rng, s) for s in held_out[:val_prompts]])
    write_jsonl(out_dir / "demo_grpo.jsonl",
                [grpo_prompt(rng, s) for s in train[reason_sums:reason_sums + grpo_prompts]])
    return {"reasoning examples": len(reasoning), "kept from the shipped file": len(kept), "quick sums": quick_sums,
            "GRPO prompts": grpo_prompts, "held-out prompts": min(val_prompts, len(held_out))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=Path, required=True, help="where the four jsonl files are written")
    parser.add_argument("--reason_sums", type=int, default=4268, help="distinct sums worked in demo_reason, each once")
    parser.add_argument("--grpo_prompts", type=int, default=2080, help="GRPO training sums (none worked above)")
    parser.add_argument("--val_prompts", type=int, default=242, help="held-out sums, one prompt each")
    parser.add_argument("--quick_sums", type=int, default=0,
                        help="more distinct sums, each answered without its digit steps (think: the sum only)")
    parser.add_argument("--quick_op", default="both", choices=["+", "-", "both"],
                        help="which sums --quick_sums draws from: additions, subtractions or both")
    parser.add_argument("--seed", type=int, default=7, help="which sums and phrasings are drawn")
    args = parser.parse_args()
    for name, count in build(args.out_dir, args.reason_sums, args.grpo_prompts, args.val_prompts, args.seed,
                             args.quick_sums, args.quick_op).items():
        print(f"{name}: {count:,}")
    print(f"written to {args.out_dir}")


if __name__ == "__main__":
    main()
