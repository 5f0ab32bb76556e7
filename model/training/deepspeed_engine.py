"""DeepSpeed ZeRO (`--deepspeed ds_config.json`) behind the same methods as TorchEngine. DeepSpeed owns the
optimizer state sharding, loss scaling, accumulation and clipping; the micro-batch size, accumulation, clipping
and precision come from our flags so the two engines train the same run.

On a CPU DeepSpeed runs as well (its CPU accelerator talks gloo when Intel's oneCCL bindings are absent), so ZeRO-1/2
are tested against DDP on the CPU (tests/stages/test_distributed.py)."""
import contextlib
import glob
import importlib
import json
import os
import shutil

import torch

from ..files import atomic_write_text
from .engine import TrainingDiverged, make_optimizer, set_learning_rate
from .runtime import barrier


def import_deepspeed(device: torch.device):
    """DeepSpeed picks its accelerator once, when first imported, by probing for CUDA and others; a `--device cpu`
    run must get the CPU one whatever the machine has, so say so before the import."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")  # `from deepspeed.comm import torch` is torch
    # DeepSpeed's process-group wrapper JIT-compiles a shared-memory all-reduce kernel (g++ and ninja; 98 s on this
    # project's 2-core machine) whenever it is created and finds no cached build. Only DeepSpeed inference's
    # tensor-parallel all-reduce uses it, and only when $LOCAL_SIZE (which torchrun never sets) covers every rank.
    # Training never needs it: skip it unless it could be used.
    if "LOCAL_SIZE" not in os.environ:
        ds_torch_comm.build_shm_op = lambda: None
    return deepspeed


class DeepSpeedEngine:
    def __init__(self, model, params, args, runtime):
        deepspeed = import_deepspeed(runtime.device)
        self.args, self.runtime = args, runtime
        optimizer = make_optimizer(model, params, args.learning_rate, args.weight_decay, runtime.device)
        with open(args.deepspeed) as f:
            ds_config = json.load(f)
        stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2):
            raise SystemExit(f"{args.deepspeed}: ZeRO stage {stage} is not supported (use 1 or 2): checkpoints are "
                             f"written from rank 0's full weights, which ZeRO-3 does not keep")
        ds_config["train_micro_batch_size_per_gpu"] = args.batch_size
        ds_config["gradient_accumulation_steps"] = args.accumulation_steps
        ds_config["gradient_clipping"] = args.grad_clip
        ds_config.pop("train_batch_size", None)
        ds_config["bf16"] = {"enabled": runtime.dtype == torch.bfloat16}
        ds_config["fp16"] = {"enabled": runtime.dtype == torch.float16}
        model = torch.compile(model) if args.use_compile else model
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    def no_sync(self, last_micro_step: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces gradients at the accumulation boundary itself

    def backward(self, loss: torch.Tensor, lr: float):
        # DeepSpeed counts micro-batches itself and wants step() after every backward; on all but the last
        # micro-batch of an optimizer step that only advances its counter. The last one's step() applies the
        # update, so it waits for step() below: the rate is set and the loss checked before it.
        set_learning_rate(self.optimizer, lr)
        self.model.backward(loss)
        if not self.model.is_gradient_accumulation_boundary():
            self.model.step()

    def step(self, lr: float, loss_sum: torch.Tensor, step: int, weights_file: str) -> float:
        set_learning_rate(self.optimizer, lr)
        if not torch.isfinite(loss_sum):
            raise TrainingDiverged(f"non-finite loss ({loss_sum.item():.4g}) at step {step}: stopped before the "
                                   f"optimizer step; the last good checkpoint ({weights_file}) is untouched")
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ---- resume checkpoints: a directory of tags, each rank writes its optimizer shard ---------------------------
    def save_resume(self, raw_model, path: str, client: dict):
        """DeepSpeed writes the checkpoint's files straight to their final names and rewrites `latest` in place, so a
        kill mid-save could leave a torn tag or an empty `latest`, and every save adds a full copy. Here each save
        goes to a new tag; only once every rank has written its files (save_checkpoint ends in a barrier) and they
        are fsynced, rank 0 points `latest` at it (atomically) and deletes the older tags. The previous tag stays
        the good checkpoint until then."""
        root = self.checkpoint_dir(path)
        tag = f"step{client['train_state']['step']}"
        if tag == self.latest_tag(root):  # the final save at the step of the last periodic one: never overwrite
            tag += "-final"
        self.model.save_checkpoint(root, tag=tag, client_state=client, save_latest=False)
        if self.runtime.is_main:
            for name in glob.glob(os.path.join(glob.escape(root), tag, "*")):
                with open(name, "rb") as f:
                    os.fsync(f.fileno())
            atomic_write_text(tag, os.path.join(root, "latest"))
            for old in os.listdir(root):
                if old not in (tag, "latest") and os.path.isdir(os.path.join(root, old)):
                    shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        barrier(self.runtime)

    def load_resume(self, raw_model, path: str) -> dict | None:
        if self.latest_tag(self.checkpoint_dir(path)) is None:
            return None
        _, client = self.model.load_checkpoint(self.checkpoint_dir(path))
        return client

    @staticmethod
    def latest_tag(root: str) -> str | None:
        try:
            with open(os.path.join(root, "latest")) as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    @staticmethod
    def checkpoint_dir(resume_file: str) -> str:
        return resume_file[:-len(".pth")] + "_ds"
