"""Where and in which precision to run: the device and autocast dtype a script picks when the user names none.
Shared by training and inference, so it depends on nothing but torch."""
import torch

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
