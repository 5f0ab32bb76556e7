"""Stage 6, GRPO: reinforcement learning from rewards a program can check (DeepSeekMath / DeepSeek-R1).

    python train_grpo.py                                   # demo sums, from out/full_sft_<hidden>.pth, CPU minutes
    python train_grpo.py --from_weight reason --reward_funcs format,answer --max_gen_len 1024   # MiniMind-style
    python train_grpo.py --data_path dataset/demo_grpo_champ.jsonl --max_gen_len 1024 --num_generations 16  # GPU
    torchrun --nproc_per_node 8 train_grpo.py --data_path dataset/demo_grpo_champ.jsonl

No reference answers are imitated here: the model answers each prompt G times, a reward function scores every
answer, and the model is pushed towards the answers that scored better than their siblings. One step:

1. Rollout. B prompts, each repeated G = --num_generations times, are left-padded into one batch and sampled in ONE
   `model.generate` call with the KV cache (--temperature, --top_p, --max_gen_len), with the policy in eval mode
   (no dropout; MoE layers do not count expert loads). A completion ends at its first <|im_end|>: the completion
   mask covers the tokens up to and including it; anything generated after it is ignored.
2. Reward. Every reward function in --reward_funcs scores every completion (model/training/rewards.py; TRL's signature,
   so TRL reward functions plug in); r = sum_j w_j r_j with --reward_weights. Group-relative advantage:
   A_i = (r_i - mean of its group) / (std of its group + 1e-4)   (--scale_rewards group|batch|none)
   No value network: the G siblings are the baseline. A group whose G rewards are all equal has A = 0: nothing to
   learn from it (--dynamic_sampling 1 drops such groups before the update, as DAPO does).
3. Update. --num_iterations optimizer steps on this batch with the clipped surrogate (grpo_loss in
   model/training/losses.py): ratio rho = pi_theta / pi_old per token,
   loss = -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + beta * KL_k3(pi_theta || pi_ref), aggregated per
   --loss_type. Log-probs come from logits / temperature (the distribution the tokens were sampled from),
   computed chunk by chunk so no [B, T, vocab] log-softmax is ever held. With one iteration pi_old is the current
   policy (rho == 1 exactly; the gradient is A * grad log pi); with more, pi_old's log-probs are computed once right
   after the rollout. --beta 0 (the default, as in TRL and DAPO) loads no reference model at all.

Data: {"conversations": [user turn...], "answer": "..."} per line (MiniMind's rlaif format; a trailing assistant
turn is dropped). Every field besides "conversations" reaches the reward functions as a keyword argument.
Starts from out/full_sft_<hidden>.pth (or --from_weight reason) and writes out/grpo_<hidden>.pth. Held-out reward
and accuracy (greedy answers to the *_val.jsonl prompts) are printed before and after as "X -> Y".
"""
import argparse
import time

import torch
import torch.distributed as dist
from transformers import GenerationConfig

from model.checkpoint import unwrap
from model.data.jsonl import default_val_path
from model.data.prompts import PromptDataset
from model.device import default_device
from model.training import rewards as reward_lib
from model.training.cli import (HelpFormatter, add_common_args, add_data_args, build_model, exit_on_user_error,
                                start_stage)
from model.training.frozen import frozen_copy
from model.training.losses import group_advantages, grpo_loss, with_aux_loss
from model.training.rollouts import (Rollout, completion_logprobs, correctness, drop_uninformative_groups,
                                     evaluate_rewards, gather_rows, generate_rollout, prompt_batches,
                                     rollout_statistics, rollout_step_count, score_rollout)
from model.training.runtime import all_reduce_mean, barrier, cleanup, print0
from model.training.tracking import write_summary
from model.training.trainer import StepResult, Trainer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    on_gpu = default_device() == "cuda"
    # LR: 1e-6 as in TRL for GPU-sized models; the 4.6M CPU demo model learns the format in 30 steps at 5e-5 and
    # needs 50+ at 1e-5 (held-out reward 0.42 -> 0.53 vs 0.49, docs/grpo.md).
    add_common_args(parser, "grpo", from_weight="full_sft", batch_size=8 if on_gpu else 4,
                    learning_rate=1e-6 if on_gpu else 5e-5, max_seq_len=256, weight_decay=0.0, max_steps=-1,
                    log_interval=1, eval_interval=50, save_interval=100)
    add_data_args(parser, "dataset/demo_grpo.jsonl",
                  'jsonl with "conversations" (ending with a user turn) and any reward columns, e.g. "answer"', None,
                  title="data (--batch_size counts PROMPTS per micro-batch; each gives --num_generations completions; "
                        "--max_seq_len is the longest prompt kept)")
    g = parser.add_argument_group("rollout")
    g.add_argument("--num_generations", type=int, default=8, help="completions per prompt (the group size G)")
    g.add_argument("--max_gen_len", type=int, default=512 if on_gpu else 128, help="completion length limit (tokens)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; the loss's log-probs use the same one (logits / temperature)")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold (1.0: off)")
    g.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens only (0: off)")
    g.add_argument("--mask_truncated_completions", type=int, default=0, choices=[0, 1],
                   help="1: completions that hit --max_gen_len without <|im_end|> get no gradient (DAPO's "
                        "overlong filtering); they still count in the reward metrics")
    g = parser.add_argument_group("rewards")
    g.add_argument("--reward_funcs", default="format,answer",
                   help="comma-separated reward functions: format (strict), soft_format, tag_count, answer, "
                        "reward_model, or module:function / path/to/file.py:function with TRL's signature")
    g.add_argument("--reward_weights", default=None,
                   help="comma-separated weights, one per reward function (default: format-type 0.5, others 1.0)")
    g.add_argument("--reward_model", default=None,
                   help="reward model for open-ended answers (adds the reward_model function): a local transformers "
                        "AutoModelForSequenceClassification directory, or one of our .pth checkpoints holding a "
                        "value head ('score.weight', [1, hidden])")
    g = parser.add_argument_group("GRPO loss")
    g.add_argument("--loss_type", default="dapo", choices=["grpo", "bnpo", "dapo", "dr_grpo", "cispo"],
                   help="how per-token losses are averaged (grpo_loss in model/training/losses.py); dapo = token "
                        "mean over the whole step (TRL's default)")
    g.add_argument("--scale_rewards", default="group", choices=["group", "batch", "none"],
                   help="divide advantages by the group's reward std, the whole batch's, or not at all (Dr. GRPO)")
    g.add_argument("--beta", type=float, default=0.0,
                   help="weight of the k3 KL penalty to the frozen starting model (0: no reference model is loaded; "
                        "DeepSeekMath used 0.04)")
    g.add_argument("--epsilon", type=float, default=0.2, help="lower clip range of the ratio: 1 - epsilon")
    g.add_argument("--epsilon_high", type=float, default=None,
                   help="upper clip range 1 + epsilon_high (default: epsilon; DAPO's clip-higher uses 0.28); "
                        "for cispo the absolute cap on the ratio (default 5)")
    g.add_argument("--delta", type=float, default=None,
                   help="optional cap on the unclipped ratio (INTELLECT-2's two-sided clipping), e.g. 4")
    g.add_argument("--num_iterations", type=int, default=1,
                   help="optimizer steps per rollout batch (mu); > 1 makes the ratio and its clipping matter")
    g.add_argument("--dynamic_sampling", type=int, default=0, choices=[0, 1],
                   help="1: drop groups whose rewards are all equal before the update (DAPO; they have A = 0)")
    g = parser.add_argument_group("held-out evaluation")
    g.add_argument("--eval_samples", type=int, default=256,
                   help="held-out prompts answered greedily per evaluation (0: no held-out evaluation)")
    g.add_argument("--eval_batch_size", type=int, default=64, help="prompts per generate call when evaluating")
    g.add_argument("--show_completions", type=int, default=2, help="print this many held-out answers at the end")
    args = parser.parse_args(argv)
    if args.num_generations < 2:
        parser.error("--num_generations must be at least 2: the group is its own baseline")
    if args.temperature <= 0:
        parser.error("--temperature must be > 0: GRPO needs different samples of the same prompt")
    return args


# ========================================================================================================= loss


def policy_loss(model, rollout: Rollout, args, num_items_in_batch=None) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of one micro-batch of completions (+ the MoE balancing loss)."""
    logps, aux_loss = completion_logprobs(model, rollout, args.temperature)
    loss, metrics = grpo_loss(logps, rollout.old_logps, rollout.ref_logps, rollout.advantages.to(logps.device),
                              rollout.completion_mask, beta=args.beta, epsilon_low=args.epsilon,
                              epsilon_high=args.epsilon_high, loss_type=args.loss_type,
                              max_completion_length=args.max_gen_len, num_items_in_batch=num_items_in_batch,
                              delta=args.delta)
    return with_aux_loss(loss, aux_loss, metrics)


# ========================================================================================================= the loop


class GRPOSteps:
    """GRPO's optimizer steps for the shared Trainer loop: a step collects a rollout (generate, score, advantages)
    when the previous one has been used --num_iterations times, then runs the clipped-surrogate update over its
    micro-batches. The Trainer does the rest (LR, NaN guard, logging, evaluation, checkpoints, SIGTERM); it
    checkpoints only between rollouts, so a resumed run starts with a fresh rollout exactly where the uninterrupted
    run would."""

    def __init__(self, args, trainer: Trainer, runtime, tokenizer, train_set, reward_funcs, reward_names,
                 reward_weights, ref_model=None):
        self.args, self.trainer, self.runtime, self.tokenizer = args, trainer, runtime, tokenizer
        self.train_set, self.ref_model = train_set, ref_model
        self.reward_funcs, self.reward_names, self.reward_weights = reward_funcs, reward_names, reward_weights
        self.prompts_per_step = args.batch_size * args.accumulation_steps
        self.generation_config = GenerationConfig(
            max_new_tokens=args.max_gen_len, do_sample=True, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id)
        needs = f"{args.batch_size} x {args.accumulation_steps} accumulation x {runtime.world_size} ranks"
        self.total_steps = rollout_step_count(len(train_set), runtime, self.prompts_per_step,
                                              args.num_iterations, args, needs)
        self.batches = None  # this rank's prompt batches, created at the first step (after a resume is loaded)
        self.parts, self.stats, self.iteration = None, {}, args.num_iterations
        # Time per phase since the last log line: rollout = generation + rewards + pi_old/pi_ref passes.
        self.window = {"rollout": 0.0, "update": 0.0, "tokens": 0.0, "generation": 0.0}

    @property
    def policy(self):
        """The bare model (generation and no-grad passes bypass DDP)."""
        return unwrap(self.trainer.model)

    def describe(self) -> str:
        args = self.args
        return (f"{len(self.train_set):,} prompts, {self.total_steps:,} optimizer steps: {self.prompts_per_step} "
                f"prompts x {args.num_generations} completions x {self.runtime.world_size} ranks per rollout, "
                f"{args.num_iterations} update(s) per rollout; rewards {self.describe_rewards()}; "
                f"loss {args.loss_type}, beta {args.beta}")

    def describe_rewards(self) -> str:
        return " + ".join(f"{w:g}*{n}" for n, w in zip(self.reward_names, self.reward_weights))

    # ---- one optimizer step: a rollout when the last one is used up, then an update ----------------------------
    def step(self) -> StepResult:
        if self.iteration >= self.args.num_iterations:
            if self.batches is None:
                self.batches = prompt_batches(self.train_set, self.trainer.state, self.args.seed,
                                              self.runtime, self.prompts_per_step)
            started = time.time()
            self.parts, self.stats = self.collect(next(self.batches))
            self.window["rollout"] += time.time() - started
            self.window["tokens"] += self.stats.pop("generated_tokens")
            self.window["generation"] += self.stats.pop("generation_time")
            self.trainer.state.samples_into_epoch += self.prompts_per_step
            self.iteration = 0
        started = time.time()
        result = self.update(self.parts)
        result.metrics.update(iteration=self.iteration, **self.stats)
        self.iteration += 1
        self.window["update"] += time.time() - started
        return result

    def can_checkpoint(self) -> bool:
        return self.iteration >= self.args.num_iterations

    def log_fields(self) -> dict:
        window, spent = self.window, self.window["rollout"] + self.window["update"]
        fields = {"rollout_time": window["rollout"], "update_time": window["update"],
                  "rollout_share": window["rollout"] / max(spent, 1e-9),
                  "generation_tokens_per_sec": window["tokens"] / max(window["generation"], 1e-9)}
        self.window = dict.fromkeys(window, 0.0)
        return fields

    def log_line(self, record: dict, total_steps: int) -> str:
        parts = [f"step {record['step']}/{total_steps}", f"reward {record['reward']:.3f}"]
        parts += [f"{name} {record[f'rewards/{name}/mean']:.3f}" for name in self.reward_names]
        if "accuracy" in record:
            parts.append(f"acc {record['accuracy']:.3f}")
        parts.append(f"len {record['completion_length']:.0f}")
        for key, label in (("kl", "kl"), ("clip_ratio/region_mean", "clip"), ("cispo_clip_ratio", "clip"),
                           ("dropped_groups", "dropped")):
            if key in record:
                parts.append(f"{label} {record[key]:.4g}")
        parts += [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}", f"gnorm {record['grad_norm']:.2f}",
                  f"rollout {record['rollout_time']:.1f}s update {record['update_time']:.1f}s"]
        return " | ".join(parts)

    # ---- 1 + 2: rollout and rewards ------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, items: list[dict]) -> tuple[list[Rollout], dict]:
        """Generate, score, compute advantages (and pi_old / pi_ref log-probs when needed) for one step's prompts.
        Returns the micro-batches to train on and the batch's metrics."""
        args, runtime, G = self.args, self.runtime, self.args.num_generations
        policy = self.policy
        policy.eval()
        parts, started = [], time.time()
        with runtime.autocast():
            for k in range(args.accumulation_steps):
                chunk = items[k * args.batch_size:(k + 1) * args.batch_size]
                parts.append(generate_rollout(policy, self.tokenizer, chunk, G, self.generation_config,
                                              runtime.device))
        generation_time = time.time() - started
        # Rewards of every rank's completions: advantages (batch-scaled ones need the global std) and metrics
        # must be computed over the whole batch, not per rank (else ranks disagree on what "good" means).
        local = []
        for part in parts:
            lengths = part.completion_mask.sum(dim=1).float().cpu()
            ended = (part.completion_ids == self.tokenizer.eos_token_id).any(dim=1)
            local.append(torch.cat([score_rollout(part, self.reward_funcs), correctness(part)[:, None],
                                    lengths[:, None], (~ended).float().cpu()[:, None]], dim=1))
            if args.mask_truncated_completions:  # scored above, but no gradient from a reply cut off mid-way
                part.completion_mask = part.completion_mask * ended[:, None].long()
        table = gather_rows(torch.cat(local), runtime)
        rewards, stats = rollout_statistics(table, self.reward_names, self.reward_weights, G)
        stats["generated_tokens"] = table[:, len(self.reward_names) + 1].sum().item()
        stats["generation_time"] = generation_time
        advantages = group_advantages(rewards, G, args.scale_rewards)
        mine = advantages.view(runtime.world_size, -1)[runtime.rank]
        start = 0
        for part in parts:
            part.advantages = mine[start:start + len(part)].to(runtime.device)
            start += len(part)

        if args.dynamic_sampling:
            local_rewards = rewards.view(runtime.world_size, -1)[runtime.rank]
            parts, dropped = drop_uninformative_groups(parts, local_rewards, G)
            stats["dropped_groups"] = all_reduce_mean(torch.tensor(float(dropped), device=runtime.device),
                                                      runtime).item() * runtime.world_size

        with runtime.autocast():
            for part in parts:
                if args.num_iterations > 1:  # pi_old: the policy that sampled, frozen for all mu updates
                    part.old_logps = completion_logprobs(policy, part, args.temperature)[0]
                if self.ref_model is not None:
                    part.ref_logps = completion_logprobs(self.ref_model, part, args.temperature)[0]
        return parts, stats

    # ---- 3: update -------------------------------------------------------------------------------------------
    def update(self, parts: list[Rollout]) -> StepResult:
        """The forward and backward passes of one optimizer step over all micro-batches of the rollout."""
        args, runtime, trainer = self.args, self.runtime, self.trainer
        trainer.model.train()
        tokens = torch.tensor(float(sum(int(p.completion_mask.sum()) for p in parts)), device=runtime.device)
        local_tokens = int(tokens.item())
        if runtime.distributed:
            dist.all_reduce(tokens)
        # dapo/cispo divide by the step's token count. The engine also divides each micro-batch loss by
        # accumulation_steps, and DDP averages over ranks, so the per-call normaliser is tokens / (ranks * accum).
        num_items = tokens / (runtime.world_size * args.accumulation_steps)
        loss_sum = torch.zeros((), device=runtime.device)
        sums = {}  # kl, ratio, clip fractions...: token-weighted over micro-batches and ranks
        for k, part in enumerate(parts):
            with trainer.engine.no_sync(k == len(parts) - 1), runtime.autocast():
                loss, metrics = policy_loss(trainer.model, part, args, num_items)
            trainer.backward(loss)
            loss_sum += loss.detach().float()
            n = metrics.pop("num_tokens").float()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.float() * n
            sums["num_tokens"] = sums.get("num_tokens", 0.0) + n
        names = sorted(sums)  # the same keys in the same order on every rank, for one all_reduce
        totals = torch.stack([sums[k] for k in names])
        if runtime.distributed:
            dist.all_reduce(totals)
        count = max(totals[names.index("num_tokens")].item(), 1.0)
        metrics = {k: totals[i].item() / count for i, k in enumerate(names) if k != "num_tokens"}
        return StepResult(loss_sum, len(parts), local_tokens, metrics)


# ============================================================================================================ main


def load_prompts(path: str, tokenizer, args, what: str) -> PromptDataset:
    dataset = PromptDataset(path, tokenizer, args.max_seq_len, bool(args.skip_bad_lines))
    print0(f"{what}: {path}: {len(dataset):,} prompts; longer than --max_seq_len {args.max_seq_len}: "
           f"{dataset.stats['dropped_too_long']} dropped; {dataset.stats['bad_lines']} bad lines skipped")
    return dataset


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    runtime, tokenizer = start_stage(args)
    train_set = load_prompts(args.data_path, tokenizer, args, "train")
    val_path = args.val_data_path or default_val_path(args.data_path)
    val_set = load_prompts(val_path, tokenizer, args, "held-out") if val_path and args.eval_samples > 0 else None
    try:
        weights = [float(w) for w in args.reward_weights.split(",")] if args.reward_weights else None
        reward_funcs, reward_names, reward_weights = reward_lib.build_reward_functions(
            args.reward_funcs.split(","), weights, args.reward_model, runtime.device)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    if "answer" in reward_names and not all("answer" in item["columns"] for item in train_set.items):
        raise SystemExit(f'error: the "answer" reward needs an "answer" field on every line of {args.data_path}')

    model, _ = build_model(args, vocab_size=len(tokenizer), dropout=False)
    # The reference is the starting policy, frozen: copied before the Trainer can load resumed weights into `model`.
    ref_model = frozen_copy(model).to(runtime.device) if args.beta != 0.0 else None

    last_answers = []

    def evaluate(model):
        metrics, answers = evaluate_rewards(model, tokenizer, val_set, reward_funcs, reward_names, reward_weights,
                                            runtime, args)
        last_answers[:] = answers
        return metrics

    trainer = Trainer(args, model, runtime, args.save_weight)
    steps = GRPOSteps(args, trainer, runtime, tokenizer, train_set, reward_funcs, reward_names, reward_weights,
                      ref_model)
    before = trainer.evaluate(evaluate, 0) if val_set is not None and not trainer.resumed else None
    after = trainer.run(steps, evaluate if val_set is not None else None)
    if before is not None:
        for key in ("reward", "accuracy", "completion_length"):
            if key in before:
                print0(f"held-out {key} {before[key]:.4f} -> {after[key]:.4f}")
    write_summary(args.save_dir, args.save_weight,
                  {"samples": {prompt: text for prompt, text, _ in last_answers[:4]}}, runtime, merge=True)
    for prompt, text, answer in last_answers[:args.show_completions]:
        print0(f"answer | {prompt!r} -> {text!r} (reference {answer!r})")
    barrier(runtime)
    cleanup(runtime)
    return {"before": before, "after": after, "weights": trainer.weights_file}


if __name__ == "__main__":
    main()
