"""Distillation's memory over steps: the process's peak and current resident memory while train_distillation.py
trains, once per --pad_to_multiple_of (1 = each batch padded to its longest chat, the old behaviour; 64 = the
default), with the real tokens/s, so the cost of the extra padding shows next to the memory it saves.

    python -m scripts.bench.bench_distill_memory                        # demo shapes, 200 steps, 1 vs 64
    python -m scripts.bench.bench_distill_memory --multiples 1,32,64,512 --steps 100
    python -m scripts.bench.bench_distill_memory --env ONEDNN_PRIMITIVE_CACHE_CAPACITY=16   # try a runtime knob

Each run is a fresh `python train_distillation.py` process (memory is per process, and allocator or oneDNN
settings in --env only take effect at start) on the demo SFT chats with the demo pipeline's shapes: the tiny
student and the 384 x 4 teacher, batch 16, max_seq_len 512, bf16 autocast where the CPU is faster in it. Weights are
random (memory does not depend on what the models know) unless --checkpoints names a directory with the pipeline's
full_sft_<h>.pth and teacher_sft_<h>.pth. Peak memory is what the trainer logs (peak_mem_gb, ru_maxrss on CPUs);
current memory is the process's VmRSS, read when each log line appears. Measured: docs/distillation.md.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multiples", default="1,64", help="comma list of --pad_to_multiple_of values to compare")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--report_steps", default="10,50,100,150,200", help="steps whose memory is printed")
    parser.add_argument("--checkpoints", default=None,
                        help="directory with full_sft_256.pth and teacher_sft_384.pth (default: random weights)")
    parser.add_argument("--dtype", default=None, help="--dtype of the runs (default: the script's own choice)")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE added to each run's environment")
    parser.add_argument("--extra", default="", help="more train_distillation.py flags, space-separated")
    return parser.parse_args(argv)


def random_checkpoints(directory: str) -> str:
    """The demo pipeline's student and teacher shapes with random weights, saved as the pipeline names them."""
    import torch

    from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
    from model.checkpoint import save_weights
    from transformers import AutoTokenizer
    vocab_size = len(AutoTokenizer.from_pretrained(os.path.join(ROOT, "model")))
    torch.manual_seed(0)
    student = TinyMindForCausalLM(TinyMindConfig(vocab_size=vocab_size, **PRESETS["tiny"]))
    save_weights(student, os.path.join(directory, f"full_sft_{student.config.hidden_size}.pth"))
    teacher = TinyMindForCausalLM(TinyMindConfig(vocab_size=vocab_size, **{
        **PRESETS["tiny"], "hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6,
        "num_key_value_heads": 2}))
    save_weights(teacher, os.path.join(directory, "teacher_sft_384.pth"))
    return directory


def resident_gb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1e6  # kB
    except OSError:
        return None
    return None


def run(multiple: int, checkpoints: str, work: str, args, index: int = 0) -> dict:
    """One training process; {step: (peak GB, current GB, tokens/s)} at every log line, and its wall time."""
    save_dir = os.path.join(work, f"run{index}_pad{multiple}")
    command = [sys.executable, "train_distillation.py", "--save_dir", save_dir,
               "--from_weight", os.path.join(checkpoints, "full_sft_256.pth"),
               "--teacher_weight", os.path.join(checkpoints, "teacher_sft_384.pth"),
               "--pad_to_multiple_of", str(multiple), "--max_steps", str(args.steps), "--log_interval", "10",
               "--eval_interval", "0", "--eval_batches", "1", "--save_interval", str(10 * args.steps),
               *(["--dtype", args.dtype] if args.dtype else []), *args.extra.split()]
    env = dict(os.environ, WANDB_MODE="disabled", **dict(item.split("=", 1) for item in args.env))
    log_path = os.path.join(save_dir, "logs", "distill.jsonl")
    start, seen, points = time.time(), 0, {}
    with open(save_dir + ".out", "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        while True:
            done = process.poll() is not None
            current = resident_gb(process.pid)
            if os.path.exists(log_path):
                with open(log_path) as f:
                    lines = f.readlines()
                for line in lines[seen:]:
                    record = json.loads(line)
                    if "peak_mem_gb" in record:
                        points[record["step"]] = (record["peak_mem_gb"], current, record.get("tokens_per_sec"))
                seen = len(lines)
            if done:
                break
            time.sleep(0.2)
    if process.returncode != 0:
        with open(output.name) as f:
            raise SystemExit(f"pad_to_multiple_of {multiple}: train_distillation.py failed:\n{f.read()[-3000:]}")
    return {"points": points, "seconds": time.time() - start}


def main(argv=None):
    args = parse_args(argv)
    multiples = [int(m) for m in args.multiples.split(",")]
    report_steps = [int(s) for s in args.report_steps.split(",") if int(s) <= args.steps]
    with tempfile.TemporaryDirectory() as work:
        checkpoints = args.checkpoints or random_checkpoints(work)
        # a value may repeat (1,64,1,64): alternating runs show how much a busy machine moves the timings
        results = [(m, run(m, checkpoints, work, args, index)) for index, m in enumerate(multiples)]
    print(f"\n{args.steps} distillation steps per run ({' '.join(args.env) or 'default environment'})")
    header = "pad_to_multiple_of | " + " | ".join(f"step {s}" for s in report_steps) + " | tokens/s | wall"
    print(header + "\n" + "-" * len(header))
    for multiple, result in results:
        points = result["points"]
        speeds = [p[2] for p in points.values() if p[2]]
        for name, index in (("peak", 0), ("now", 1)):
            cells = [f"{points[s][index]:.2f} GB" if s in points and points[s][index] else "-" for s in report_steps]
            tail = f"{sum(speeds) / max(len(speeds), 1):,.0f} | {result['seconds']:.0f} s" if index == 0 else ""
            print(f"{multiple:>5} {name:>4} | " + " | ".join(cells) + (f" | {tail}" if tail else ""))
    return results


if __name__ == "__main__":
    main()
