"""Where and in which precision to run: the device and autocast dtype a script picks when the user names none, and
how a model's weights are cast for inference. Shared by training and inference, so it depends on nothing but torch."""
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
