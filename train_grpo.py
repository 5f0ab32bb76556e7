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

from model.data.jsonl import default_val_path
from model.data.prompts import PromptDataset
from model.device import default_device
from model.training import rewards as reward_lib
from model.training.cli import (HelpFormatter, add_common_args, add_data_args, add_grpo_loss_args, build_model,
                                check_group_sampling, exit_on_user_error, start_stage)
from model.training.frozen import frozen_copy
from model.training.losses import grpo_loss, with_aux_loss
from model.training.rollouts import (GroupRelativeSteps, Rollout, completion_logprobs, correctness, evaluate_rewards,
                                     gather_rows, generate_rollout, report_run_end, rollout_statistics, score_rollout)
from model.training.runtime import barrier, cleanup, print0
from model.training.trainer import Trainer


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
    add_grpo_loss_args(parser)
    g = parser.add_argument_group("held-out evaluation")
    g.add_argument("--eval_samples", type=int, default=256,
                   help="held-out prompts answered greedily per evaluation (0: no held-out evaluation)")
    g.add_argument("--eval_batch_size", type=int, default=64, help="prompts per generate call when evaluating")
    g.add_argument("--show_completions", type=int, default=2, help="print this many held-out answers at the end")
    args = parser.parse_args(argv)
    check_group_sampling(parser, args)
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


class GRPOSteps(GroupRelativeSteps):
    """GRPO's optimizer steps for the shared Trainer loop (GroupRelativeSteps): a rollout is one batched generate
    call per micro-batch, scored by the reward functions. Its log lines also time generation alone, in tokens per
    second."""

    window_keys = ("rollout", "update", "tokens", "generation")  # + generated tokens and the seconds it took

    def describe(self) -> str:
        args = self.args
        return (f"{len(self.train_set):,} prompts, {self.total_steps:,} optimizer steps: {self.prompts_per_step} "
                f"prompts x {args.num_generations} completions x {self.runtime.world_size} ranks per rollout, "
                f"{args.num_iterations} update(s) per rollout; rewards {self.describe_rewards()}; "
                f"loss {args.loss_type}, beta {args.beta}")

    def log_fields(self) -> dict:
        window, spent = self.window, self.window["rollout"] + self.window["update"]
        fields = super().log_fields()
        fields.update(rollout_share=window["rollout"] / max(spent, 1e-9),
                      generation_tokens_per_sec=window["tokens"] / max(window["generation"], 1e-9))
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
    def sample(self, policy, items: list[dict]) -> tuple[list[Rollout], torch.Tensor, dict]:
        """G completions per prompt, one generate call per micro-batch, scored by every reward function."""
        args, runtime, G = self.args, self.runtime, self.args.num_generations
        parts, started = [], time.time()
        with runtime.autocast():
            for chunk in self.prompt_chunks(items):
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
        self.window["tokens"] += table[:, len(self.reward_names) + 1].sum().item()
        self.window["generation"] += generation_time
        return parts, rewards, stats

    # ---- 3: update -------------------------------------------------------------------------------------------
    def logprobs(self, model, part: Rollout) -> torch.Tensor:
        return completion_logprobs(model, part, self.args.temperature)[0]

    def loss(self, model, part: Rollout, num_items_in_batch) -> tuple[torch.Tensor, dict]:
        return policy_loss(model, part, self.args, num_items_in_batch)


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
    report_run_end(args, runtime, before, after, ("reward", "accuracy", "completion_length"),
                   ((prompt, text) for prompt, text, _ in last_answers),
                   [f"answer | {prompt!r} -> {text!r} (reference {answer!r})"
                    for prompt, text, answer in last_answers[:args.show_completions]])
    barrier(runtime)
    cleanup(runtime)
    return {"before": before, "after": after, "weights": trainer.weights_file}


if __name__ == "__main__":
    main()
