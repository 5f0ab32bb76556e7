"""Where and in which precision to run: the device and autocast dtype a script picks when the user names none, and
how a model's weights are cast for inference. Shared by training and inference, so it depends on nothing but torch."""
import json
import os
import platform
import time

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX). Without them bf16 is emulated and
    never faster than fp32; with them it may or may not be (measured_cpu_dtype decides)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@torch.no_grad()
def matmul_rate(shape: tuple[int, int, int], dtype: torch.dtype, seconds: float = 0.2) -> float:
    """GFLOP/s of [m, k] @ [k, n] with both operands in `dtype`, on the current threads: the best of the repeats
    that fit in `seconds` after a warm-up call. The kernel itself, as training mostly runs it: under autocast the
    activations are already bf16 and each weight is cast once per forward."""
    m, k, n = shape
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # warm-up: first-call allocations and kernel selection
    best, deadline = float("inf"), None
    while deadline is None or time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
        deadline = deadline or start + seconds
    return 2 * m * k * n / best / 1e9


def measured_cpu_dtype(shape: tuple[int, int, int], cache_file: str | None = None) -> tuple[str, str]:
    """(dtype name, why) for CPU training at a model's matmul shape [tokens, hidden] @ [hidden, intermediate]:
    bfloat16 only where a bf16 matmul is measurably faster (>= 10%) than an fp32 one on this CPU. On one AMD EPYC it was
    1.7-1.9x faster; on an Intel Xeon with the same avx512_bf16 flag it was slower, so a flag cannot decide. The
    probe takes under a second and is cached per CPU model, torch version, thread count and shape."""
    if not cpu_has_native_bf16():
        return "float32", "this CPU has no bf16 instructions (bf16 would be emulated)"
    cache_dir = os.environ.get("TINYMIND_CACHE_DIR", os.path.expanduser("~/.cache/tinymind"))
    cache_file = cache_file or os.path.join(cache_dir, "cpu_dtype.json")
    key = f"{cpu_model_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads | " \
          f"{'x'.join(map(str, shape))}"
    try:
        with open(cache_file) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = {"float32": matmul_rate(shape, torch.float32), "bfloat16": matmul_rate(shape, torch.bfloat16)}
        try:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            tmp = f"{cache_file}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(cache, f, indent=1)
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a read-only home only costs the probe again next time
    rates = cache[key]
    choice = "bfloat16" if rates["bfloat16"] >= 1.1 * rates["float32"] else "float32"
    why = (f"measured on this CPU at {'x'.join(map(str, shape))}: bf16 matmul {rates['bfloat16']:.0f} GFLOP/s, "
           f"fp32 {rates['float32']:.0f} GFLOP/s")
    return choice, why


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device_type: str, matmul_shape: tuple[int, int, int] | None = None) -> str:
    """bf16 on GPUs that have it (fp16 on older ones); on a CPU what measured_cpu_dtype measures at the model's
    matmul shape (a flag-only guess when no shape is given); fp32 on MPS, whose bf16 autocast coverage is patchy."""
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device_type == "cpu":
        if matmul_shape is None:
            return "bfloat16" if cpu_has_native_bf16() else "float32"
        return measured_cpu_dtype(matmul_shape)[0]
    return "float32"


@torch.no_grad()
def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast the floating-point parameters (the weights) to `dtype` and leave every buffer as it is; returns model.

    Why not `model.to(dtype)`: that casts floating buffers too, and a model's buffers are not weights. RoPE's
    `inv_freq` is computed in fp32 and training always used it in fp32; in bf16 each frequency is off by up to
    2^-8 of itself, and the angle between a query and a key n positions apart by n times that error (7.7 rad at
    n = 8,192 for the `small` preset): a different model from the one trained. The MoE router's
    `e_score_correction_bias` only makes sense at the precision its small updates were made in. transformers'
    `from_pretrained(dtype=torch.bfloat16)` keeps these buffers fp32 as well.

    `param.data` is replaced, which is what `Module.to` itself does to parameters: the Parameter objects stay the
    same, so tied weights (the LM head and the embedding) stay tied and `requires_grad` is kept."""
    for param in model.parameters():  # each shared (tied) parameter comes once
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    return model
