"""`Trainer`, the one training loop every stage runs in.

A stage supplies what one optimizer step computes; the Trainer owns everything around it, identically for every
stage: the LR schedule, accumulation, the NaN guard, MoE bias updates, logging (loss, throughput, MFU, peak memory),
held-out evaluation, atomic checkpoints every save_interval steps and on SIGTERM, resume, the final summary and the
check that every rank ends with the same weights.

- Supervised stages (pretraining, SFT, LoRA, DPO, distillation, reasoning) call `fit(dataset, loss_fn)`:
  `loss_fn(model, batch) -> (loss, metrics)` is their only stage-specific code; token-level losses divide by
  batch["loss_normaliser"] (SupervisedSteps.loss_normaliser) so every target token of a step weighs the same.
- Stages that make their own data as they go (GRPO's rollouts) call `run(steps)` with an object whose `step()`
  runs one optimizer step's forward and backward passes (see `SupervisedSteps`, the supervised one, for the shape).
"""
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..checkpoint import save_weights, sweep_stale_temp_files, unwrap, weight_path
from .engine import TorchEngine
from .runtime import (Runtime, all_reduce_mean, barrier, device_peak_flops, explain_collective_failures, peak_memory_gb,
                      print0, take_offered_threads)
from .schedule import ResumableSampler, lr_at
from .tracking import MetricsLog, format_seconds, write_summary


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    samples_into_epoch: int = 0  # per-rank samples consumed in the current epoch
    tokens_seen: int = 0
    elapsed: float = 0.0
    extra: dict = field(default_factory=dict)


@dataclass
class StepResult:
    """What one optimizer step's forward/backward passes produced, before the update."""
    loss_sum: torch.Tensor  # sum of the micro-batch losses (this rank)
    micro_batches: int
    tokens: int  # tokens this rank trained on (throughput counts work done, not padding)
    metrics: dict  # tensors are this rank's values (averaged over ranks when logged); floats are already global


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


class SupervisedSteps:
    """Optimizer steps over a dataset: each step is accumulation_steps micro-batches of `loss_fn(model, batch)`.
    The order is fixed by (seed, epoch) and resumes mid-epoch from the train state; an epoch's last micro-batches
    that do not fill a whole step are skipped rather than leaked into the next step's gradient."""

    def __init__(self, trainer: "Trainer", dataset, loss_fn, collate_fn=None, shuffle: bool = True,
                 token_normalised: bool = False):
        self.trainer, self.dataset, self.loss_fn = trainer, dataset, loss_fn
        self.collate_fn, self.shuffle, self.token_normalised = collate_fn, shuffle, token_normalised
        args, runtime = trainer.args, trainer.runtime
        micro_batches_per_epoch = len(dataset) // runtime.world_size // args.batch_size
        self.steps_per_epoch = micro_batches_per_epoch // args.accumulation_steps
        if self.steps_per_epoch == 0:
            raise SystemExit(f"the training data ({len(dataset)} samples) is smaller than one optimizer step "
                             f"({args.batch_size} x {args.accumulation_steps} x {runtime.world_size} ranks)")
        self.total_steps = self.steps_per_epoch * args.epochs
        if args.max_steps > 0:
            self.total_steps = min(self.total_steps, args.max_steps) if args.epochs > 0 else args.max_steps
        self.batches = None

    def describe(self) -> str:
        args, runtime = self.trainer.args, self.trainer.runtime
        return (f"{len(self.dataset):,} samples, {self.steps_per_epoch:,} steps/epoch, {self.total_steps:,} steps "
                f"(batch {args.batch_size} x accum {args.accumulation_steps} x {runtime.world_size} ranks)")

    def epoch_batches(self):
        """This rank's micro-batches for the rest of the current epoch, in whole steps."""
        args, runtime, state = self.trainer.args, self.trainer.runtime, self.trainer.state
        sampler = ResumableSampler(len(self.dataset), args.seed, state.epoch, runtime.rank, runtime.world_size,
                                   self.shuffle, start=state.samples_into_epoch)
        # Its own generator: otherwise creating the loader draws from the global RNG, and a resumed run (which
        # creates one mid-epoch) would sample different dropout masks than the uninterrupted run.
        loader = DataLoader(self.dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=args.num_workers, drop_last=True, pin_memory=runtime.device.type == "cuda",
                            generator=torch.Generator().manual_seed(args.seed + state.epoch))
        return iter(loader)

    def next_micro_batches(self) -> list:
        state, accumulation = self.trainer.state, self.trainer.args.accumulation_steps
        while True:
            if self.batches is None:
                self.batches = self.epoch_batches()
            group = [batch for _, batch in zip(range(accumulation), self.batches)]
            if len(group) == accumulation:
                return group
            self.batches = None  # the epoch is over
            state.epoch += 1
            state.samples_into_epoch = 0

    def loss_normaliser(self, micro_batches: list[dict]) -> torch.Tensor | None:
        """For token-level losses: the step's target tokens (labels != -100 after the shift) over all micro-batches
        and ranks, divided by ranks x accumulation (the engine divides each micro-batch loss by the accumulation
        count and DDP averages over ranks). A loss_fn that divides its summed token losses by this gives every
        target token of the step the same weight, as HF's Trainer and TRL do with num_items_in_batch; a mean of
        per-micro-batch means would weigh the tokens of short micro-batches more."""
        if not all("labels" in batch for batch in micro_batches):
            return None
        runtime = self.trainer.runtime
        total = sum((batch["labels"][:, 1:] != -100).sum() for batch in micro_batches).float()
        if runtime.distributed:
            dist.all_reduce(total)
        return total.clamp(min=1) / (runtime.world_size * len(micro_batches))

    def step(self) -> StepResult:
        trainer, runtime = self.trainer, self.trainer.runtime
        micro_batches = [{k: v.to(runtime.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                          for k, v in batch.items()} for batch in self.next_micro_batches()]
        normaliser = self.loss_normaliser(micro_batches) if self.token_normalised else None
        loss_sum, metric_sums, tokens = torch.zeros((), device=runtime.device), {}, 0
        for i, batch in enumerate(micro_batches):
            if normaliser is not None:
                batch["loss_normaliser"] = normaliser
            with trainer.engine.no_sync(i == len(micro_batches) - 1), runtime.autocast():
                loss, metrics = self.loss_fn(trainer.model, batch)
            trainer.backward(loss)
            loss_sum += loss.detach().float()
            batch_tokens = metrics.pop("tokens", None)
            tokens += int(batch_tokens) if batch_tokens is not None else batch["input_ids"].numel()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + (v.detach().float() if isinstance(v, torch.Tensor) else v)
        trainer.state.samples_into_epoch += len(micro_batches) * trainer.args.batch_size
        return StepResult(loss_sum, len(micro_batches), tokens,
                          {k: v / len(micro_batches) for k, v in metric_sums.items()})

    def can_checkpoint(self) -> bool:
        return True


class Trainer:
    """Per optimizer step: the stage's forward/backward passes (`steps.step()`), the engine's clip + NaN guard +
    update, MoE balancing biases updated. Every log_interval steps a log line and a JSONL record; every
    eval_interval steps the held-out evaluation; every save_interval steps (and on SIGTERM) the weights and a resume
    checkpoint, both atomic. The engine is plain PyTorch (DDP, GradScaler) or DeepSpeed: same methods."""

    def __init__(self, args, model, runtime: Runtime, stage: str, params=None, save_weights_fn=None,
                 weights_file: str | None = None):
        """`params`: train only these (e.g. LoRA adapters). `save_weights_fn(model)`: how to write the stage's
        output instead of the full weights file (e.g. adapter-only for LoRA; then `weights_file` names that
        output); the resume checkpoint always holds the full state."""
        self.args, self.runtime, self.stage = args, runtime, stage
        self.save_weights_fn = save_weights_fn
        self.raw_model = model.to(runtime.device)
        self.config = model.config
        full_weights = weight_path(args.save_dir, args.save_weight, self.config)
        self.weights_file = weights_file or full_weights
        self.resume_file = full_weights[:-len(".pth")] + "_resume.pth"
        if args.deepspeed:
            from .deepspeed_engine import DeepSpeedEngine
            self.engine = DeepSpeedEngine(self.raw_model, params, args, runtime)
        else:
            self.engine = TorchEngine(self.raw_model, params, args, runtime)
        self.model, self.optimizer = self.engine.model, self.engine.optimizer
        self.state = TrainState()
        self.stop_requested = False
        self.lr = args.learning_rate
        self.first_eval, self.last_moe_stats = {}, None
        self.peak_flops = device_peak_flops(runtime.device, getattr(args, "peak_tflops", None))
        if self.peak_flops is None and runtime.device.type == "cuda":
            print0(f"MFU not logged: {torch.cuda.get_device_name(runtime.device)} is not in the table; "
                   "pass --peak_tflops")
        self._wandb_id = None
        if runtime.is_main:
            swept = sweep_stale_temp_files(args.save_dir)
            if swept:
                print0(f"removed {len(swept)} temp file(s) that killed saves left in {args.save_dir}")
        self.resumed = self.try_resume()
        self.log = MetricsLog(runtime, args.save_dir, args.save_weight, bool(args.use_wandb), args.wandb_project,
                              config=vars(args), wandb_id=self._wandb_id, append=self.resumed)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save(self, final: bool = False):
        """Weights for the next stage and a resume checkpoint; rank 0 writes, everyone waits."""
        client = {"train_state": vars(self.state), "rng": self.all_rng_states(), "wandb_id": self.log.wandb_id,
                  "args": vars(self.args), "config": self.config.to_dict()}
        if self.runtime.is_main:
            if self.save_weights_fn is not None:
                self.save_weights_fn(unwrap(self.raw_model))
            else:
                # the stage that made the weights (not the --save_weight name): it decides chat vs continuation mode
                save_weights(self.raw_model, self.weights_file, stage=getattr(self.args, "tinymind_stage", self.stage))
        self.engine.save_resume(self.raw_model, self.resume_file, client)
        barrier(self.runtime)

    def all_rng_states(self) -> list[dict]:
        """Every rank's RNG states, in rank order. Ranks draw different dropout masks and GRPO samples (seeded
        seed + rank); restoring rank 0's states on every rank would make a resumed multi-rank run differ from the
        uninterrupted one."""
        states = [rng_state()]
        if self.runtime.distributed:
            states = [None] * self.runtime.world_size
            dist.all_gather_object(states, rng_state())
        return states

    def try_resume(self) -> bool:
        if not self.args.from_resume:
            return False
        client = self.engine.load_resume(self.raw_model, self.resume_file)
        if client is None:
            print0(f"--from_resume 1: no resume checkpoint for {self.resume_file}, starting fresh")
            return False
        self.state = TrainState(**client["train_state"])
        states = client["rng"] if isinstance(client["rng"], list) else [client["rng"]]  # older files: rank 0's only
        set_rng_state(states[self.runtime.rank] if len(states) == self.runtime.world_size else states[0])
        self._wandb_id = client.get("wandb_id")
        print0(f"resumed from {self.resume_file} at step {self.state.step} (epoch {self.state.epoch})")
        return True

    # ---- one optimizer step ----------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor):
        """Backward one micro-batch's loss (what a step source calls; the engine scales it by accumulation)."""
        self.engine.backward(loss, self.lr)

    def optimizer_step(self, loss_sum: torch.Tensor) -> float:
        grad_norm = self.engine.step(self.lr, loss_sum, self.state.step, self.weights_file)
        if self.config.use_moe:
            from ..moe import update_moe_biases
            self.last_moe_stats = update_moe_biases(unwrap(self.raw_model))
        return grad_norm

    # ---- the loop --------------------------------------------------------------------------------------------
    def fit(self, train_dataset, loss_fn, collate_fn=None, evaluate=None, shuffle=True, token_normalised=False):
        """Train over `train_dataset` for args.epochs (or args.max_steps) with `loss_fn(model, batch) ->
        (loss, metrics)`; `metrics` may hold "tokens", the batch's real token count for throughput (default: the
        size of batch["input_ids"]). `evaluate(model) -> dict` runs on all ranks every eval_interval steps and at
        the end; its metrics are logged with an 'eval/' prefix. `token_normalised`: the loss_fn divides summed
        token losses by batch["loss_normaliser"] (counted, and all-reduced, only for stages that use it).
        Returns the final evaluation."""
        return self.run(SupervisedSteps(self, train_dataset, loss_fn, collate_fn, shuffle, token_normalised), evaluate)

    def run(self, steps, evaluate=None):
        """Train with a step source: `steps.total_steps`, `steps.describe()`, `steps.step() -> StepResult`,
        `steps.can_checkpoint()` (False mid-way through work a resumed run could not redo, e.g. between the
        updates of one GRPO rollout), optional `steps.log_fields()` and `steps.log_line(record, total)`.
        SIGTERM (preemption) meanwhile means: write a resume checkpoint at the next step that can take one and
        exit, on every rank even when only one was signalled (agree_on_stop); the old handler is back afterwards,
        even when training fails (processes forked later, e.g. tokenizing workers, inherit handlers). A collective
        that fails because another rank died or froze ends the run with one line saying so."""
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous_handler = signal.signal(signal.SIGTERM, self._request_stop) if in_main_thread else None
        try:
            with explain_collective_failures(self.runtime):
                return self._run(steps, evaluate)
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)

    def _run(self, steps, evaluate):
        args, runtime, state = self.args, self.runtime, self.state
        total_steps = steps.total_steps
        warmup = args.warmup_steps or max(1, total_steps // 100)
        print0(f"{self.stage}: {steps.describe()}, device {runtime.device}, "
               f"dtype {str(runtime.dtype).replace('torch.', '')}")
        from tqdm import tqdm
        # A bar only on a terminal: written to a file, its carriage returns pile into one endless line, and the log
        # lines below already carry the step and the ETA.
        progress = tqdm(total=total_steps, initial=state.step, disable=not runtime.is_main or not sys.stdout.isatty(),
                        desc=self.stage, dynamic_ncols=True, file=sys.stdout, mininterval=0.5)
        self.model.train()
        window_start, window_tokens = time.time(), 0
        run_start = time.time() - state.elapsed
        session_start, first_step = time.time(), state.step
        save_due, stopping = False, 0
        while state.step < total_steps:
            if (threads := take_offered_threads()) is not None:
                progress.write(f"now on {threads} CPU threads: the stages beside this one have ended")
            self.lr = lr_at(state.step, total_steps, args.learning_rate, warmup, args.min_lr_ratio)
            result = steps.step()
            grad_norm = self.optimizer_step(result.loss_sum)
            step_loss, stop_votes = self.agree_on_stop(result)
            stopping = stopping or stop_votes
            state.step += 1
            state.tokens_seen += result.tokens * runtime.world_size
            window_tokens += result.tokens
            progress.update(1)
            step = state.step
            if step % args.log_interval == 0 or step == total_steps:
                record = {"step": step, "epoch": state.epoch, "loss": step_loss.item(),
                          "lr": self.lr, "grad_norm": grad_norm,
                          "tokens_per_sec": window_tokens * runtime.world_size / max(time.time() - window_start, 1e-9),
                          "elapsed": time.time() - run_start}
                for k, v in result.metrics.items():
                    record[k] = all_reduce_mean(v, runtime).item() if isinstance(v, torch.Tensor) else v
                record.update(steps.log_fields() if hasattr(steps, "log_fields") else {})
                if self.config.use_moe and self.last_moe_stats:
                    record.update({k: v for k, v in self.last_moe_stats.items() if not isinstance(v, list)})
                if self.peak_flops:
                    flops = unwrap(self.raw_model).flops_per_token(args.max_seq_len)
                    record["mfu"] = flops * record["tokens_per_sec"] / runtime.world_size / self.peak_flops
                record["peak_mem_gb"] = peak_memory_gb(runtime.device)
                eta = (time.time() - session_start) / max(1, step - first_step) * (total_steps - step)
                line = steps.log_line(record, total_steps) if hasattr(steps, "log_line") else \
                    self.log_line(record, total_steps)
                if runtime.is_main:
                    progress.write(f"{line} | mem {record['peak_mem_gb']:.1f}GB | eta {format_seconds(eta)}")
                self.log.log(record)
                window_start, window_tokens = time.time(), 0
            if evaluate is not None and args.eval_interval > 0 and step % args.eval_interval == 0 \
                    and step != total_steps:
                self.evaluate(evaluate, step, progress)
            state.elapsed = time.time() - run_start
            save_due = save_due or step % args.save_interval == 0 or stopping > 0
            if save_due and steps.can_checkpoint():
                self.save()
                save_due = False
                if stopping:
                    progress.close()
                    print0(f"SIGTERM: resume checkpoint written at step {step} ({self.resume_file}); exiting"
                           + (f" (signalled: {stopping} of {runtime.world_size} ranks)" if runtime.distributed else ""))
                    self.log.finish()
                    sys.exit(143)
        progress.close()
        state.elapsed = time.time() - run_start
        final = self.evaluate(evaluate, state.step, None) if evaluate is not None else {}
        self.save(final=True)
        summary = {"stage": self.stage, "weights": self.weights_file, "steps": state.step,
                   "seconds": state.elapsed, "tokens": state.tokens_seen}
        for key, value in final.items():
            if isinstance(value, (int, float)):
                summary[f"{key}_after"] = value
                if key in self.first_eval:
                    summary[f"{key}_before"] = self.first_eval[key]
        write_summary(args.save_dir, args.save_weight, summary, runtime)
        if runtime.distributed:
            self.check_ranks_in_sync()
        print0(f"{self.stage} done: {state.step} steps in {format_seconds(state.elapsed)}; "
               f"weights -> {self.weights_file}")
        self.log.finish()
        return final

    def agree_on_stop(self, result: StepResult) -> tuple[torch.Tensor, int]:
        """How many ranks were asked to stop, and this step's loss averaged over the ranks (what the log needs, so
        it costs no all-reduce of its own): one all-reduce of two numbers per step. A SIGTERM often reaches a single
        rank (a scheduler preempting one process, a user's kill); acting on it alone, that rank would save and wait
        at a barrier while the others wait in the next step's all-reduce, forever. Counted here, every rank stops
        after the same step."""
        loss = result.loss_sum / result.micro_batches
        if not self.runtime.distributed:
            return loss, int(self.stop_requested)
        packed = torch.stack([loss.float(), torch.tensor(float(self.stop_requested), device=loss.device)])
        dist.all_reduce(packed)
        return packed[0] / self.runtime.world_size, int(packed[1].item())

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
        with torch.no_grad(), self.runtime.autocast(), explain_collective_failures(self.runtime):
            metrics = evaluate(unwrap(self.model))
        self.model.train()
        if step == 0:
            self.first_eval = metrics
        record = {"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}
        self.log.log(record)
        text = " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        (progress.write if progress is not None and self.runtime.is_main else print0)(f"[eval] step {step} | {text}")
        return metrics

    @staticmethod
    def log_line(record: dict, total_steps: int) -> str:
        parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}",
                 f"gnorm {record['grad_norm']:.2f}", f"{record['tokens_per_sec']:,.0f} tok/s"]
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        extra = [k for k in record if k not in {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_sec",
                                                "elapsed", "mfu", "peak_mem_gb"}]
        parts += [f"{k} {record[k]:.4g}" for k in extra if isinstance(record[k], (int, float))]
        return " | ".join(parts)

    def _request_stop(self, signum, frame):
        self.stop_requested = True
