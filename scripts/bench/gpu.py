"""Every GPU measurement of issue 22 in one prepared run: under 8 minutes on one GPU, one JSON file.

    python -m scripts.bench.gpu --output $OUT/bench_gpu.json            # one GPU, every section
    python -m scripts.bench.gpu --device cpu --tiny                      # the dry run: every section at tiny shapes
    python -m scripts.bench.gpu --sections pretrain_small,minimind --minimind_path ~/minimind
    python -m scripts.bench.gpu_to_table docs/bench_gpu.json             # the markdown for docs/benchmarks.md

Sections, in the order they run:
  machine         GPU, driver, torch and CUDA versions, a measured bf16 matmul rate, whether the flash SDPA kernel runs
  pretrain_small  `small` at the recipe's batch 32 x 512, bf16: tokens/s, MFU, peak memory; eager and torch.compile
  pretrain_base   the same for `base`
  minimind        MiniMind at the same shape: our re-implementation of its padded loop (one document per row),
                  labelled as such, and with --minimind_path (a checkout) its own trainer too; ours beside them
  sft             packed vs padded SFT rows (bench_sft's runners)
  dpo             live vs precomputed reference (bench_dpo's worker)
  grpo            rollout tokens/s: one batched KV-cached generate vs one completion at a time
  distill         a distillation step (small student, base teacher) vs a plain SFT step of the same batch
  decode          KV-cached decode tokens/s and cache bytes for MHA, GQA, MLA (bench_model)
  moe             MoE step time vs a dense model of equal active parameters (bench_model)
  recipe          `--recipe minimind_gpu`, stage by stage, on synthetic files with MiniMind's names and shapes: the
                  cleaning, tokenizer and tokenization passes timed and scaled by file size, each training stage run
                  for 50-200 steps (GRPO 3) and its s/step times the full recipe's step count: projected hours

Time: each section may run until its deadline, the sum of its own and every earlier section's budget counted from the
start, so time an early section leaves over goes to the later ones. A section still running at its deadline is
stopped (SIGALRM) and keeps what it measured so far; a section that fails records its error; either way the run goes
on, and the JSON is rewritten after every section, so even a run killed from outside returns what it finished.
`--tiny` runs every section at toy shapes (nano models, a few steps, sub-MB files): a check that the script works,
not a measurement.
"""
import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch

from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
from model.device import cpu_model_name, default_device, matmul_rate
from model.training.engine import FUSED_ADAMW_DEVICES
from model.training.runtime import device_peak_flops, init_runtime
from scripts.bench import bench_dpo, bench_grpo, bench_model, bench_sft, bench_train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

# MiniMind's files as the docs of this repo describe them (its dataset page; a newer dpo.jsonl is 55 MB): the
# recipe section scales the time of each pass over a synthetic file by these sizes.
MINIMIND_FILE_MB = {"pretrain_hq.jsonl": 1600, "sft_mini_512.jsonl": 1200, "dpo.jsonl": 900, "r1_mix_1024.jsonl": 340,
                    "lora_identity.jsonl": 0.023}


@dataclass(frozen=True)
class Shapes:
    """What each section runs. FULL is the recipe's own shapes (the GPU defaults of the train_*.py scripts)."""
    presets: dict  # section label -> the preset run under it
    batch: int
    seq: int
    steps: int
    warmup: int
    pretrain_file_mb: float  # the synthetic pretraining documents the pretrain and minimind sections train on
    sft_batch: int
    sft_seq: int
    sft_file_mb: float
    sft_steps: int
    sft_rounds: int
    dpo_batch: int
    dpo_seq: int
    dpo_steps: int
    grpo_prompts: int
    grpo_generations: int
    grpo_new_tokens: int
    grpo_sequential_rows: int
    distill_batch: int
    distill_seq: int
    distill_steps: int
    teacher: str
    decode_prompt: int
    decode_new_tokens: int
    decode_batches: tuple
    moe_batch: int
    moe_seq: int
    moe_steps: int
    recipe_file_mb: dict  # MiniMind file -> MB of synthetic data written for the recipe section
    recipe_steps: dict  # training stage -> --max_steps in the recipe section
    recipe_log_interval: int


FULL = Shapes(
    presets={"small": "small", "base": "base"}, batch=32, seq=512, steps=20, warmup=3, pretrain_file_mb=4,
    sft_batch=16, sft_seq=512, sft_file_mb=3, sft_steps=5, sft_rounds=2,
    dpo_batch=16, dpo_seq=1024, dpo_steps=5,
    # the recipe's GRPO batch (8 prompts x G = 8); completions of 256 tokens, not its 512 limit, to fit the budget
    grpo_prompts=8, grpo_generations=8, grpo_new_tokens=256, grpo_sequential_rows=2,
    distill_batch=16, distill_seq=1024, distill_steps=5, teacher="base",
    decode_prompt=16, decode_new_tokens=128, decode_batches=(1, 64),
    moe_batch=32, moe_seq=512, moe_steps=10,
    # over 8 MB, so the chat files are tokenized in parallel as MiniMind's are (model/data/chat.py)
    recipe_file_mb={"pretrain_hq.jsonl": 24, "sft_mini_512.jsonl": 16, "dpo.jsonl": 10, "r1_mix_1024.jsonl": 9},
    recipe_steps={"pretrain": 200, "sft": 100, "dpo": 100, "reason": 100, "grpo": 3, "teacher_pretrain": 100,
                  "teacher_sft": 50, "distill": 100, "lora": 50},
    recipe_log_interval=10,
)

TINY = Shapes(
    presets={"small": "nano", "base": "nano"}, batch=2, seq=64, steps=2, warmup=1, pretrain_file_mb=0.1,
    sft_batch=2, sft_seq=128, sft_file_mb=0.05, sft_steps=1, sft_rounds=1,
    dpo_batch=2, dpo_seq=64, dpo_steps=2,
    grpo_prompts=2, grpo_generations=2, grpo_new_tokens=4, grpo_sequential_rows=1,
    distill_batch=2, distill_seq=64, distill_steps=2, teacher="nano",
    decode_prompt=8, decode_new_tokens=4, decode_batches=(1, 2),
    moe_batch=2, moe_seq=64, moe_steps=1,
    recipe_file_mb={"pretrain_hq.jsonl": 0.3, "sft_mini_512.jsonl": 0.2, "dpo.jsonl": 0.1, "r1_mix_1024.jsonl": 0.1},
    recipe_steps={"pretrain": 2, "sft": 2, "dpo": 2, "reason": 2, "grpo": 2, "teacher_pretrain": 2, "teacher_sft": 2,
                  "distill": 2, "lora": 2},
    recipe_log_interval=1,
)


# ============================================================================================ synthetic data


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def demo_rows(name: str) -> list[dict]:
    return read_jsonl(os.path.join(ROOT, "dataset", f"demo_{name}.jsonl"))


def write_rows_until(path: str, make_row, megabytes: float) -> float:
    """Append rows from make_row() until the file holds `megabytes`; returns its size in MB."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        while out.tell() < megabytes * 1e6:
            out.write(json.dumps(make_row(), ensure_ascii=False) + "\n")
    return os.path.getsize(path) / 1e6


def pretrain_row_maker(rng):
    """pretrain_hq.jsonl's shape: one `<|im_start|>...<|im_end|>` passage of under 512 characters per line. Each
    passage strings together random lines of the demo corpus: repeating whole demo documents instead would make
    the cleaning stage's deduplication drop most of the file. Lengths: a log-normal with a median of 280
    characters, an assumption about that file, not a measurement of it."""
    lines = [line.strip() for row in demo_rows("pretrain") for line in row["text"].split("\n") if line.strip()]

    def make():
        target = int(np.clip(rng.lognormal(math.log(280), 0.5), 40, 510))
        text = ""
        while len(text) < target:
            text += lines[rng.integers(len(lines))] + "\n"
        return {"text": f"<|im_start|>{text[:target].strip()}<|im_end|>"}
    return make


def sft_row_maker(rng):
    """sft_mini_512.jsonl's shape: chats of one to three exchanges, each taken from a random demo chat, so that a
    chat is a few hundred tokens as MiniMind's are, not the demo's 62."""
    chats = [[m for m in row["conversations"] if m["role"] != "system"] for row in demo_rows("sft")]
    chats = [c for c in chats if len(c) >= 2 and c[0]["role"] == "user"]

    def make():
        messages = []
        for _ in range(int(rng.integers(1, 4))):
            chat = chats[rng.integers(len(chats))]
            messages += chat[:len(chat) // 2 * 2]  # whole exchanges: user, assistant
        return {"conversations": messages}
    return make


def write_minimind_files(data_dir: str, megabytes: dict, seed: int = 0) -> dict:
    """Synthetic stand-ins for MiniMind's five files (its names and formats, no _val.jsonl twins), of the given
    sizes; lora_identity.jsonl is the demo identity set as is. Returns each file's size in MB."""
    rng = np.random.default_rng(seed)
    makers = {"pretrain_hq.jsonl": pretrain_row_maker(rng), "sft_mini_512.jsonl": sft_row_maker(rng)}
    for name, demo in (("dpo.jsonl", "dpo"), ("r1_mix_1024.jsonl", "reason")):
        rows = demo_rows(demo)
        makers[name] = lambda rows=rows: rows[rng.integers(len(rows))]
    sizes = {name: write_rows_until(os.path.join(data_dir, name), makers[name], megabytes[name]) for name in makers}
    shutil.copyfile(os.path.join(ROOT, "dataset", "demo_lora_identity.jsonl"),
                    os.path.join(data_dir, "lora_identity.jsonl"))
    sizes["lora_identity.jsonl"] = os.path.getsize(os.path.join(data_dir, "lora_identity.jsonl")) / 1e6
    return sizes


# ================================================================================================ the runner


class SectionTimeout(BaseException):
    """Raised by SIGALRM at a section's deadline. Not an Exception, so no `except Exception` on the way swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def stop(signum, frame):
        raise SectionTimeout()
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def child_processes() -> dict:
    """This process's children, pid -> command line (Linux /proc; empty elsewhere)."""
    children = {}
    if not os.path.isdir("/proc"):
        return children
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent == os.getpid():
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    children[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue  # it ended while we looked
    return children


def stop_new_children(before: dict):
    """A section stopped mid-way can leave a child running (MiniMind's trainer is read line by line): end the
    children it started, by pid. torch.compile's worker pool is kept: it serves every later compile."""
    for pid, command in child_processes().items():
        if pid not in before and "_inductor" not in command:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


def plain(value):
    """JSON-ready: dtypes as names, numpy numbers as Python ones, NaN and infinity as null."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(plain(report), f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def free_memory(device: torch.device):
    torch._dynamo.reset()  # a compile stopped half-way must not leave its state to the next section
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_sections(ctx, sections: dict, names: list[str], report: dict, output: str, budget_scale: float = 1.0):
    """Run each named section (sections: name -> (function(ctx, results), budget in seconds)) until its deadline;
    record status, seconds and what it measured (or its error) in report["sections"], rewriting `output` each time."""
    start = time.perf_counter()
    deadline = 0.0
    for name in names:
        function, budget = sections[name]
        deadline += budget * budget_scale
        allowed = deadline - (time.perf_counter() - start)
        entry = report["sections"][name] = {"status": "skipped", "budget_s": round(allowed, 1), "results": {}}
        if allowed < 1:
            entry["error"] = "no time left: earlier sections used this one's budget"
            print(f"[gpu bench {time.perf_counter() - start:5.0f}s] {name}: skipped (no time left)", flush=True)
            write_report(report, output)
            continue
        print(f"[gpu bench {time.perf_counter() - start:5.0f}s] {name}: start, {allowed:.0f}s allowed", flush=True)
        section_start, children = time.perf_counter(), child_processes()
        try:
            with time_limit(allowed):
                function(ctx, entry["results"])
            entry["status"] = "ok"
        except SectionTimeout:
            entry["status"] = "timeout"
            entry["error"] = f"stopped at its deadline, after {allowed:.0f} s; results so far kept"
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # SystemExit too: bench_train's MiniMind run exits on failure
            entry["status"] = "error"
            entry["error"] = f"{type(error).__name__}: {error}"[-2000:]
            entry["traceback"] = traceback.format_exc()[-3000:]
        finally:
            stop_new_children(children)
            with contextlib.suppress(Exception):
                free_memory(ctx.device)
        entry["seconds"] = round(time.perf_counter() - section_start, 1)
        report["total_seconds"] = round(time.perf_counter() - start, 1)
        write_report(report, output)
        summary = entry["results"].get("summary") or entry.get("error", "")
        print(f"[gpu bench {time.perf_counter() - start:5.0f}s] {name}: {entry['status']} in {entry['seconds']:.0f}s"
              f" | {summary}", flush=True)


# ================================================================================================ the context


class Context:
    """What the sections share: device, shapes, the shipped tokenizer, a scratch folder and the report so far."""

    def __init__(self, args, report: dict):
        from transformers import AutoTokenizer
        self.args, self.report, self.tiny = args, report, args.tiny
        self.device = torch.device(args.device or default_device())
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but torch sees no CUDA device (a CPU build of torch?)")
        self.shapes = TINY if args.tiny else FULL
        bf16 = self.device.type != "cuda" or torch.cuda.is_bf16_supported()
        self.dtype_name = "bfloat16" if bf16 else "float16"
        self.dtype = getattr(torch, self.dtype_name)
        self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "model"))
        self.work = tempfile.mkdtemp(prefix="tinymind_gpu_bench_")
        self.matmul_peak = None  # FLOP/s measured by the machine section
        self._pretrain = None

    def close(self):
        shutil.rmtree(self.work, ignore_errors=True)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def pretrain_data(self):
        """(texts, PretrainDataset) of synthetic pretrain_hq-shaped documents, written and tokenized once."""
        if self._pretrain is None:
            from model.data.pretrain import PretrainDataset
            path = os.path.join(self.work, "pretrain", "pretrain_hq.jsonl")
            rng = np.random.default_rng(0)
            write_rows_until(path, pretrain_row_maker(rng), self.shapes.pretrain_file_mb)
            dataset = PretrainDataset(path, self.tokenizer, self.shapes.seq, show_progress=False)
            self._pretrain = [row["text"] for row in read_jsonl(path)], dataset
        return self._pretrain

    def config(self, preset: str, **overrides) -> TinyMindConfig:
        return TinyMindConfig(**{**PRESETS[preset], "vocab_size": len(self.tokenizer), **overrides})

    def train_mode(self, mode: str, config: TinyMindConfig) -> dict:
        """One bench_train mode at the pretraining shape, with this run's peak memory and MFU against the spec
        sheet (run_mode's `mfu`) and against the matmul rate measured here."""
        S = self.shapes
        _, dataset = self.pretrain_data()
        shape = argparse.Namespace(batch_size=S.batch, seq_len=S.seq, steps=S.steps, warmup=S.warmup)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        result = bench_train.run_mode(mode, config, dataset, shape, self.device, self.dtype)
        if self.matmul_peak:
            result["of_measured_matmul"] = result["flops_per_s"] / self.matmul_peak
        result["useful_flops_share"] = 1 - result["pad_fraction"]
        if bench_train.MODES[mode][2]:
            torch._dynamo.reset()  # drop the compiled graphs: the next model is another shape
        return plain(result)


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# ================================================================================================ sections


def section_machine(ctx: Context, out: dict):
    out.update(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               device=str(ctx.device), cpu=cpu_model_name(), cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads(), git_commit=git_commit(), tiny=ctx.tiny, dtype=ctx.dtype_name)
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        out.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gb=props.total_memory / 1e9, multiprocessors=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version(), driver=nvidia_driver(),
                   peak_flops_spec=device_peak_flops(ctx.device))
    out["matmul_tflops_measured"] = measured_matmul_tflops(ctx)
    ctx.matmul_peak = out["matmul_tflops_measured"] * 1e12
    out["flash_sdpa"] = flash_sdpa_check(ctx)
    out["summary"] = (f"{out.get('gpu', out['cpu'])}, torch {out['torch']}, CUDA {out['cuda']}, "
                      f"bf16 matmul {flops_text(ctx.matmul_peak)}, flash SDPA {out['flash_sdpa']}")


def flops_text(flops: float) -> str:
    return f"{flops / 1e12:.0f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.0f} GFLOP/s"


def git_commit() -> str | None:
    with contextlib.suppress(Exception):  # the device machine's copy of the tree may have no .git
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() or None
    return None


def nvidia_driver() -> str | None:
    with contextlib.suppress(Exception):
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip().splitlines()[0]
    return None


@torch.no_grad()
def measured_matmul_tflops(ctx: Context) -> float:
    """The bf16 matmul rate of this device: the ceiling MFU is also given against (the spec sheet's peak is not
    reached by any real kernel). 8192^3 on a GPU, as KINDS.md measured it; on a CPU the model's own shape."""
    if ctx.device.type != "cuda":
        S = ctx.shapes
        config = ctx.config(S.presets["small"])
        shape = (S.batch * S.seq, config.hidden_size, config.intermediate_size)  # at least 512: toy shapes time calls
        return matmul_rate(tuple(max(d, 512) for d in shape), ctx.dtype, seconds=0.5) / 1e3
    n = 8192
    a = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize(ctx.device)
    return 2 * n ** 3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


@torch.no_grad()
def flash_sdpa_check(ctx: Context) -> str:
    """Whether SDPA's flash kernel runs at the small preset's attention shape (8 query heads over 2 KV heads, head
    dim 64, causal): what the packed pretraining step needs to use it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    T = ctx.shapes.seq
    q = torch.randn(2, 8, T, 64, device=ctx.device, dtype=ctx.dtype)
    k, v = (torch.randn(2, 2, T, 64, device=ctx.device, dtype=ctx.dtype) for _ in range(2))
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return "runs"
    except RuntimeError as error:
        return f"does not run: {str(error).splitlines()[0][:300]}"


SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "vocab_size")


def pretrain_section(label: str):
    def section(ctx: Context, out: dict):
        S = ctx.shapes
        config = ctx.config(S.presets[label])
        model = TinyMindForCausalLM(config)
        out.update(preset=S.presets[label], shape={k: getattr(config, k) for k in SHAPE_FIELDS},
                   params_m=model.num_params() / 1e6, batch=S.batch, seq_len=S.seq,
                   flops_per_token=model.flops_per_token(S.seq), steps=S.steps, warmup_steps=S.warmup)
        del model
        for mode in ("packed_bf16", "packed_bf16_compile"):  # eager first: a compile that overruns keeps it
            out[mode] = ctx.train_mode(mode, config)
            out["summary"] = ", ".join(f"{m} {out[m]['all_tok_s']:,.0f} tok/s, MFU {percent(out[m].get('mfu'))} "
                                       f"({percent(out[m].get('of_measured_matmul'))} of the measured matmul)"
                                       for m in ("packed_bf16", "packed_bf16_compile") if m in out)
    return section


def section_minimind(ctx: Context, out: dict):
    """Ours, our re-implementation of MiniMind's padded loop and, given a checkout, MiniMind's own trainer, all at one
    shape: MiniMind2-Small's (our `small`), or exactly MiniMind's own config at that size when its checkout is given
    (as bench_train does). The cheap runs go first: a MiniMind trainer that fails or hangs costs only its own row."""
    S = ctx.shapes
    preset = S.presets["small"]
    config = ctx.config(preset)
    path = ctx.args.minimind_path
    if path:
        config = ctx.config(preset, **bench_train.minimind_config(path, config.hidden_size, config.num_hidden_layers))
    out["shape"] = {k: getattr(config, k) for k in SHAPE_FIELDS}
    out["ours"] = ctx.train_mode("packed_bf16", config)
    small = ctx.report["sections"].get("pretrain_small", {}).get("results", {})
    if small.get("shape") == out["shape"] and "packed_bf16_compile" in small:
        out["ours_compiled"] = small["packed_bf16_compile"]  # the same shape, measured by pretrain_small
    mode = "minimind_bf16_padded" if ctx.device.type == "cuda" else "minimind_fp32_padded"
    out["minimind_style"] = ctx.train_mode(mode, config)
    out["minimind_style_source"] = (
        f"our re-implementation of MiniMind's pretraining loop ({mode}: one document per row, padded to seq_len, "
        "padding masked from the loss), not MiniMind's own code; its padding share follows the synthetic "
        "documents' lengths, an assumption about pretrain_hq.jsonl")
    if path:
        texts, _ = ctx.pretrain_data()
        workers = 8 if ctx.device.type == "cuda" else 0  # its default; it tokenizes in the DataLoader's workers
        shape = argparse.Namespace(batch_size=S.batch, seq_len=S.seq, steps=S.steps, warmup=S.warmup,
                                   minimind_workers=workers)
        try:
            result = bench_train.run_minimind(path, texts, config, shape, ctx.device)
            result["flops_per_s"] = TinyMindForCausalLM(config).flops_per_token(S.seq) * result["all_tok_s"]
            if device_peak_flops(ctx.device):
                result["mfu"] = result["flops_per_s"] / device_peak_flops(ctx.device)
            out["minimind_own"] = plain(result)
            out["minimind_own_source"] = f"MiniMind's own trainer/train_pretrain.py ({path}), same documents"
        except (Exception, SystemExit) as error:  # bench_train exits when MiniMind's trainer fails
            out["minimind_own_error"] = f"{type(error).__name__}: {error}"[-2000:]
    reference = out.get("minimind_own", out["minimind_style"])
    best = max(r["useful_tok_s"] for r in (out["ours"], out.get("ours_compiled", out["ours"])))
    out["ours_vs_minimind_useful_tokens"] = best / reference["useful_tok_s"]
    out["compared_with"] = "minimind_own" if "minimind_own" in out else "minimind_style"
    out["summary"] = (f"MiniMind ({out['compared_with']}) {reference['useful_tok_s']:,.0f} useful tok/s, ours "
                      f"{best:,.0f}: {out['ours_vs_minimind_useful_tokens']:.2f}x")
    if "minimind_own_error" in out:
        out["summary"] += f"; MiniMind's own trainer failed: {out['minimind_own_error'].splitlines()[-1][:200]}"


def section_sft(ctx: Context, out: dict):
    """bench_sft's three ways of batching the same chats, on sft_mini_512-shaped synthetic chats."""
    from model.data.chat import SFTDataset
    from model.data.packing import PackedDataset
    S = ctx.shapes
    runtime = init_runtime(str(ctx.device), ctx.dtype_name, seed=0)
    path = os.path.join(ctx.work, "sft", "sft_mini_512.jsonl")
    write_rows_until(path, sft_row_maker(np.random.default_rng(0)), S.sft_file_mb)
    dataset = SFTDataset(path, ctx.tokenizer, S.sft_seq, show_progress=False)
    torch.manual_seed(0)
    model = TinyMindForCausalLM(ctx.config(S.presets["small"])).to(ctx.device)
    per_row = len(dataset) / len(PackedDataset(dataset, S.sft_seq, seed=0))
    batch_sizes = {"packed": S.sft_batch, "pad_to_batch_max": max(1, round(S.sft_batch * per_row)),
                   "pad_to_max_seq_len": S.sft_batch}
    runners = {mode: bench_sft.Runner(copy.deepcopy(model), bench_sft.batches_for(mode, dataset, size, S.sft_seq, 0),
                                      runtime) for mode, size in batch_sizes.items()}
    out.update(preset=S.presets["small"], max_seq_len=S.sft_seq, chats=len(dataset),
               mean_chat_tokens=float(dataset.lengths().mean()), chats_per_packed_row=per_row,
               batch_sizes=batch_sizes, data="synthetic sft_mini_512-shaped chats (chained demo exchanges)")
    out.update(bench_sft.compare(runners, S.sft_steps, S.sft_rounds))
    for mode in ("pad_to_max_seq_len", "pad_to_batch_max"):
        out[f"packed_vs_{mode}"] = out["packed"]["tokens_per_sec"] / out[mode]["tokens_per_sec"]
    out["summary"] = (f"packed {out['packed']['tokens_per_sec']:,.0f} real tok/s, "
                      f"{out['packed_vs_pad_to_max_seq_len']:.2f}x padding to max_seq_len (MiniMind)")


def section_dpo(ctx: Context, out: dict):
    S = ctx.shapes
    out.update(preset=S.presets["small"], pairs_per_step=S.dpo_batch, seq_len=S.dpo_seq)
    for mode in ("live", "precomputed"):
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        worker_args = argparse.Namespace(device=str(ctx.device), dtype=ctx.dtype_name, threads=None,
                                         preset=S.presets["small"], mode=mode, batch_size=S.dpo_batch,
                                         seq_len=S.dpo_seq, steps=S.dpo_steps)
        out[mode] = bench_dpo.worker(worker_args)
    if ctx.device.type == "cpu":
        out["note"] = "CPU: peak memory is the process's max RSS so far, not this mode's alone"
    out["summary"] = f"live {out['live']['step_s']:.3f} s/step, precomputed {out['precomputed']['step_s']:.3f}"


def section_grpo(ctx: Context, out: dict):
    """bench_grpo's comparison: the same completions of exactly n tokens, in one batched KV-cached generate (what
    train_grpo.py does) and one at a time with the cache (timed on a few rows: tokens/s is per token)."""
    from transformers import GenerationConfig

    from model.data.prompts import PromptDataset
    from model.training.rollouts import generate_rollout
    S = ctx.shapes
    runtime = init_runtime(str(ctx.device), ctx.dtype_name, seed=0)
    torch.manual_seed(0)
    model = TinyMindForCausalLM(ctx.config(S.presets["small"])).to(ctx.device).eval()
    items = PromptDataset(os.path.join(ROOT, "dataset", "demo_grpo.jsonl"), ctx.tokenizer, 512).items
    items = items[:S.grpo_prompts]
    G, n = S.grpo_generations, S.grpo_new_tokens
    tok = ctx.tokenizer

    def config(tokens):
        return GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, temperature=1.0,
                                top_k=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    rows, k = len(items) * G, S.grpo_sequential_rows
    with torch.no_grad(), runtime.autocast():
        generate_rollout(model, tok, items, G, config(4), ctx.device)  # warm-up: allocator, kernels
        batched = bench_grpo.timed(lambda: generate_rollout(model, tok, items, G, config(n), ctx.device), 2)
        one_at_a_time = bench_grpo.timed(
            lambda: [generate_rollout(model, tok, [items[i // G]], 1, config(n), ctx.device) for i in range(k)], 1)
    out.update(preset=S.presets["small"], prompts=len(items), generations=G, new_tokens=n,
               batched_tokens_per_sec=rows * n / batched, sequential_tokens_per_sec=k * n / one_at_a_time,
               sequential_rows_timed=k)
    out["speedup_vs_sequential"] = out["batched_tokens_per_sec"] / out["sequential_tokens_per_sec"]
    out["summary"] = (f"batched {out['batched_tokens_per_sec']:,.0f} tok/s, one at a time "
                      f"{out['sequential_tokens_per_sec']:,.0f} ({out['speedup_vs_sequential']:.1f}x)")


def section_distill(ctx: Context, out: dict):
    """One optimizer step of train_distillation.py's loss at its defaults (alpha 0.5, T 1, forward KL; the
    teacher's forward without gradients) against a plain SFT step of the same padded batch: the teacher's cost."""
    from model.training.frozen import freeze
    from model.training.losses import distillation_loss, target_positions, weighted_ce, with_aux_loss
    S = ctx.shapes
    runtime = init_runtime(str(ctx.device), ctx.dtype_name, seed=0)
    torch.manual_seed(0)
    student = TinyMindForCausalLM(ctx.config(S.presets["small"])).to(ctx.device).train()
    teacher = freeze(TinyMindForCausalLM(ctx.config(S.teacher))).to(ctx.device)
    B, T = S.distill_batch, S.distill_seq
    ids = torch.randint(3, len(ctx.tokenizer), (B, T), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :T // 4] = -100  # the prompt: no target, as in chat batches
    batch = {"input_ids": ids.to(ctx.device), "attention_mask": torch.ones_like(ids).to(ctx.device),
             "labels": labels.to(ctx.device)}

    def sft_loss(model):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        logits, targets, _ = target_positions(out.logits, batch["labels"])
        return with_aux_loss(weighted_ce(logits, targets), out.aux_loss, {})[0]

    def distill_loss(model):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        logits, targets, valid = target_positions(out.logits, batch["labels"])
        with torch.no_grad():
            teacher_logits = teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][valid]
        loss = distillation_loss(logits, teacher_logits, targets, alpha=0.5, temperature=1.0, direction="forward")
        return with_aux_loss(loss, out.aux_loss, {})[0]

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=ctx.device.type in FUSED_ADAMW_DEVICES)
    out.update(student=S.presets["small"], teacher=S.teacher, batch=B, seq_len=T,
               student_params_m=student.num_params() / 1e6, teacher_params_m=teacher.num_params() / 1e6)
    for name, loss_fn in (("sft_step", sft_loss), ("distill_step", distill_loss)):
        for step in range(S.distill_steps + 1):  # the first step warms up
            if step == 1:
                ctx.sync()
                start = time.perf_counter()
            with runtime.autocast():
                loss = loss_fn(student)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        ctx.sync()
        seconds = (time.perf_counter() - start) / S.distill_steps
        out[name] = {"step_s": seconds, "tokens_per_sec": B * T / seconds}
    out["distill_vs_sft_step_time"] = out["distill_step"]["step_s"] / out["sft_step"]["step_s"]
    out["summary"] = (f"distill {out['distill_step']['tokens_per_sec']:,.0f} tok/s, "
                      f"{out['distill_vs_sft_step_time']:.2f}x an SFT step")


def section_decode(ctx: Context, out: dict):
    """bench_model's decode benchmark (greedy, KV cache, exactly n new tokens) per attention type."""
    S = ctx.shapes
    preset = PRESETS[S.presets["small"]]
    variants = {"MHA": dict(preset, num_key_value_heads=preset["num_attention_heads"]), "GQA": dict(preset),
                "MLA": dict(preset, use_mla=True)}
    out.update(preset=S.presets["small"], prompt_len=S.decode_prompt, new_tokens=S.decode_new_tokens)
    for name, settings in variants.items():
        config = TinyMindConfig(**settings)
        torch.manual_seed(0)
        model = TinyMindForCausalLM(config).to(ctx.device).eval()
        result = {"kv_bytes_per_token_per_layer": bench_model.kv_cache_bytes_per_token(config, ctx.device,
                                                                                      ctx.dtype)}
        for batch in S.decode_batches:
            result[f"batch_{batch}_tokens_per_sec"] = bench_model.bench_decode(
                model, ctx.device, ctx.dtype, S.decode_prompt, S.decode_new_tokens, use_cache=True, batch=batch)
        out[name] = result
    first = f"batch_{S.decode_batches[0]}_tokens_per_sec"
    out["summary"] = ", ".join(f"{name} {out[name][first]:,.0f} tok/s" for name in variants if name in out)


def section_moe(ctx: Context, out: dict):
    """bench_model's MoE comparison: the dense model's FFN is as wide as the MoE's active experts."""
    S = ctx.shapes
    preset = S.presets["small"]
    moe_config = TinyMindConfig(**PRESETS[preset], use_moe=True)
    active_width = (moe_config.num_experts_per_tok + moe_config.n_shared_experts) * moe_config.moe_intermediate_size
    configs = {"dense": TinyMindConfig(**PRESETS[preset], intermediate_size=active_width), "moe": moe_config}
    out.update(preset=preset, batch=S.moe_batch, seq_len=S.moe_seq)
    for name, config in configs.items():
        torch.manual_seed(0)
        model = TinyMindForCausalLM(config).to(ctx.device).train()
        tokens_per_sec = bench_model.bench_train(model, ctx.device, ctx.dtype, S.moe_batch, S.moe_seq, S.moe_steps, 2)
        out[name] = {"active_params_m": model.num_params(active=True) / 1e6, "params_m": model.num_params() / 1e6,
                     "tokens_per_sec": tokens_per_sec}
        del model
    out["moe_vs_dense_step_time"] = out["dense"]["tokens_per_sec"] / out["moe"]["tokens_per_sec"]
    out["summary"] = f"MoE step {out['moe_vs_dense_step_time']:.2f}x dense at equal active parameters"


# ---------------------------------------------------------------------------------------------- the recipe

DESCRIBE = re.compile(r"^[\w-]+: ([\d,]+) (samples|prompts), ([\d,]+) (?:steps/epoch|optimizer steps)")


def parse_describe(line: str) -> dict | None:
    """The Trainer's first line ("pretrain: 1,234 samples, 39 steps/epoch, 200 steps (...)", or GRPO's "grpo:
    2,080 prompts, 3 optimizer steps: ..."): the data's size at this run's batch."""
    match = DESCRIBE.search(line)
    if not match:
        return None
    count, kind, number = int(match.group(1).replace(",", "")), match.group(2), int(match.group(3).replace(",", ""))
    return {"samples": count, "steps_per_epoch": number} if kind == "samples" else {"prompts": count}


def steps_per_second_from_log(records: list[dict]) -> dict:
    """Seconds per optimizer step between the first and last logged steps (the first step's warm-up and the
    set-up before it left out), from the Trainer's JSONL log."""
    steps = sorted((r for r in records if "elapsed" in r and "step" in r and "tokens_per_sec" in r),
                   key=lambda r: r["step"])
    if not steps:
        return {}
    result = {"logged_steps": steps[-1]["step"]}
    if len(steps) >= 2 and steps[-1]["step"] > steps[0]["step"]:
        result["s_per_step"] = (steps[-1]["elapsed"] - steps[0]["elapsed"]) / (steps[-1]["step"] - steps[0]["step"])
    else:  # one log line: the warm-up is counted in
        result["s_per_step"] = steps[-1]["elapsed"] / steps[-1]["step"]
    later = steps[1:] or steps
    result["tokens_per_sec"] = float(np.mean([r["tokens_per_sec"] for r in later]))
    if all("mfu" in r for r in later):
        result["mfu"] = float(np.mean([r["mfu"] for r in later]))
    if all("peak_mem_gb" in r for r in later):
        result["peak_mem_gb"] = max(r["peak_mem_gb"] for r in later)
    return result


def full_recipe_steps(params: dict, data: dict, scale: float) -> float:
    """Optimizer steps of the stage on the full file: this run's steps per epoch (or rollouts per epoch, for GRPO)
    times the file's size ratio, times the recipe's epochs, capped by its --max_steps."""
    if "prompts" in data:  # GRPO: prompts_per_step prompts per rollout, num_iterations updates each
        per_step = params["batch_size"] * params["accumulation_steps"]
        per_epoch = data["prompts"] * scale // per_step * params.get("num_iterations", 1)
    else:
        per_epoch = data["steps_per_epoch"] * scale
    steps = per_epoch * params["epochs"]
    if params["max_steps"] and params["max_steps"] > 0:
        steps = min(steps, params["max_steps"]) if params["epochs"] > 0 else params["max_steps"]
    return float(steps)


def recipe_parameters(jobs: dict) -> dict:
    """Each training command's epochs, --max_steps and batch as its own script parses them (defaults included),
    asked in one subprocess: benchmarks import no stage script."""
    code = ("import importlib, json, sys\n"
            "jobs = json.loads(sys.argv[1])\n"
            "out = {}\n"
            "for key, (script, argv) in jobs.items():\n"
            "    args = importlib.import_module(script[:-3]).parse_args(argv)\n"
            "    out[key] = {k: getattr(args, k, None) for k in ('epochs', 'max_steps', 'batch_size',\n"
            "               'accumulation_steps', 'num_iterations', 'max_seq_len')}\n"
            "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"reading the stages' flags failed: {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_streaming(command: list[str], timeout: float, env: dict) -> dict:
    """Run a stage, noting when its Trainer's first line (the data's size, printed once the data is loaded and the
    model built) arrives: `setup_s` is the time before training, `wall_s` the whole run."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env)
    killer = threading.Timer(max(timeout, 1), process.kill)
    killer.start()
    result, tail = {"returncode": None}, []
    try:
        for line in process.stdout:
            tail = (tail + [line.rstrip()])[-25:]
            if "describe" not in result and parse_describe(line):
                result.update(describe=line.strip(), setup_s=time.perf_counter() - start)
        result["returncode"] = process.wait()
    finally:
        killer.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    result["wall_s"] = time.perf_counter() - start
    result["timed_out"] = result["wall_s"] >= timeout
    if result["returncode"] != 0:
        result["tail"] = "\n".join(tail)
    return result


def new_log_records(logs_dir: str, before: dict) -> list[dict]:
    records = []
    if os.path.isdir(logs_dir):
        for name in sorted(os.listdir(logs_dir)):
            path = os.path.join(logs_dir, name)
            if name.endswith(".jsonl") and before.get(path) != os.path.getmtime(path):
                records += read_jsonl(path)
    return records


def log_mtimes(logs_dir: str) -> dict:
    if not os.path.isdir(logs_dir):
        return {}
    return {os.path.join(logs_dir, n): os.path.getmtime(os.path.join(logs_dir, n)) for n in os.listdir(logs_dir)}


# the training stages in the order they are timed: the zero recipe (pretrain, sft) first, each after what it needs
RECIPE_ORDER = ["pretrain", "sft", "dpo", "reason", "grpo", "teacher_pretrain", "teacher_sft", "distill", "lora"]


def section_recipe(ctx: Context, out: dict):
    """`--recipe minimind_gpu`'s own commands on synthetic MiniMind-shaped files; see the module docstring."""
    from scripts import run_pipeline
    S = ctx.shapes
    section_start = time.perf_counter()
    allowed = ctx.report["sections"]["recipe"]["budget_s"]

    def left() -> float:
        return allowed - (time.perf_counter() - section_start) - 3  # 3 s to write up what was measured

    data_dir, save_dir = os.path.join(ctx.work, "minimind"), os.path.join(ctx.work, "out")
    start = time.perf_counter()
    sizes = write_minimind_files(data_dir, S.recipe_file_mb)
    out["synthetic_files_mb"] = sizes
    out["synthetic_write_s"] = time.perf_counter() - start
    out["full_files_mb"] = MINIMIND_FILE_MB
    # --quick's commands in the dry run (nano models, whose checkpoints the later stages find), the real ones else
    recipe = run_pipeline.build_recipe(save_dir, quick=ctx.tiny, recipe="minimind_gpu", data_dir=data_dir,
                                       resume=False)
    quick = run_pipeline.build_recipe(save_dir, quick=True, recipe="minimind_gpu", data_dir=data_dir, resume=False)
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    stages = out["stages"] = {}
    files = run_pipeline.MINIMIND_FILES
    pretrain_mb = sizes[files["pretrain"]]

    # Passes over the data: each scales with the file, so its time is scaled by the full file's size (for the
    # tokenizer the process's start-up too: an upper bound).
    for name, scale in (("clean", MINIMIND_FILE_MB[files["pretrain"]] / pretrain_mb),
                        ("tokenizer", (min(200, MINIMIND_FILE_MB[files["pretrain"]])
                                       + min(200, MINIMIND_FILE_MB[files["sft"]]))
                         / (min(200, pretrain_mb) + min(200, sizes[files["sft"]])))):
        command = recipe[name][0][0]
        if left() < 5:
            stages[name] = {"status": "not run: out of time"}
            continue
        run = run_streaming(command, left(), env)
        entry = stages[name] = {"command": " ".join(command), "wall_s": run["wall_s"], "returncode": run["returncode"],
                                "scale": scale, "projected_s": run["wall_s"] * scale}
        if run["returncode"] != 0:
            entry["error"] = run.get("tail", "timed out")
            raise RuntimeError(f"the {name} stage failed; the later stages need its output")
        print(f"    recipe {name}: {run['wall_s']:.0f}s", flush=True)
        if name == "clean":  # its report times the passes alone: the process's start-up is not scaled up
            cleaned = read_json(recipe["clean"][1] + ".report.json")
            entry.update(processing_s=cleaned["seconds"], docs_read=cleaned["docs_read"],
                         docs_kept=cleaned["docs_written"],
                         projected_s=run["wall_s"] - cleaned["seconds"] + cleaned["seconds"] * scale)

    # Tokenizing into the caches, timed per file in a fresh process as a stage would do it (the same classes, cache
    # paths and worker processes); the training stages below then open these caches.
    jobs = [[files["pretrain"], "pretrain", recipe["clean"][1], S.seq],
            [files["sft"], "sft", os.path.join(data_dir, files["sft"]), 512],
            [files["dpo"], "dpo", os.path.join(data_dir, files["dpo"]), 1024],
            [files["reason"], "sft", os.path.join(data_dir, files["reason"]), 1024]]
    worker = {"tokenizer": os.path.join(save_dir, "tokenizer"), "jobs": jobs}
    done = subprocess.run([sys.executable, "-m", "scripts.bench.gpu", "--tokenize_worker", json.dumps(worker)],
                          cwd=ROOT, capture_output=True, text=True, timeout=max(left(), 1), env=env)
    if done.returncode != 0:
        raise RuntimeError(f"tokenizing the synthetic files failed: {done.stderr[-1500:]}")
    out["tokenize"] = {name: {"seconds": seconds, "mb": sizes[name],
                              "projected_s": seconds * MINIMIND_FILE_MB[name] / sizes[name]}
                       for name, seconds in json.loads(done.stdout.strip().splitlines()[-1]).items()}

    # The training stages: the recipe's command plus a step limit, a log line every few steps, no mid-run
    # evaluation, saving or sample generation (their cost is not in the projection), and one subprocess asking
    # each script for its own epochs and step limit.
    commands, quick_commands = {}, {}
    for stage, (stage_commands, _) in recipe.items():
        for index, command in enumerate(stage_commands):
            key = f"teacher_{['pretrain', 'sft'][index]}" if stage == "teacher" else stage
            if key in RECIPE_ORDER:
                commands[key], quick_commands[key] = command, quick[stage][0][index]
    params = recipe_parameters({key: (command[1], command[2:]) for key, command in commands.items()})
    for key in RECIPE_ORDER:
        if key not in ctx.args.recipe_stages.split(","):
            stages[key] = {"status": "not run: not in --recipe_stages"}
            continue
        if left() < 10:
            stages[key] = {"status": "not run: out of time"}
            continue
        command = commands[key]
        extra = ["--max_steps", str(S.recipe_steps[key]), "--eval_interval", "0", "--eval_batches", "2",
                 "--save_interval", "1000000",
                 "--log_interval", "1" if key == "grpo" else str(S.recipe_log_interval)]
        if "--eval_prompts" in quick_commands[key]:  # the chat stages' before/after answers: skipped
            extra += ["--eval_prompts", "0"]
        if command[1] == "train_pretrain.py":
            extra += ["--sample_tokens", "0"]
        if command[1] == "train_grpo.py":
            extra += ["--eval_samples", "0", "--show_completions", "0"]
        logs_dir = os.path.join(save_dir, "logs")
        before = log_mtimes(logs_dir)
        run = run_streaming(command + extra, left(), env)
        entry = stages[key] = {"command": " ".join(command + extra), "returncode": run["returncode"],
                               "wall_s": run["wall_s"], "setup_s": run.get("setup_s"), "params": params[key]}
        entry.update(steps_per_second_from_log(new_log_records(logs_dir, before)))
        data = parse_describe(run.get("describe", ""))
        file = {"teacher_pretrain": files["pretrain"], "teacher_sft": files["sft"], "distill": files["sft"]}.get(
            key, files.get(key))
        if data and "s_per_step" in entry:
            # GRPO trains on our own arithmetic prompts at every size: nothing to scale
            scale = MINIMIND_FILE_MB[file] / sizes[file] if file else 1.0
            entry.update(data=data, scale=scale, full_steps=full_recipe_steps(params[key], data, scale))
            entry["projected_s"] = (entry["setup_s"] or 0) + entry["full_steps"] * entry["s_per_step"]
        if run["returncode"] != 0:
            entry["error"] = run.get("tail", "")[-2000:]
        print(f"    recipe {key}: exit {run['returncode']} after {run['wall_s']:.0f}s, "
              f"{entry.get('s_per_step', float('nan')):.3f} s/step, projected "
              f"{entry.get('projected_s', float('nan')) / 3600:.2f} h", flush=True)
    out.update(projection(out))
    out["summary"] = f"whole recipe projected at {out['projected_hours']:.2f} h"
    if "zero_recipe_minutes" in out:
        out["summary"] += f", the zero recipe (pretrain + SFT, one epoch each) at {out['zero_recipe_minutes']:.0f} min"
    if out["projected_missing_stages"]:
        out["summary"] += f"; not measured: {', '.join(out['projected_missing_stages'])}"
    if ctx.tiny:
        out["summary"] += " (tiny: the quick recipe's step limits, not a projection)"
    out["note"] = ("training stages: s/step measured over the logged steps after the first, times the full "
                   "recipe's steps (this run's steps per epoch x the full file's size / the synthetic file's x the "
                   "script's epochs, capped by its --max_steps), plus the measured set-up; mid-run evaluations, "
                   "checkpoints and the eval/report stages are not counted. clean and tokenizer: wall time scaled "
                   "by the data they read (an upper bound). tokenize: the caches built per file, scaled by size.")


def time_tokenization(spec: dict) -> dict:
    """Seconds to tokenize each file into its cache with the class its stage uses: spec {"tokenizer": dir, "jobs":
    [[name, kind (pretrain, sft or dpo), path, max_seq_len], ...]}."""
    from transformers import AutoTokenizer

    from model.data.chat import SFTDataset
    from model.data.preference import DPODataset
    from model.data.pretrain import PretrainDataset
    classes = {"pretrain": PretrainDataset, "sft": SFTDataset, "dpo": DPODataset}
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    seconds = {}
    for name, kind, path, max_seq_len in spec["jobs"]:
        start = time.perf_counter()
        classes[kind](path, tokenizer, max_seq_len, show_progress=False)
        seconds[name] = time.perf_counter() - start
    return seconds


def projection(out: dict) -> dict:
    """Hours for the whole recipe and for the zero recipe (pretrain and SFT, one epoch each), from what was
    measured; stages not measured are named."""
    stages, prep = out.get("stages", {}), out.get("tokenize", {})
    measured = {k: v["projected_s"] for k, v in stages.items() if v.get("projected_s") is not None}
    missing = [k for k in ["clean", "tokenizer", *RECIPE_ORDER] if k not in measured]
    total = sum(measured.values()) + sum(v["projected_s"] for v in prep.values())
    result = {"projected_hours": total / 3600, "projected_missing_stages": missing}
    sft, pretrain = stages.get("sft", {}), stages.get("pretrain", {})
    if "full_steps" in sft and "full_steps" in pretrain:
        epochs = max(sft["params"]["epochs"], 1)
        zero = (pretrain["projected_s"] + sft["setup_s"] + sft["full_steps"] / epochs * sft["s_per_step"]
                + sum(prep.get(name, {}).get("projected_s", 0) for name in ("pretrain_hq.jsonl", "sft_mini_512.jsonl")))
        result["zero_recipe_minutes"] = zero / 60
    return result


SECTIONS = {  # name: (function, budget in seconds); the budgets add up to 455 s, inside the 8 minutes with start-up
    "machine": (section_machine, 10),
    "pretrain_small": (pretrain_section("small"), 70),
    "pretrain_base": (pretrain_section("base"), 80),
    "minimind": (section_minimind, 40),
    "sft": (section_sft, 20),
    "dpo": (section_dpo, 15),
    "grpo": (section_grpo, 20),
    "distill": (section_distill, 15),
    "decode": (section_decode, 15),
    "moe": (section_moe, 15),
    "recipe": (section_recipe, 155),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None,
                        help="the JSON file (default: docs/bench_gpu.json; with --tiny out/bench_gpu_tiny.json, so "
                             "a dry run never overwrites measured figures)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: the best available)")
    parser.add_argument("--tiny", action="store_true", help="every section at toy shapes: the dry run")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list from {list(SECTIONS)}")
    parser.add_argument("--minimind_path", default=None,
                        help="a MiniMind checkout: the minimind section runs its own trainer at the same shape")
    parser.add_argument("--recipe_stages", default=",".join(RECIPE_ORDER),
                        help="the training stages the recipe section runs (each needs the ones before it that it "
                             "starts from: sft needs pretrain, grpo reason, distill teacher_sft and sft)")
    parser.add_argument("--budget_scale", type=float, default=1.0, help="multiply every section's time budget")
    parser.add_argument("--table", action="store_true", help="also print the markdown table at the end")
    parser.add_argument("--tokenize_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokenize_worker:  # the recipe section's tokenizing pass, in a process of its own
        print(json.dumps(time_tokenization(json.loads(args.tokenize_worker))))
        return None
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    names = [s for s in SECTIONS if s in names]  # their own order: machine's measured peak serves the later ones
    output = args.output or os.path.join(ROOT, "out/bench_gpu_tiny.json" if args.tiny else "docs/bench_gpu.json")
    report = {"what": "python -m scripts.bench.gpu (issue 22): see the module docstring for each section",
              "command": " ".join(["python -m scripts.bench.gpu", *(argv if argv is not None else sys.argv[1:])]),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "tiny": args.tiny, "sections": {}}
    ctx = Context(args, report)
    report["device"] = str(ctx.device)
    print(f"gpu bench: sections {','.join(names)} on {ctx.device}{' (tiny shapes)' if args.tiny else ''} -> {output}",
          flush=True)
    try:
        run_sections(ctx, SECTIONS, names, report, output, args.budget_scale)
    finally:
        ctx.close()
    failed = [n for n in names if report["sections"][n]["status"] != "ok"]
    print(f"gpu bench: done in {report.get('total_seconds', 0):.0f}s; "
          f"{len(names) - len(failed)} of {len(names)} sections ok{'; not ok: ' + ', '.join(failed) if failed else ''}"
          f"; written to {output}", flush=True)
    if args.table:
        from scripts.bench.gpu_to_table import to_markdown
        print(to_markdown(plain(report)))
    return report


if __name__ == "__main__":
    main()
