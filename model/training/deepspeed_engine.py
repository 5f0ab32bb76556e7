"""DeepSpeed ZeRO (`--deepspeed ds_config.json`) behind the same methods as TorchEngine. DeepSpeed owns the
optimizer state sharding, loss scaling, accumulation and clipping; the micro-batch size, accumulation, clipping
and precision come from our flags so the two engines train the same run."""
import contextlib
import json
import os

import torch

from .engine import TrainingDiverged, make_optimizer, set_learning_rate


class DeepSpeedEngine:
    def __init__(self, model, params, args, runtime):
        import deepspeed
        self.args, self.runtime = args, runtime
        optimizer = make_optimizer(model, params, args.learning_rate, args.weight_decay, runtime.device)
        with open(args.deepspeed) as f:
            ds_config = json.load(f)
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

    def save_resume(self, raw_model, path: str, client: dict):
        self.model.save_checkpoint(self.checkpoint_dir(path), client_state=client)

    def load_resume(self, raw_model, path: str) -> dict | None:
        if not os.path.isdir(self.checkpoint_dir(path)):
            return None
        _, client = self.model.load_checkpoint(self.checkpoint_dir(path))
        return client

    @staticmethod
    def checkpoint_dir(resume_file: str) -> str:
        return resume_file[:-len(".pth")] + "_ds"
