"""Each trained stage's samples for the report card, every checkpoint in one process.

    python -m scripts.sample_stages --save_dir out                  # the demo's stages: held-out prompts + references
    python -m scripts.sample_stages --save_dir out --prompts builtin --hidden_size 512   # the GPU recipe's stages

For each stage it runs what `python eval_model.py --weight <stage> --prompts heldout:dataset/<its held-out file>
--num_prompts 4 --out_of_domain 2 --temperature 0 --output <save_dir>/summaries/samples_<stage>.json` would (the
command is printed first), so the report card shows each stage's greedy answers to held-out prompts from its own
data beside their references, plus open prompts marked out of domain. One process rather than one per stage: each
eval_model.py call spends most of its few seconds importing torch and transformers. A checkpoint that does not exist
(its stage was not run) is skipped.
"""
import argparse
import os
import shlex
import time

import eval_model

# (name in the report, checkpoint, LoRA adapter, held-out file in dataset/). MiniMind's files have no held-out twins:
# the GPU recipe answers eval_model's built-in prompts with the stages it trains.
HELD_OUT_SAMPLES = [("pretrain", "pretrain", None, "demo_pretrain_val.jsonl"),
                    ("full_sft", "full_sft", None, "demo_sft_val.jsonl"),
                    ("lora_identity", "full_sft", "lora_identity", "demo_lora_identity_val.jsonl"),
                    ("dpo", "dpo", None, "demo_dpo_val.jsonl"), ("distill", "distill", None, "demo_sft_val.jsonl"),
                    ("distill_ce", "distill_ce", None, "demo_sft_val.jsonl"),
                    ("reason", "reason", None, "demo_reason_val.jsonl"), ("grpo", "grpo", None, "demo_grpo_val.jsonl")]
BUILTIN_SAMPLES = [(stage, stage, None, None) for stage in ("pretrain", "full_sft", "dpo", "reason", "grpo")]


def sample_commands(save_dir: str, hidden_size: int, prompts: str = "heldout", quick: bool = False,
                    tokenizer_path: str | None = None, num_threads: int | None = None) -> list:
    """(name, checkpoint file, eval_model.py arguments) for every stage's samples."""
    counts = ["--num_prompts", "2", "--out_of_domain", "1"] if quick else ["--num_prompts", "4", "--out_of_domain", "2"]
    commands = []
    for name, weight, lora, held_out in HELD_OUT_SAMPLES if prompts == "heldout" else BUILTIN_SAMPLES:
        chosen = ["--prompts", f"heldout:dataset/{held_out}", *counts] if held_out else ["--prompts", "builtin"]
        lora_flags = ["--lora_name", lora] if lora else []
        tokenizer_flags = ["--tokenizer_path", tokenizer_path] if tokenizer_path else []
        argv = ["--save_dir", save_dir, "--weight", weight, "--hidden_size", str(hidden_size), *lora_flags,
                *tokenizer_flags,
                # plain greedy, as every stage's own held-out metric: a repetition penalty breaks digit steps
                *chosen, "--temperature", "0", "--repetition_penalty", "1.0",
                "--max_new_tokens", "24" if quick else "96", "--output", f"{save_dir}/summaries/samples_{name}.json",
                *(["--num_threads", str(num_threads)] if num_threads else [])]
        checkpoint = os.path.join(save_dir, f"lora/{lora}" if lora else weight)
        commands.append((name, f"{checkpoint}_{hidden_size}.pth", argv))
    return commands


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save_dir", default="out", help="where the stages' checkpoints are; samples go to "
                                                          "<save_dir>/summaries/samples_<stage>.json")
    parser.add_argument("--hidden_size", type=int, default=256, help="the checkpoints' width (demo: 256, GPU: 512)")
    parser.add_argument("--prompts", default="heldout", choices=["heldout", "builtin"],
                        help="heldout: each stage's own held-out demo file beside the references; builtin: "
                             "eval_model.py's built-in prompts (for data without held-out files)")
    parser.add_argument("--quick", action="store_true", help="fewer prompts and shorter answers (smoke test)")
    parser.add_argument("--tokenizer_path", default=None, help="a tokenizer other than the checkpoints' own")
    parser.add_argument("--num_threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    args = parser.parse_args(argv)
    for name, checkpoint, eval_argv in sample_commands(args.save_dir, args.hidden_size, args.prompts, args.quick,
                                                       args.tokenizer_path, args.num_threads):
        if not os.path.exists(checkpoint):
            print(f"=== [{name}] skipped: {checkpoint} does not exist (its stage was not run)")
            continue
        print(f"\n=== [{name}] python eval_model.py {' '.join(shlex.quote(a) for a in eval_argv)}", flush=True)
        start = time.time()
        eval_model.main(eval_argv)
        print(f"=== [{name}] {time.time() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
