"""Every TinyMind stage, one after the other, on the demo data, ending in a report card (out/report.md).

    python scripts/run_pipeline.py                          # the CPU demo (tiny model), about half an hour on 2 cores
    python scripts/run_pipeline.py --stages sft,lora        # a subset (stages whose output exists are skipped)
    python scripts/run_pipeline.py --force --stages dpo     # rerun a stage even though its output exists
    python scripts/run_pipeline.py --quick --save_dir /tmp/ci/out     # seconds per stage: a smoke test (CI)
    python scripts/run_pipeline.py --recipe minimind_gpu    # MiniMind's datasets on one GPU (see README)
    python scripts/run_pipeline.py --recipe minimind_gpu --nproc 8    # the same under torchrun on 8 GPUs

Each stage is the same command a user would type (printed before it runs), so the pipeline doubles as the
documentation of the recipe. A stage whose output file exists is skipped unless --force, so a killed pipeline
continues where it stopped.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["clean", "tokenizer", "pretrain", "sft", "lora", "dpo", "teacher", "distill", "reason", "grpo", "eval",
         "report"]


def demo_recipe(out: str, quick: bool) -> dict:
    """Stage -> (commands, the file that proves the stage is done). `quick` shrinks every stage to a few steps."""
    q = ["--max_steps", "4", "--eval_batches", "2", "--log_interval", "2", "--save_interval", "1000"] if quick else []
    model = ["--preset", "nano"] if quick else []
    teacher = ["--hidden_size", "96", "--num_hidden_layers", "2"] if quick else \
        ["--hidden_size", "384", "--num_hidden_layers", "4", "--num_attention_heads", "6", "--num_key_value_heads", "2"]
    small_eval = ["--eval_prompts", "4", "--max_new_tokens", "16"] if quick else []
    hidden = "64" if quick else "256"
    teacher_hidden = teacher[1]
    clean_data = f"{out}/data/demo_pretrain_clean.jsonl"
    py = sys.executable
    return {
        # Gopher's "80% of words contain a letter" rule drops verse drama (speaker names, short lines): keep it.
        "clean": ([[py, "clean_data.py", "--input", "dataset/demo_pretrain.jsonl", "--output", clean_data,
                    "--min_alpha_words_frac", "0", "--num_workers", "2"]], clean_data),
        "tokenizer": ([[py, "scripts/train_tokenizer.py"]], "model/tokenizer.json"),
        "pretrain": ([[py, "train_pretrain.py", "--save_dir", out, "--data_path", clean_data,
                       "--val_data_path", "dataset/demo_pretrain_val.jsonl", *model, *q]],
                     f"{out}/pretrain_{hidden}.pth"),
        "sft": ([[py, "train_full_sft.py", "--save_dir", out, *q, *small_eval]], f"{out}/full_sft_{hidden}.pth"),
        "lora": ([[py, "train_lora.py", "--save_dir", out, *q, *small_eval]],
                 f"{out}/lora/lora_identity_{hidden}.pth"),
        "dpo": ([[py, "train_dpo.py", "--save_dir", out, *q]], f"{out}/dpo_{hidden}.pth"),
        "teacher": ([[py, "train_pretrain.py", "--save_dir", out, "--save_weight", "teacher_pretrain", *teacher,
                      "--data_path", clean_data, "--val_data_path", "dataset/demo_pretrain_val.jsonl", *q],
                     [py, "train_full_sft.py", "--save_dir", out, "--save_weight", "teacher_sft",
                      "--from_weight", "teacher_pretrain", "--hidden_size", teacher_hidden, *q, *small_eval]],
                    f"{out}/teacher_sft_{teacher_hidden}.pth"),
        "distill": ([[py, "train_distillation.py", "--save_dir", out, "--teacher_weight", "teacher_sft",
                      "--teacher_hidden_size", teacher_hidden, "--from_weight", "full_sft", "--hidden_size", hidden,
                      *q, *small_eval]], f"{out}/distill_{hidden}.pth"),
        "reason": ([[py, "train_distillation.py", "--mode", "reason", "--save_dir", out, "--from_weight", "full_sft",
                     "--hidden_size", hidden, *q, *small_eval]], f"{out}/reason_{hidden}.pth"),
        "grpo": ([[py, "train_grpo.py", "--save_dir", out, "--from_weight", "reason", "--hidden_size", hidden, *q,
                   *(["--num_generations", "4", "--max_gen_len", "16", "--eval_samples", "8"] if quick else
                     ["--max_steps", "100", "--eval_interval", "25"])]],
                 f"{out}/grpo_{hidden}.pth"),
        "eval": ([[py, "eval_model.py", "--save_dir", out, "--weight", stage, "--hidden_size", hidden,
                   "--prompts", "builtin", "--max_new_tokens", "24" if quick else "96",
                   "--output", f"{out}/summaries/samples_{stage}.json"]
                  for stage in ("pretrain", "full_sft", "dpo", "reason", "grpo")],
                 f"{out}/summaries/samples_grpo.json"),
        "report": ([[py, "scripts/report.py", "--save_dir", out]], f"{out}/report.md"),
    }


def minimind_gpu_recipe(out: str, nproc: int) -> dict:
    """MiniMind's datasets (put them in dataset/): the documented single-GPU / torchrun recipe, small preset."""
    launch = ["torchrun", "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    return {
        "clean": ([[sys.executable, "clean_data.py", "--input", "dataset/pretrain_hq.jsonl", "--output",
                    f"{out}/data/pretrain_hq_clean.jsonl", "--num_workers", "16"]],
                  f"{out}/data/pretrain_hq_clean.jsonl"),
        "tokenizer": ([[sys.executable, "scripts/train_tokenizer.py"]], "model/tokenizer.json"),
        "pretrain": ([[*launch, "train_pretrain.py", "--save_dir", out, "--preset", "small", "--batch_size", "32",
                       "--data_path", f"{out}/data/pretrain_hq_clean.jsonl", "--max_seq_len", "512"]],
                     f"{out}/pretrain_512.pth"),
        "sft": ([[*launch, "train_full_sft.py", "--save_dir", out, "--data_path", "dataset/sft_mini_512.jsonl",
                  "--hidden_size", "512"]], f"{out}/full_sft_512.pth"),
        "lora": ([[*launch, "train_lora.py", "--save_dir", out, "--data_path", "dataset/lora_identity.jsonl",
                   "--hidden_size", "512"]], f"{out}/lora/lora_identity_512.pth"),
        "dpo": ([[*launch, "train_dpo.py", "--save_dir", out, "--data_path", "dataset/dpo.jsonl",
                  "--hidden_size", "512"]], f"{out}/dpo_512.pth"),
        "reason": ([[*launch, "train_distillation.py", "--mode", "reason", "--save_dir", out, "--data_path",
                     "dataset/r1_mix_1024.jsonl", "--max_seq_len", "1024", "--hidden_size", "512"]],
                   f"{out}/reason_512.pth"),
        "grpo": ([[*launch, "train_grpo.py", "--save_dir", out, "--from_weight", "reason", "--hidden_size", "512",
                   "--data_path", "dataset/demo_grpo.jsonl"]], f"{out}/grpo_512.pth"),
        "report": ([[sys.executable, "scripts/report.py", "--save_dir", out]], f"{out}/report.md"),
    }


def run_stage(name: str, commands: list, env: dict) -> float:
    start = time.time()
    for command in commands:
        print(f"\n=== [{name}] {' '.join(shlex.quote(c) for c in command)}", flush=True)
        result = subprocess.run(command, cwd=ROOT, env=env)
        if result.returncode != 0:
            raise SystemExit(f"stage '{name}' failed (exit {result.returncode}); fix it and rerun: finished stages "
                             f"are skipped")
    return time.time() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(ORDER), help=f"comma list from {ORDER} (default: all)")
    parser.add_argument("--force", action="store_true", help="rerun stages whose output already exists")
    parser.add_argument("--save_dir", default="out", help="where every stage writes (checkpoints, logs, report)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage with the nano model (smoke test)")
    parser.add_argument("--recipe", default="demo", choices=["demo", "minimind_gpu"],
                        help="demo: embedded data on any machine; minimind_gpu: MiniMind's datasets on GPUs")
    parser.add_argument("--nproc", type=int, default=1, help="GPUs for torchrun (minimind_gpu recipe)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands without running them")
    args = parser.parse_args(argv)
    save_dir = os.path.abspath(args.save_dir) if os.path.isabs(args.save_dir) else args.save_dir
    recipe = demo_recipe(save_dir, args.quick) if args.recipe == "demo" else minimind_gpu_recipe(save_dir, args.nproc)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in ORDER]
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; choose from {ORDER}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    timings_file = os.path.join(ROOT, save_dir, "summaries", "pipeline.json")
    timings = {}
    if os.path.exists(timings_file):
        with open(timings_file) as f:
            timings = json.load(f)
    total_start = time.time()
    for name in ORDER:
        if name not in wanted or name not in recipe:
            continue
        commands, done_file = recipe[name]
        if args.dry_run:
            for command in commands:
                print(" ".join(shlex.quote(c) for c in command))
            continue
        if os.path.exists(os.path.join(ROOT, done_file)) and not args.force and name != "report":
            print(f"=== [{name}] skipped: {done_file} exists (--force to rerun)")
            continue
        timings[name] = run_stage(name, commands, env)
        os.makedirs(os.path.dirname(timings_file), exist_ok=True)
        with open(timings_file, "w") as f:
            json.dump(timings, f, indent=2)
    if not args.dry_run:
        print(f"\npipeline done in {time.time() - total_start:.0f} s; stage times: "
              + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
