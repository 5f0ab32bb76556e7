"""Variants of the demo's reasoning and GRPO data (two-digit sums): the experiments of docs/grpo.md.

    python -m scripts.bench.two_digit_sums --out_dir /tmp/two_digit                 # no quick replies
    python train_reason.py --from_weight full_sft --data_path /tmp/two_digit/demo_reason.jsonl --epochs 6
    python -m scripts.bench.sum_errors --weight out/reason_256.pth --data_path /tmp/two_digit/demo_grpo_val.jsonl
    python train_grpo.py --from_weight reason --data_path /tmp/two_digit/demo_grpo.jsonl --temperature 0.7 \\
        --max_gen_len 64 --learning_rate 1e-4 --max_steps 60 --eval_interval 20
    python -m scripts.bench.two_digit_sums --out_dir /tmp/quick --quick_sums 1400 --quick_op both

The shipped dataset/demo_reason.jsonl works 4,268 two-digit sums once each and answers 600 other additions at once
(scripts/build_demo_data.py, two_digit_sums); this script writes the same kind of files with other counts: its
two-operand sums (worked or quick) are dropped and --reason_sums / --quick_sums others drawn, while the three-number
sums, poems and Shakespeare examples stay. GRPO's prompts are --grpo_prompts other training sums, and the held-out
prompts are sums held out of every file (Sum.held_out) with an operand of 20 or more, one phrasing each. The shipped
data is only read. (The experiments in docs/grpo.md up to stop 27 drew from the earlier shipped file, whose other
examples came in another order: the same counts now give other draws.)
"""
import argparse
import json
import shutil
from pathlib import Path

from scripts.build_demo_data import is_two_operand_sum, two_digit_sums, write_jsonl

DATASET = Path(__file__).resolve().parents[2] / "dataset"


def build(out_dir: Path, reason_sums: int, grpo_prompts: int, val_prompts: int, seed: int,
          quick_sums: int = 0, quick_op: str = "both") -> dict[str, int]:
    with (DATASET / "demo_reason.jsonl").open(encoding="utf-8") as f:
        kept = [sample for sample in map(json.loads, f) if not is_two_operand_sum(sample)]
    reasoning, grpo, val = two_digit_sums(kept, reason_sums, grpo_prompts, val_prompts, seed, quick_sums, quick_op)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "demo_reason.jsonl", reasoning)
    shutil.copy(DATASET / "demo_reason_val.jsonl", out_dir / "demo_reason_val.jsonl")
    write_jsonl(out_dir / "demo_grpo_val.jsonl", val)
    write_jsonl(out_dir / "demo_grpo.jsonl", grpo)
    return {"reasoning examples": len(reasoning), "kept from the shipped file": len(kept), "quick sums": quick_sums,
            "GRPO prompts": grpo_prompts, "held-out prompts": len(val)}


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
