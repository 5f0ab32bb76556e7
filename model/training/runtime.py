"""The process a stage runs in: device and dtype, threads, seeds, and torchrun's process group (NCCL on CUDA, gloo
on CPU). Only rank 0 prints and writes files; the collectives here are the few every stage needs."""
import contextlib
import datetime
import os
import random
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..device import DTYPES, default_device, default_dtype, measured_cpu_dtype

# How long a collective waits for the other ranks before it fails (--ddp_timeout; HF Trainer's name and default).
# Legitimate waits are long: the other ranks wait at a barrier while rank 0 alone tokenizes the data into its cache
# (docs/gpu_recipe.md measured 17 minutes single-threaded for MiniMind's sft_mini_512.jsonl; parallel now, still
# minutes on a small machine) or writes a checkpoint to a slow disk. A false timeout kills a healthy run, a late one
# only costs the wait: so 30 minutes, gloo's own default, now for NCCL too (torch gives it 10 minutes); shorten it
# with the flag where a frozen rank must be noticed sooner.
DEFAULT_DDP_TIMEOUT = 1800
# scripts/run_pipeline.py --jobs runs several stages on one CPU, each on a share of the cores. When the others end
# and nothing else can start, it writes a larger thread count into the file this variable names, and the running
# stage takes the idle cores at its next step (take_offered_threads) instead of leaving them idle to the end.
THREADS_FILE_ENV = "TINYMIND_THREADS_FILE"


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    ddp_timeout: float = DEFAULT_DDP_TIMEOUT  # seconds a collective waits for the other ranks

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


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def init_runtime(device: str | None = None, dtype: str | None = None, seed: int = 42,
                 num_threads: int | None = None, matmul_shape: tuple[int, int, int] | None = None,
                 ddp_timeout: float = DEFAULT_DDP_TIMEOUT) -> Runtime:
    """Pick device and dtype (fastest correct choice when not given), join the process group under torchrun.
    `matmul_shape`: the model's [tokens, hidden] @ [hidden, intermediate], at which a CPU measures whether bf16
    autocast beats fp32 (rank 0 measures, every rank uses its answer). `ddp_timeout`: seconds a collective waits
    for the other ranks before it fails (see DEFAULT_DDP_TIMEOUT)."""
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
        take_offered_threads()
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=ddp_timeout)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timeout)
        # A group made later without a timeout of its own gets torch's default (30 min on gloo, 10 on NCCL), not this
        # group's. DeepSpeed makes the group of ZeRO's gradient reductions that way (a clone of the world group),
        # so a frozen rank hung a ZeRO run for 30 minutes whatever --ddp_timeout said: make it the default.
        dist.distributed_c10d.default_pg_timeout = timeout
        dist.distributed_c10d.default_pg_nccl_timeout = timeout
    if dtype is None and device_type == "cpu" and matmul_shape is not None:
        dtype_name, why = measured_cpu_dtype(matmul_shape) if rank == 0 else ("float32", "")
        if world_size > 1:
            use_bf16 = torch.tensor([dtype_name == "bfloat16"], dtype=torch.int32)
            dist.broadcast(use_bf16, src=0)
            dtype_name = "bfloat16" if use_bf16.item() else "float32"
        print0(f"dtype {dtype_name}: {why} (--dtype overrides)")
    else:
        dtype_name = dtype or default_dtype(device_type)
    if dtype_name not in DTYPES:
        raise SystemExit(f"--dtype {dtype_name!r}: choose one of float32, bfloat16, float16")
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls for the fp32 parts: free speed on Ampere+
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(seed + rank)
    return Runtime(torch.device(device), DTYPES[dtype_name], rank, local_rank, world_size, ddp_timeout)


def take_offered_threads() -> int | None:
    """The thread count offered in $TINYMIND_THREADS_FILE, if there is one and torch is not on it yet: taken, and
    returned (None otherwise). Cheap enough to ask every step (a missing file costs one failed open)."""
    path = os.environ.get(THREADS_FILE_ENV)
    if not path:
        return None
    try:
        with open(path) as f:
            offered = int(f.read())
    except (OSError, ValueError):
        return None
    if offered < 1 or offered == torch.get_num_threads():
        return None
    torch.set_num_threads(offered)
    return offered


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


def is_collective_failure(error: BaseException) -> bool:
    """NCCL raises DistBackendError; gloo a plain RuntimeError whose message names its source file in third_party/gloo
    ("Timed out waiting 600000ms for recv operation", "Connection reset by peer")."""
    return isinstance(error, dist.DistError) or isinstance(error, RuntimeError) and "gloo" in str(error).lower()


@contextlib.contextmanager
def explain_collective_failures(runtime: Runtime, waiting_for: str = "the other ranks in a collective",
                                timeout_hint: str = ""):
    """A collective fails when another rank is gone: after --ddp_timeout when it froze, at once when it died (its
    connections close). Gloo and NCCL then raise a low-level error with a traceback through DDP; say in one line what
    most likely happened and what to do instead. Other errors pass through untouched."""
    try:
        yield
    except RuntimeError as error:
        if not runtime.distributed or not is_collective_failure(error):
            raise
        if "timed out" in str(error).lower() or "timeout" in str(error).lower():
            cause = (f"waited --ddp_timeout {runtime.ddp_timeout:g}s for {waiting_for}: a rank froze (stopped, hung, "
                     f"swapping) or died{timeout_hint}")
        else:
            cause = f"lost its connection while waiting for {waiting_for}: a rank died (killed, out of memory, " \
                    f"crashed; its own output says why)"
        # Printed here, not left to SystemExit: torchrun stops the other ranks with SIGTERM as soon as one exits, and
        # that signal can end this process before the interpreter prints an exit message.
        print(f"error: rank {runtime.rank} {cause}. Checkpoints already written are intact: continue with "
              f"--from_resume 1", file=sys.stderr, flush=True)
        raise SystemExit(1) from error


@contextlib.contextmanager
def main_rank_first(runtime: Runtime):
    """Rank 0 runs the block first (tokenizing data into a cache), the other ranks after it (opening that cache).
    If rank 0 fails inside, torchrun stops the waiting ranks. The wait counts against --ddp_timeout: a first
    tokenization of a big file can take longer, hence the hint in the message."""
    if not runtime.is_main:
        with explain_collective_failures(runtime, "rank 0 to tokenize the data",
                                         ", or the data is big enough to need a longer --ddp_timeout"):
            barrier(runtime)
    yield
    if runtime.is_main:
        with explain_collective_failures(runtime, "the other ranks after tokenizing"):
            barrier(runtime)


def cleanup(runtime: Runtime):
    """Leave the process group. The barrier and short sleep first let gloo's worker threads finish freeing the tensors
    of the last collectives (they need the GIL for it): destroying the group, or freeing the DDP wrapper that owns it,
    while one of them is still at it deadlocks in ProcessGroupGloo's destructor (seen in 1 CPU run in 3 under load)."""
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        time.sleep(0.5)  # GIL released while sleeping: the worker threads go idle
        dist.destroy_process_group()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


GPU_PEAK_FLOPS = {  # dense bf16 tensor-core peaks, for MFU
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
    "4090": 165e12, "3090": 71e12, "A10": 125e12, "V100": 125e12, "T4": 65e12,
}


def device_peak_flops(device: torch.device, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s for MFU: `peak_tflops` when given (any device, e.g. a GPU not in the table or a CPU's measured
    matmul rate), else the table's bf16 figure for a known GPU, else None (MFU is then not logged)."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_FLOPS.items():
        if key in name:
            return flops
    return None
