"""How one optimizer step is carried out: backward, gradient clipping, the NaN guard, the update, and the resume
checkpoint of that state. `TorchEngine` is plain PyTorch (AdamW, fp16 GradScaler, torch.compile, DDP); the
DeepSpeed ZeRO engine (deepspeed_engine.py) offers the same methods, so the training loop has no DeepSpeed branch.
"""
import contextlib
import os

import torch

from ..checkpoint import load_resume_checkpoint, load_state_into, unwrap
from ..files import atomic_torch_save


class TrainingDiverged(RuntimeError):
    pass


# torch's fused AdamW (one kernel per parameter group) runs on these. Unless asked, torch steps one tensor at a time
# on a CPU, which is slower (scripts/bench/profile_step.py --optimizer loop|fused; figures in docs/benchmarks.md).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def make_optimizer(model, params, learning_rate: float, weight_decay: float, device: torch.device):
    """AdamW; decay only weight matrices (norm gains and embeddings keep their scale). `params`: train only these
    (e.g. LoRA adapters); None trains every parameter that requires a gradient. `params` may also be torch-style
    groups, [{"params": [...], "lr_scale": s}, ...]: those parameters then step at s x the scheduled lr (LoRA+)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lr_scale = {}
    if params is not None:
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        lr_scale = {id(p): group.get("lr_scale", 1.0) for group in groups for p in group["params"]}
        named = [(n, p) for n, p in named if id(p) in lr_scale]
    seen, grouped = set(), {(True, 1.0): [], (False, 1.0): []}  # these two always, as resume checkpoints expect
    for name, p in named:
        if id(p) in seen:
            continue  # tied weights appear twice
        seen.add(id(p))
        decays = p.dim() >= 2 and "embed" not in name
        grouped.setdefault((decays, lr_scale.get(id(p), 1.0)), []).append(p)
    groups = [{"params": ps, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
              for (decays, scale), ps in sorted(grouped.items(), key=lambda kv: (not kv[0][0], kv[0][1]))]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type in FUSED_ADAMW_DEVICES)


def set_learning_rate(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class TorchEngine:
    """AdamW over the model, optionally compiled and wrapped in DDP; fp16 runs get a GradScaler.

    Per optimizer step the loop calls `backward` once per micro-batch (each loss divided by the accumulation
    count, so the summed gradient is the step's mean) inside `no_sync` for all but the last (DDP then all-reduces
    gradients once per step), then `step`: unscale, clip, check loss and grad norm for NaN/inf BEFORE touching the
    weights (a diverged run stops with its checkpoints intact), update."""

    def __init__(self, model, params, args, runtime):
        self.args, self.runtime = args, runtime
        self.optimizer = make_optimizer(model, params, args.learning_rate, args.weight_decay, runtime.device)
        fp16_on_cuda = runtime.dtype == torch.float16 and runtime.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=fp16_on_cuda)
        self.model = torch.compile(model) if args.use_compile else model
        if runtime.distributed:
            device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)

    def no_sync(self, last_micro_step: bool):
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) and not last_micro_step:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, lr: float):
        self.scaler.scale(loss / self.args.accumulation_steps).backward()

    def step(self, lr: float, loss_sum: torch.Tensor, step: int, weights_file: str) -> float:
        """Clip, check for divergence, update. Returns the grad norm before clipping."""
        set_learning_rate(self.optimizer, lr)
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.args.grad_clip if self.args.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        fp16_overflow_is_handled = self.scaler.is_enabled()  # GradScaler skips inf steps and lowers its scale
        finite = torch.isfinite(loss_sum) & (torch.isfinite(norm) | fp16_overflow_is_handled)
        if not bool(finite):
            raise TrainingDiverged(
                f"non-finite loss ({loss_sum.item():.4g}) or grad norm ({norm.item():.4g}) at step {step}: stopped "
                f"before the optimizer step, so no NaN reached the weights. The last good checkpoint "
                f"({weights_file}) is untouched; try a lower --learning_rate, --dtype bfloat16 instead of float16, "
                f"or --grad_clip.")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()

    # ---- resume checkpoints: written by rank 0, read by every rank ---------------------------------------------
    def save_resume(self, raw_model, path: str, client: dict):
        if self.runtime.is_main:
            atomic_torch_save({"model": unwrap(raw_model).state_dict(), "optimizer": self.optimizer.state_dict(),
                               "scaler": self.scaler.state_dict(), **client}, path)

    def load_resume(self, raw_model, path: str) -> dict | None:
        """The client state saved with the checkpoint (train state, RNG, ...), or None when there is none."""
        if not os.path.exists(path):
            return None
        ckpt = load_resume_checkpoint(path)
        load_state_into(unwrap(raw_model), ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        return ckpt
