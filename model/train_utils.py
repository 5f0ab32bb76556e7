"""What every training stage shares: runtime setup (devices, dtypes, DDP), checkpoints, the LR schedule, logging,
and `Trainer`, the optimisation loop. A stage script builds its data and model, writes its loss, and calls
`Trainer.fit`; everything below is the same for pretraining, SFT, LoRA, DPO and distillation.

Distributed runs use torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE): NCCL on CUDA, gloo on CPU. Only rank 0
prints, logs and writes files. DeepSpeed ZeRO is optional (`--deepspeed ds_config.json`).
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from .config import PRESETS, TinyMindConfig

# ======================================================================================================== runtime


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        """bf16/fp16 autocast keeps fp32 master weights; fp32 runs plain."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """bf16 autocast is only faster than fp32 on CPUs with bf16 dot-product instructions (AVX512-BF16 or AMX);
    elsewhere it is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device_type: str) -> str:
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device_type == "cpu":
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    return "float32"  # MPS: bf16 autocast coverage is patchy


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def init_runtime(device: str | None = None, dtype: str | None = None, seed: int = 42,
                 num_threads: int | None = None) -> Runtime:
    """Pick device and dtype (fastest correct choice when not given), join the process group under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device (try --device cpu)")
    device_type = device.split(":")[0]
    if device_type == "cuda" and world_size > 1:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if device_type == "cpu":
        # torchrun sets OMP_NUM_THREADS=1 for multi-process runs; share the cores between local ranks instead.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    dtype_name = dtype or default_dtype(device_type)
    if dtype_name not in DTYPES:
        raise SystemExit(f"--dtype {dtype_name!r}: choose one of float32, bfloat16, float16")
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for the fp32 parts: free speed on Ampere+
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(seed + rank)
    return Runtime(torch.device(device), DTYPES[dtype_name], rank, local_rank, world_size)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce_mean(value: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= runtime.world_size
    return value


def barrier(runtime: Runtime):
    if runtime.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_rank_first(runtime: Runtime):
    """Rank 0 runs the block first (tokenizing data into a cache), the other ranks after it (opening that cache).
    If rank 0 fails inside, torchrun stops the waiting ranks."""
    if not runtime.is_main:
        barrier(runtime)
    yield
    if runtime.is_main:
        barrier(runtime)


def cleanup(runtime: Runtime):
    """Leave the process group. The barrier and short sleep first let gloo's worker threads finish freeing the tensors
    of the last collectives (they need the GIL for it): destroying the group, or freeing the DDP wrapper that owns it,
    while one of them is still at it deadlocks in ProcessGroupGloo's destructor (seen in 1 CPU run in 3 under load)."""
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        time.sleep(0.5)  # GIL released while sleeping: the worker threads go idle
        dist.destroy_process_group()


# ============================================================================================== arguments & model


def add_common_args(parser: argparse.ArgumentParser, stage: str, **defaults):
    """Flags every stage takes (MiniMind's names where it has one). `defaults` sets stage-specific defaults."""
    g = parser.add_argument_group("output")
    g.add_argument("--save_dir", default="out", help="directory for weights, resume checkpoints and logs")
    g.add_argument("--save_weight", default=stage,
                   help="name prefix of the saved weights: <save_dir>/<name>_<hidden>.pth")
    g = parser.add_argument_group("model (default: the checkpoint's own config, or --preset)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="named size for a new model: nano (tests), tiny (CPU demo), small (26M), base (104M)")
    g.add_argument("--hidden_size", type=int, default=None, help="model width")
    g.add_argument("--num_hidden_layers", type=int, default=None, help="number of transformer blocks")
    g.add_argument("--num_attention_heads", type=int, default=None, help="query heads")
    g.add_argument("--num_key_value_heads", type=int, default=None, help="key/value heads (GQA)")
    g.add_argument("--use_moe", type=int, default=None, choices=[0, 1], help="1: DeepSeekMoE feed-forward layers")
    g.add_argument("--use_mla", type=int, default=None, choices=[0, 1], help="1: multi-head latent attention")
    g.add_argument("--moe_balance", default=None, choices=["aux_free", "aux_loss", "none"],
                   help="MoE load balancing: bias-based aux-loss-free (DeepSeek-V3), classic aux loss, or none")
    g.add_argument("--num_experts", type=int, default=None, help="routed experts per MoE layer")
    g.add_argument("--num_experts_per_tok", type=int, default=None, help="experts each token is routed to (top-k)")
    g.add_argument("--bias_update_speed", type=float, default=None, help="aux-free bias step gamma per update")
    g.add_argument("--aux_loss_alpha", type=float, default=None, help="coefficient of the classic MoE aux loss")
    g.add_argument("--dropout", type=float, default=None, help="residual/embedding dropout")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=defaults.get("epochs", 1), help="passes over the training data")
    g.add_argument("--max_steps", type=int, default=defaults.get("max_steps", -1),
                   help="stop after this many optimizer steps (-1: run all epochs)")
    g.add_argument("--batch_size", type=int, default=defaults.get("batch_size", 16),
                   help="sequences per micro-batch per rank")
    g.add_argument("--accumulation_steps", type=int, default=defaults.get("accumulation_steps", 1),
                   help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=defaults.get("learning_rate", 5e-4),
                   help="peak learning rate")
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine schedule floor, as a fraction of the peak")
    g.add_argument("--warmup_steps", type=int, default=defaults.get("warmup_steps", 0),
                   help="linear warmup steps (0 with --warmup_ratio unset: 1%% of the steps)")
    g.add_argument("--weight_decay", type=float, default=defaults.get("weight_decay", 0.1),
                   help="AdamW weight decay on weight matrices (not on norms or embeddings)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")
    g.add_argument("--max_seq_len", type=int, default=defaults.get("max_seq_len", 512), help="tokens per sequence")
    g.add_argument("--seed", type=int, default=42, help="seed for init, data order and dropout")
    g.add_argument("--num_workers", type=int, default=defaults.get("num_workers", 0),
                   help="DataLoader worker processes")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="autocast dtype (default: bfloat16 on GPUs and bf16-capable CPUs, float16 on old GPUs, "
                        "else float32)")
    g.add_argument("--num_threads", type=int, default=None,
                   help="CPU threads per process (default: cores / local ranks)")
    g.add_argument("--use_compile", type=int, default=0, choices=[0, 1], help="1: torch.compile the model")
    g.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON (ZeRO-1/2), e.g. ds_config.json")
    g = parser.add_argument_group("checkpoints, evaluation and logging")
    g.add_argument("--from_weight", default=defaults.get("from_weight", "none"),
                   help="start from these weights: a stage name resolved in --save_dir (e.g. pretrain) or a .pth path; "
                        "'none' starts from random init")
    g.add_argument("--from_resume", type=int, default=0, choices=[0, 1],
                   help="1: continue from <save_dir>/<save_weight>_<hidden>_resume.pth if present")
    g.add_argument("--save_interval", type=int, default=defaults.get("save_interval", 200),
                   help="write weights + resume checkpoint every N optimizer steps")
    g.add_argument("--log_interval", type=int, default=defaults.get("log_interval", 10), help="log every N steps")
    g.add_argument("--eval_interval", type=int, default=defaults.get("eval_interval", 100),
                   help="held-out evaluation every N steps (0: only at the end)")
    g.add_argument("--eval_batches", type=int, default=defaults.get("eval_batches", 20),
                   help="batches per held-out evaluation")
    g.add_argument("--use_wandb", type=int, default=0, choices=[0, 1],
                   help="1: log to Weights & Biases (offline when WANDB_API_KEY is not set)")
    g.add_argument("--wandb_project", default="TinyMind", help="wandb project name")
    return parser


MODEL_FLAGS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "use_moe", "use_mla",
               "moe_balance", "num_experts", "num_experts_per_tok", "bias_update_speed", "aux_loss_alpha", "dropout"]
ARCHITECTURE_FLAGS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "use_moe",
                      "use_mla", "num_experts", "num_experts_per_tok"]


def config_from_args(args, base: TinyMindConfig | None = None, vocab_size: int | None = None,
                     default_preset: str = "small") -> TinyMindConfig:
    """A checkpoint's config wins; flags may only restate it (or set training-time knobs like dropout). A flag
    that contradicts the checkpoint's architecture is an error rather than a silently mis-shaped model."""
    given = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k, None) is not None}
    if base is not None:
        clashes = {k: (v, getattr(base, k)) for k, v in given.items()
                   if k in ARCHITECTURE_FLAGS and getattr(base, k) != type(getattr(base, k))(v)}
        if clashes:
            detail = ", ".join(f"--{k} {v} but the checkpoint has {c}" for k, (v, c) in clashes.items())
            raise SystemExit(f"model flags contradict the checkpoint's config: {detail}. Drop these flags "
                             "(the checkpoint's config is used) or pick another --from_weight.")
        settings = base.to_dict()
        settings.update({k: v for k, v in given.items() if k not in ARCHITECTURE_FLAGS})
        for key in ("model_type", "transformers_version", "architectures"):
            settings.pop(key, None)
        return TinyMindConfig(**settings)
    settings = dict(PRESETS[args.preset or default_preset])
    settings.update({k: bool(v) if k in ("use_moe", "use_mla") else v for k, v in given.items()})
    if vocab_size is not None:
        settings["vocab_size"] = vocab_size
    return TinyMindConfig(**settings)


def tokenizer_digest(tokenizer_path: str) -> str | None:
    path = os.path.join(tokenizer_path, "tokenizer.json")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:16]


def check_same_tokenizer(config: TinyMindConfig | None, tokenizer_path: str | None, source: str):
    """Refuse weights trained with another tokenizer than `tokenizer_path`: both may have 6,400 tokens, but the
    ids would mean other things, and nothing else would notice. Weights saved before this record pass."""
    trained_with = getattr(config, "tokenizer_digest", None) if config is not None else None
    digest = tokenizer_digest(tokenizer_path) if tokenizer_path else None
    if trained_with and digest and trained_with != digest:
        raise SystemExit(f"{source} was trained with the tokenizer in {config.tokenizer_path}/, not the one in "
                         f"{tokenizer_path}/ (pass --tokenizer_path {config.tokenizer_path})")


def record_tokenizer(config: TinyMindConfig, tokenizer_path: str | None, base: TinyMindConfig | None, source: str):
    """Write which tokenizer the weights are trained with into their config (chat, serving and export then default
    to it), after checking that the weights they start from were trained with the same one."""
    if not tokenizer_path:
        return
    check_same_tokenizer(base, tokenizer_path, source)
    config.tokenizer_path, config.tokenizer_digest = tokenizer_path, tokenizer_digest(tokenizer_path)


SHIPPED_TOKENIZER = os.path.dirname(os.path.abspath(__file__))  # model/


def trained_tokenizer_path(config: TinyMindConfig) -> str:
    """The tokenizer directory the weights were trained with, as record_tokenizer wrote it, else the shipped one
    (weights saved before the record, or a recorded directory that is not there from here)."""
    recorded = getattr(config, "tokenizer_path", None)
    return recorded if recorded and os.path.isdir(recorded) else SHIPPED_TOKENIZER


def weight_path(save_dir: str, name: str, config: TinyMindConfig) -> str:
    """MiniMind's naming: <save_dir>/<stage>_<hidden>[_moe].pth (plus _mla for latent attention)."""
    suffix = ("_moe" if config.use_moe else "") + ("_mla" if config.use_mla else "")
    return os.path.join(save_dir, f"{name}_{config.hidden_size}{suffix}.pth")


def resolve_weight(name_or_path: str, save_dir: str, hidden_size: int | None = None) -> str:
    """A .pth path as given, or a stage name looked up in save_dir (out/pretrain_512.pth ...). When the hidden size
    is not given and exactly one file of that stage exists, use it, so `--from_weight pretrain` just works."""
    if name_or_path.endswith(".pth") or os.sep in name_or_path:
        if not os.path.exists(name_or_path):
            raise SystemExit(f"weights not found: {name_or_path}")
        return name_or_path
    import glob
    pattern = f"{name_or_path}_{hidden_size}*.pth" if hidden_size else f"{name_or_path}_*.pth"
    found = sorted(p for p in glob.glob(os.path.join(save_dir, pattern))
                   if not p.endswith("_resume.pth") and "_resume" not in os.path.basename(p))
    exact = [p for p in found if os.path.basename(p)[len(name_or_path) + 1:].split("_")[0].split(".")[0].isdigit()]
    if len(exact) == 1:
        return exact[0]
    if not exact:
        raise SystemExit(f"no '{name_or_path}' weights in {save_dir}/ (looked for {pattern}); run the stage that "
                         f"produces them first, or pass --from_weight PATH.pth")
    raise SystemExit(f"several '{name_or_path}' weights in {save_dir}/: {', '.join(exact)}; "
                     "pass --hidden_size (and --use_moe/--use_mla) or a path to choose")


def config_path_for(weight_file: str) -> str:
    return weight_file[:-len(".pth")] + ".json"


def atomic_torch_save(obj, path: str):
    """Write to a temp file in the same directory, fsync, then rename: a crash leaves the old file intact."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def unwrap(model):
    """The plain TinyMind module under DDP / torch.compile / DeepSpeed wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_weights(model, path: str):
    """fp32 state dict (MiniMind-style plain .pth) with the model config as JSON beside it."""
    model = unwrap(model)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
             for k, v in model.state_dict().items() if not k.endswith("expert_load")}
    atomic_torch_save(state, path)
    atomic_write_text(model.config.to_json_string(), config_path_for(path))


def load_weights(path: str) -> tuple[dict, TinyMindConfig | None]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a resume checkpoint also works as a weight file
    cfg_file = config_path_for(path)
    config = TinyMindConfig.from_json_file(cfg_file) if os.path.exists(cfg_file) else None
    return state, config


def load_state_into(model, state: dict, source: str):
    """Strict load with an error that says which checkpoint does not fit and how."""
    model_keys = {k for k in model.state_dict() if not k.endswith("expert_load")}
    missing, unexpected = model_keys - set(state), set(state) - model_keys
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in model.state_dict().items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not fit this model config:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {sorted(missing)[:5]}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {sorted(unexpected)[:5]}")
        lines += [f"  shape {m}" for m in mismatched[:5]]
        raise SystemExit("\n".join(lines))
    model.load_state_dict(state, strict=False)


def build_model(args, stage_default_from: str = "none", vocab_size: int | None = None, default_preset: str = "small"):
    """New model from flags, or the --from_weight checkpoint with its own config. Returns (model, source path)."""
    from .model import TinyMindForCausalLM, describe
    source = None
    base_config, state = None, None
    if args.from_weight and args.from_weight != "none":
        source = resolve_weight(args.from_weight, args.save_dir, args.hidden_size)
        state, base_config = load_weights(source)
    config = config_from_args(args, base_config, vocab_size, default_preset)
    record_tokenizer(config, getattr(args, "tokenizer_path", None), base_config, source)
    model = TinyMindForCausalLM(config)
    if state is not None:
        load_state_into(model, state, source)
    print0(f"{describe(model)}" + (f"; weights from {source}" if source else "; random init"))
    return model, source


# ============================================================================================= schedule & data


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio * peak at the last step."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class ResumableSampler(Sampler):
    """Shuffled order fixed by (seed, epoch), split across ranks, able to start mid-epoch: resuming at sample k
    sees exactly the samples an uninterrupted run would have seen next. Drops the tail that does not split
    evenly across ranks (every rank must run the same number of steps, or DDP hangs)."""

    def __init__(self, num_samples: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, start: int = 0):
        self.num_samples, self.seed, self.epoch = num_samples, seed, epoch
        self.rank, self.world_size, self.shuffle, self.start = rank, world_size, shuffle, start

    def indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank = self.num_samples // self.world_size
        return order[self.rank:per_rank * self.world_size:self.world_size][self.start:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self):
        return max(0, self.num_samples // self.world_size - self.start)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


GPU_PEAK_FLOPS = {  # dense bf16 tensor-core peaks, for MFU
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
    "4090": 165e12, "3090": 71e12, "A10": 125e12, "V100": 125e12, "T4": 65e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# ================================================================================================ logging


class MetricsLog:
    """One JSON object per log step in <save_dir>/logs/<name>.jsonl (rank 0), mirrored to wandb when enabled."""

    def __init__(self, runtime: Runtime, save_dir: str, name: str, use_wandb: bool = False, project: str = "TinyMind",
                 config: dict | None = None, wandb_id: str | None = None, append: bool = False):
        self.runtime = runtime
        self.path = os.path.join(save_dir, "logs", f"{name}.jsonl")
        self.wandb = None
        self.wandb_id = wandb_id
        if not runtime.is_main:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if not append and os.path.exists(self.path):
            os.replace(self.path, self.path + ".prev")  # a fresh run starts a fresh curve; keep the last one
        if use_wandb:
            import wandb
            if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"
            self.wandb = wandb.init(project=project, name=name, config=config, id=wandb_id,
                                    resume="allow" if wandb_id else None, dir=save_dir)
            self.wandb_id = self.wandb.id

    def log(self, metrics: dict):
        if not self.runtime.is_main:
            return
        record = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


def write_summary(save_dir: str, name: str, summary: dict, runtime: Runtime | None = None, merge: bool = False):
    """A stage's headline numbers (held-out metrics before/after, wall time, paths) as
    <save_dir>/summaries/<name>.json, for scripts/report.py and the pipeline. `merge` adds to what the Trainer
    already wrote for this run instead of replacing it."""
    if runtime is not None and not runtime.is_main:
        return
    path = os.path.join(save_dir, "summaries", f"{name}.json")
    clean = {}
    if merge and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            clean = json.load(f)
    clean.update({k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in summary.items()})
    atomic_write_text(json.dumps(clean, indent=2, ensure_ascii=False, default=str), path)


def before_after(before: dict, after: dict) -> dict:
    """{metric}_before / {metric}_after for every number both dicts hold: the summary keys scripts/report.py pairs."""
    paired = {}
    for key, value in after.items():
        if isinstance(value, (int, float)) and isinstance(before.get(key), (int, float)):
            paired[f"{key}_before"], paired[f"{key}_after"] = before[key], value
    return paired


# ================================================================================================ the loop


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    samples_into_epoch: int = 0  # per-rank samples consumed in the current epoch
    tokens_seen: int = 0
    elapsed: float = 0.0
    extra: dict = field(default_factory=dict)


def rng_state() -> dict:
    """RNG states as tensors and plain lists, so the checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                        int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """The optimisation loop every stage shares.

    `loss_fn(model, batch) -> (loss, metrics)` is the only stage-specific part: `loss` is the scalar to minimise
    for one micro-batch, `metrics` a dict of scalars to log (may include "tokens": how many tokens the batch
    counted for throughput; default: the size of batch["input_ids"]).

    Per optimizer step: `accumulation_steps` micro-batches forward+backward (DDP's gradient all-reduce only on the
    last one), gradients unscaled (fp16) and clipped, loss and grad norm checked for NaN/inf BEFORE the update (a
    diverged run stops without touching its checkpoints), the LR set from the schedule, the optimizer stepped,
    MoE balancing biases updated. Every log_interval steps a log line and a JSONL record; every eval_interval
    steps the held-out evaluation; every save_interval steps the weights and a resume checkpoint, both atomic."""

    def __init__(self, args, model, runtime: Runtime, stage: str, params=None, save_weights_fn=None):
        """`params`: train only these (e.g. LoRA adapters). `save_weights_fn(model)`: how to write the stage's
        output instead of the full weights file (e.g. adapter-only for LoRA); the resume checkpoint is unchanged."""
        self.args, self.runtime, self.stage = args, runtime, stage
        self.save_weights_fn = save_weights_fn
        self.raw_model = model.to(runtime.device)
        self.config = model.config
        self.weights_file = weight_path(args.save_dir, args.save_weight, self.config)
        self.resume_file = self.weights_file[:-len(".pth")] + "_resume.pth"
        self.optimizer = self._make_optimizer(params)
        self.scaler = torch.amp.GradScaler(runtime.device.type,
                                           enabled=runtime.dtype == torch.float16 and runtime.device.type == "cuda")
        self.state = TrainState()
        self.stop_requested = False
        self.deepspeed_engine = None
        self.model = self.raw_model
        if args.use_compile:
            self.model = torch.compile(self.model)
        if args.deepspeed:
            self._init_deepspeed()
        elif runtime.distributed:
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.peak_flops = device_peak_flops(runtime.device)
        self.resumed = self.try_resume()
        self.log = MetricsLog(runtime, args.save_dir, args.save_weight, bool(args.use_wandb), args.wandb_project,
                              config=vars(args), wandb_id=getattr(self, "_wandb_id", None), append=self.resumed)

    # ---- setup -----------------------------------------------------------------------------------------------
    def _make_optimizer(self, params):
        """AdamW; decay only weight matrices (norm gains and embeddings keep their scale)."""
        named = [(n, p) for n, p in self.raw_model.named_parameters() if p.requires_grad]
        if params is not None:
            wanted = {id(p) for p in params}
            named = [(n, p) for n, p in named if id(p) in wanted]
        seen, decay, no_decay = set(), [], []
        for name, p in named:
            if id(p) in seen:
                continue  # tied weights appear twice
            seen.add(id(p))
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.runtime.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=self.args.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)

    def _init_deepspeed(self):
        import deepspeed
        with open(self.args.deepspeed) as f:
            ds_config = json.load(f)
        ds_config["train_micro_batch_size_per_gpu"] = self.args.batch_size
        ds_config["gradient_accumulation_steps"] = self.args.accumulation_steps
        ds_config["gradient_clipping"] = self.args.grad_clip
        ds_config.pop("train_batch_size", None)
        ds_config["bf16"] = {"enabled": self.runtime.dtype == torch.bfloat16}
        ds_config["fp16"] = {"enabled": self.runtime.dtype == torch.float16}
        engine, optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, config=ds_config)
        self.deepspeed_engine, self.model, self.optimizer = engine, engine, optimizer

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save(self, final: bool = False):
        """Weights for the next stage and a resume checkpoint; rank 0 writes, everyone waits."""
        if self.deepspeed_engine is not None:
            client = {"train_state": vars(self.state), "rng": rng_state(), "wandb_id": self.log.wandb_id}
            self.deepspeed_engine.save_checkpoint(self.resume_file[:-len(".pth")] + "_ds", client_state=client)
        if self.runtime.is_main:
            if self.save_weights_fn is not None:
                self.save_weights_fn(unwrap(self.raw_model))
            else:
                save_weights(self.raw_model, self.weights_file)
            if self.deepspeed_engine is None:
                atomic_torch_save({"model": unwrap(self.raw_model).state_dict(),
                                   "optimizer": self.optimizer.state_dict(),
                                   "scaler": self.scaler.state_dict(), "train_state": vars(self.state),
                                   "rng": rng_state(), "wandb_id": self.log.wandb_id, "args": vars(self.args),
                                   "config": self.config.to_dict()}, self.resume_file)
        barrier(self.runtime)

    def try_resume(self) -> bool:
        if not self.args.from_resume:
            return False
        if self.deepspeed_engine is not None:
            ds_dir = self.resume_file[:-len(".pth")] + "_ds"
            if not os.path.isdir(ds_dir):
                print0(f"--from_resume 1: no {ds_dir}, starting fresh")
                return False
            _, client = self.deepspeed_engine.load_checkpoint(ds_dir)
            self.state = TrainState(**client["train_state"])
            set_rng_state(client["rng"])
            self._wandb_id = client.get("wandb_id")
            return True
        if not os.path.exists(self.resume_file):
            print0(f"--from_resume 1: no {self.resume_file}, starting fresh")
            return False
        ckpt = torch.load(self.resume_file, map_location="cpu", weights_only=True)
        load_state_into(unwrap(self.raw_model), ckpt["model"], self.resume_file)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["train_state"])
        set_rng_state(ckpt["rng"])
        self._wandb_id = ckpt.get("wandb_id")
        print0(f"resumed from {self.resume_file} at step {self.state.step} (epoch {self.state.epoch})")
        return True

    # ---- one optimizer step ----------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, lr: float | None = None):
        if self.deepspeed_engine is not None:
            # DeepSpeed counts micro-batches itself: step() after every backward, it updates only at the boundary.
            if lr is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            self.deepspeed_engine.backward(loss)
            self.deepspeed_engine.step()
        else:
            self.scaler.scale(loss / self.args.accumulation_steps).backward()

    def optimizer_step(self, lr: float, loss_sum: torch.Tensor) -> float:
        """Clip, check for divergence, step. Returns the grad norm (before clipping)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.deepspeed_engine is not None:
            if not torch.isfinite(loss_sum):
                raise TrainingDiverged(f"loss is {loss_sum.item()} at step {self.state.step}")
            norm = self.deepspeed_engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        else:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            clip = self.args.grad_clip if self.args.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            fp16_overflow_is_handled = self.scaler.is_enabled()  # GradScaler skips inf steps and lowers its scale
            finite = torch.isfinite(loss_sum) & (torch.isfinite(norm) | fp16_overflow_is_handled)
            if not bool(finite):
                raise TrainingDiverged(
                    f"non-finite loss ({loss_sum.item():.4g}) or grad norm ({norm.item():.4g}) at step "
                    f"{self.state.step}: stopped before the optimizer step, so no NaN reached the weights. "
                    f"The last good checkpoint ({self.weights_file}) is untouched; try a lower --learning_rate, "
                    f"--dtype bfloat16 instead of float16, or --grad_clip.")
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            grad_norm = norm.item()
        if self.config.use_moe:
            from .moe import update_moe_biases
            self.last_moe_stats = update_moe_biases(unwrap(self.raw_model))
        return grad_norm

    def no_sync(self, last_micro_step: bool):
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) and not last_micro_step:
            return self.model.no_sync()
        return contextlib.nullcontext()

    # ---- the loop --------------------------------------------------------------------------------------------
    def fit(self, train_dataset, loss_fn, collate_fn=None, evaluate=None, shuffle=True):
        """Train over `train_dataset` for args.epochs (or args.max_steps). `evaluate(model) -> dict` runs on all
        ranks every eval_interval steps and at the end; its metrics are logged with an 'eval/' prefix. SIGTERM
        (preemption) meanwhile means: write a resume checkpoint and exit; the old handler is back afterwards, even
        when training fails (processes forked later, e.g. tokenizing workers, inherit handlers)."""
        previous_handler = signal.signal(signal.SIGTERM, self._request_stop) if _in_main_thread() else None
        try:
            return self._fit(train_dataset, loss_fn, collate_fn, evaluate, shuffle)
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)

    def _fit(self, train_dataset, loss_fn, collate_fn, evaluate, shuffle):
        args, runtime = self.args, self.runtime
        micro_batches_per_epoch = len(train_dataset) // runtime.world_size // args.batch_size
        steps_per_epoch = micro_batches_per_epoch // args.accumulation_steps
        if steps_per_epoch == 0:
            raise SystemExit(f"the training data ({len(train_dataset)} samples) is smaller than one optimizer step "
                             f"({args.batch_size} x {args.accumulation_steps} x {runtime.world_size} ranks)")
        total_steps = steps_per_epoch * args.epochs
        if args.max_steps > 0:
            total_steps = min(total_steps, args.max_steps) if args.epochs > 0 else args.max_steps
        warmup = args.warmup_steps or max(1, total_steps // 100)
        print0(f"{self.stage}: {len(train_dataset):,} samples, {steps_per_epoch:,} steps/epoch, {total_steps:,} steps "
               f"(batch {args.batch_size} x accum {args.accumulation_steps} x {runtime.world_size} ranks), "
               f"device {runtime.device}, dtype {str(runtime.dtype).replace('torch.', '')}")

        from tqdm import tqdm
        progress = tqdm(total=total_steps, initial=self.state.step, disable=not runtime.is_main, desc=self.stage,
                        dynamic_ncols=True, file=sys.stdout, mininterval=0.5 if sys.stdout.isatty() else 30)
        self.model.train()
        window_start, window_tokens, window_steps = time.time(), 0, 0
        run_start = time.time() - self.state.elapsed
        session_start, first_step = time.time(), self.state.step
        done = self.state.step >= total_steps
        while not done:
            sampler = ResumableSampler(len(train_dataset), args.seed, self.state.epoch, runtime.rank,
                                       runtime.world_size, shuffle, start=self.state.samples_into_epoch)
            # Its own generator: otherwise creating the loader draws from the global RNG, and a resumed run (which
            # creates one mid-epoch) would sample different dropout masks than the uninterrupted run.
            loader = DataLoader(train_dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=collate_fn,
                                num_workers=args.num_workers, drop_last=True, pin_memory=runtime.device.type == "cuda",
                                generator=torch.Generator().manual_seed(args.seed + self.state.epoch))
            micro_step, loss_sum, metric_sums = 0, torch.zeros((), device=runtime.device), {}
            for batch in loader:
                last_micro = (micro_step + 1) % args.accumulation_steps == 0
                batch = {k: v.to(runtime.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                         for k, v in batch.items()}
                lr = lr_at(self.state.step, total_steps, args.learning_rate, warmup, args.min_lr_ratio)
                with self.no_sync(last_micro), runtime.autocast():
                    loss, metrics = loss_fn(self.model, batch)
                self.backward(loss, lr)
                micro_step += 1
                loss_sum += loss.detach().float()
                tokens = metrics.pop("tokens", None)
                tokens = int(tokens) if tokens is not None else batch["input_ids"].numel()
                window_tokens += tokens
                self.state.tokens_seen += tokens * runtime.world_size
                for k, v in metrics.items():
                    value = v.detach().float() if isinstance(v, torch.Tensor) else v
                    metric_sums[k] = metric_sums.get(k, 0.0) + value
                if not last_micro:
                    continue
                grad_norm = self.optimizer_step(lr, loss_sum)
                self.state.step += 1
                self.state.samples_into_epoch += args.batch_size * args.accumulation_steps
                window_steps += 1
                progress.update(1)
                step = self.state.step
                if step % args.log_interval == 0 or step == total_steps:
                    elapsed_window = time.time() - window_start
                    mean_loss = all_reduce_mean(loss_sum / args.accumulation_steps, runtime).item()
                    record = {"step": step, "epoch": self.state.epoch, "loss": mean_loss, "lr": lr,
                              "grad_norm": grad_norm,
                              "tokens_per_sec": window_tokens * runtime.world_size / max(elapsed_window, 1e-9),
                              "elapsed": time.time() - run_start}
                    for k, v in metric_sums.items():
                        value = v / args.accumulation_steps
                        record[k] = all_reduce_mean(value, runtime).item() if isinstance(value, torch.Tensor) else value
                    if self.config.use_moe and getattr(self, "last_moe_stats", None):
                        record.update({k: v for k, v in self.last_moe_stats.items() if not isinstance(v, list)})
                    if self.peak_flops:
                        flops = unwrap(self.raw_model).flops_per_token(args.max_seq_len)
                        record["mfu"] = flops * record["tokens_per_sec"] / runtime.world_size / self.peak_flops
                    record["peak_mem_gb"] = peak_memory_gb(runtime.device)
                    steps_this_session = step - first_step
                    eta = (time.time() - session_start) / max(1, steps_this_session) * (total_steps - step)
                    self._print_log(record, total_steps, eta, progress)
                    self.log.log(record)
                    window_start, window_tokens, window_steps = time.time(), 0, 0
                loss_sum, metric_sums = torch.zeros((), device=runtime.device), {}
                if evaluate is not None and args.eval_interval > 0 and step % args.eval_interval == 0 \
                        and step != total_steps:
                    self.evaluate(evaluate, step, progress)
                self.state.elapsed = time.time() - run_start
                if step % args.save_interval == 0 or self.stop_requested:
                    self.save()
                if self.stop_requested:
                    progress.close()
                    print0(f"SIGTERM: resume checkpoint written at step {step} ({self.resume_file}); exiting")
                    self.log.finish()
                    sys.exit(143)
                if step >= total_steps:
                    done = True
                    break
            else:
                self.state.epoch += 1
                self.state.samples_into_epoch = 0
                if args.max_steps <= 0 and self.state.epoch >= args.epochs:
                    done = True
        progress.close()
        self.state.elapsed = time.time() - run_start
        final = {}
        if evaluate is not None:
            final = self.evaluate(evaluate, self.state.step, None)
        self.save(final=True)
        summary = {"stage": self.stage, "weights": self.weights_file, "steps": self.state.step,
                   "seconds": self.state.elapsed, "tokens": self.state.tokens_seen}
        for key, value in final.items():
            if isinstance(value, (int, float)):
                summary[f"{key}_after"] = value
                if key in getattr(self, "first_eval", {}):
                    summary[f"{key}_before"] = self.first_eval[key]
        write_summary(args.save_dir, args.save_weight, summary, runtime)
        if runtime.distributed:
            self.check_ranks_in_sync()
        print0(f"{self.stage} done: {self.state.step} steps in {format_seconds(self.state.elapsed)}; "
               f"weights -> {self.weights_file}")
        self.log.finish()
        return final

    @torch.no_grad()
    def check_ranks_in_sync(self):
        """Every rank must end with the same weights; a checksum spread of zero across ranks proves it."""
        checksum = torch.stack([p.detach().double().sum() for p in unwrap(self.raw_model).parameters()]).sum()
        low, high = checksum.clone(), checksum.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        print0(f"ranks in sync: {'yes' if low.item() == high.item() else 'NO'} (weight checksum {checksum.item():.6f})")

    def evaluate(self, evaluate, step: int, progress=None) -> dict:
        """Run `evaluate(model)` in eval mode without gradients, log and print its metrics."""
        self.model.eval()
        with torch.no_grad(), self.runtime.autocast():
            metrics = evaluate(unwrap(self.model))
        self.model.train()
        if step == 0:
            self.first_eval = metrics
        record = {"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}
        self.log.log(record)
        text = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        (progress.write if progress is not None and self.runtime.is_main else print0)(f"[eval] step {step} | {text}")
        return metrics

    def _print_log(self, record, total_steps, eta, progress):
        parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
                 f"gnorm {record['grad_norm']:.2f}", f"{record['tokens_per_sec']:,.0f} tok/s"]
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        extra = [k for k in record if k not in {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_sec",
                                                "elapsed", "mfu", "peak_mem_gb"}]
        parts += [f"{k} {record[k]:.4g}" for k in extra if isinstance(record[k], (int, float))]
        parts += [f"mem {record['peak_mem_gb']:.1f}GB", f"eta {format_seconds(eta)}"]
        if self.runtime.is_main:
            progress.write(" | ".join(parts))

    def _request_stop(self, signum, frame):
        self.stop_requested = True


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


@torch.no_grad()
def evaluate_lm_loss(model, dataset, runtime: Runtime, batch_size: int, max_batches: int, collate_fn=None) -> float:
    """Mean next-token loss over the first max_batches batches of a held-out dataset (all ranks, then averaged)."""
    sampler = ResumableSampler(len(dataset), 0, 0, runtime.rank, runtime.world_size, shuffle=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)
    total, count = torch.zeros((), device=runtime.device), 0
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        batch = {k: v.to(runtime.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        output = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
        total += output.loss.float()
        count += 1
    return all_reduce_mean(total / max(count, 1), runtime).item()
