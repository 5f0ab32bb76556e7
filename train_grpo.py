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
2. Reward. Every reward function in --reward_funcs scores every completion (model/rewards.py; TRL's signature,
   so TRL reward functions plug in); r = sum_j w_j r_j with --reward_weights. Group-relative advantage:
   A_i = (r_i - mean of its group) / (std of its group + 1e-4)   (--scale_rewards group|batch|none)
   No value network: the G siblings are the baseline. A group whose G rewards are all equal has A = 0: nothing to
   learn from it (--dynamic_sampling 1 drops such groups before the update, as DAPO does).
3. Update. --num_iterations optimizer steps on this batch with the clipped surrogate of model/losses.py grpo_loss:
   ratio rho = pi_theta / pi_old per token, loss = -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)
   + beta * KL_k3(pi_theta || pi_ref), aggregated per --loss_type. Log-probs come from logits / temperature (the
   distribution the tokens were sampled from), computed chunk by chunk so no [B, T, vocab] log-softmax is ever
   held. With one iteration pi_old is the current policy (rho == 1 exactly; the gradient is A * grad log pi);
   with more, pi_old's log-probs are computed once right after the rollout. --beta 0 (the default, as in TRL and
   DAPO) loads no reference model at all.

Data: {"conversations": [user turn...], "answer": "..."} per line (MiniMind's rlaif format; a trailing assistant
turn is dropped). Every field besides "conversations" reaches the reward functions as a keyword argument.
Starts from out/full_sft_<hidden>.pth (or --from_weight reason) and writes out/grpo_<hidden>.pth. Held-out reward
and accuracy (greedy answers to the *_val.jsonl prompts) are printed before and after as "X -> Y".
"""
import argparse
import copy
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from transformers import AutoTokenizer, GenerationConfig

from model import rewards as reward_lib
from model.dataset import BadInput, PromptDataset, default_val_path
from model.losses import grpo_loss, group_advantages, token_logprobs
from model.train_utils import (ResumableSampler, Trainer, TrainingDiverged, add_common_args, all_reduce_mean, barrier,
                               before_after, build_model, cleanup, default_device, format_seconds, init_runtime, lr_at,
                               print0, unwrap, write_summary)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = default_device() == "cuda"
    # LR: 1e-6 as in TRL for GPU-sized models; the 4.6M CPU demo model learns the format in 30 steps at 5e-5 and
    # needs 50+ at 1e-5 (held-out reward 0.42 -> 0.53 vs 0.49, README "GRPO").
    add_common_args(parser, "grpo", from_weight="full_sft", batch_size=8 if on_gpu else 4,
                    learning_rate=1e-6 if on_gpu else 5e-5, max_seq_len=256, weight_decay=0.0, max_steps=-1,
                    log_interval=1, eval_interval=50, save_interval=100)
    g = parser.add_argument_group("data (--batch_size counts PROMPTS per micro-batch; each gives --num_generations "
                                  "completions; --max_seq_len is the longest prompt kept)")
    g.add_argument("--data_path", default="dataset/demo_grpo.jsonl",
                   help='jsonl with "conversations" (ending with a user turn) and any reward columns, e.g. "answer"')
    g.add_argument("--val_data_path", default=None,
                   help="held-out prompts for the reward before/after (default: <data>_val.jsonl beside the data)")
    g.add_argument("--tokenizer_path", default="model", help="directory with tokenizer.json / tokenizer_config.json")
    g.add_argument("--skip_bad_lines", type=int, default=0, choices=[0, 1],
                   help="1: skip malformed lines (counted and reported) instead of stopping at the first")
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
                   help="how per-token losses are averaged (model/losses.py grpo_loss); dapo = token mean over "
                        "the whole step (TRL's default)")
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


# ========================================================================================================= rollout


@dataclass
class Rollout:
    """Completions of one micro-batch, group-contiguous: rows i*G .. i*G+G-1 answer prompt i."""
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C] 1 up to and including the first <|im_end|>
    prompts: list  # the conversation of each row (for reward functions)
    columns: dict  # data fields, one value per row
    texts: list = field(default_factory=list)  # decoded completions, without <|im_end|>
    advantages: torch.Tensor | None = None  # [N]
    old_logps: torch.Tensor | None = None  # [N, C] pi_old, when num_iterations > 1
    ref_logps: torch.Tensor | None = None  # [N, C] pi_ref, when beta > 0

    def __len__(self):
        return self.completion_ids.shape[0]

    def select(self, rows: list[int]) -> "Rollout":
        pick = torch.tensor(rows, dtype=torch.long)

        def take(t):
            return None if t is None else t[pick.to(t.device)]
        return replace(self, prompt_ids=take(self.prompt_ids), prompt_mask=take(self.prompt_mask),
                       completion_ids=take(self.completion_ids), completion_mask=take(self.completion_mask),
                       prompts=[self.prompts[i] for i in rows], texts=[self.texts[i] for i in rows],
                       columns={k: [v[i] for i in rows] for k, v in self.columns.items()},
                       advantages=take(self.advantages), old_logps=take(self.old_logps),
                       ref_logps=take(self.ref_logps))


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad on the left, so every row's last prompt token sits in the last column and generation continues all
    rows at once. The attention mask hides the padding; the model derives positions from it (each row's first
    real token is position 0), so a padded row computes exactly what it would alone."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence):] = torch.as_tensor(sequence, dtype=torch.long)
            mask[row, width - len(sequence):] = 1
    return ids, mask


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on every token up to and including the first eos, 0 after it; all 1 if the row never ends (truncated)."""
    is_eos = completion_ids == eos_id
    length = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), torch.full_like(is_eos[:, 0], length,
                                                                                          dtype=torch.long))
    positions = torch.arange(length, device=completion_ids.device)[None, :]
    return (positions <= first_eos[:, None]).long()


def decode_completions(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor, eos_id: int) -> list[str]:
    """Text of each completion without its <|im_end|>. Special tokens are kept: <think>/<answer> ARE special
    tokens of this tokenizer, and skipping them would hide exactly what the format reward looks for."""
    texts = []
    for ids, n in zip(completion_ids.tolist(), mask.sum(dim=1).tolist()):
        ids = ids[:n]
        if ids and ids[-1] == eos_id:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return texts


@torch.no_grad()
def generate_rollout(model, tokenizer, items: list[dict], num_generations: int, generation_config: GenerationConfig,
                     device) -> Rollout:
    """Sample num_generations completions for each prompt item in ONE batched, KV-cached generate call."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [item for item in items for _ in range(num_generations)]
    prompt_ids, prompt_mask = left_pad([item["prompt_ids"] for item in rows], pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation_config)
    completion_ids = output[:, prompt_ids.shape[1]:]
    mask = completion_mask_from_ids(completion_ids, eos_id)
    completion_ids = completion_ids.masked_fill(mask == 0, pad_id)
    keys = sorted({key for item in items for key in item["columns"]})
    columns = {key: [item["columns"].get(key) for item in rows] for key in keys}
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, [item["prompt"] for item in rows], columns,
                   texts=decode_completions(tokenizer, completion_ids, mask, eos_id))


def completion_logprobs(model, rollout: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(completion token | everything before it) [N, C], from logits / temperature, and the MoE aux loss.
    One forward over prompt + completion; only the last C + 1 positions go through the LM head (logits_to_keep),
    and the log-probs are taken chunk by chunk (token_logprobs), never as a [N, C, vocab] log-softmax."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
    completion_len = rollout.completion_ids.shape[1]
    out = model(input_ids, attention_mask=attention_mask, logits_to_keep=completion_len + 1)
    logits = out.logits[:, :-1]  # position t predicts token t + 1: the last prompt position scores completion token 0
    return token_logprobs(logits, rollout.completion_ids, temperature=temperature), out.aux_loss


# ========================================================================================================= rewards


def score_rollout(rollout: Rollout, reward_funcs) -> torch.Tensor:
    """[N, F] rewards per function. Prompts are conversations, so completions go in TRL's conversational form."""
    completions = [[{"role": "assistant", "content": text}] for text in rollout.texts]
    completion_ids = [ids[:n] for ids, n in zip(rollout.completion_ids.tolist(),
                                                rollout.completion_mask.sum(dim=1).tolist())]
    return reward_lib.score(reward_funcs, rollout.prompts, completions, completion_ids, rollout.columns)


def correctness(rollout: Rollout) -> torch.Tensor:
    """1/0 per completion when the data has an "answer" column (accuracy, logged whatever the rewards are), else NaN."""
    answers = rollout.columns.get("answer")
    if answers is None:
        return torch.full((len(rollout),), float("nan"))
    return torch.tensor([float(reward_lib.answers_match(reward_lib.extract_answer(t), a))
                         for t, a in zip(rollout.texts, answers)])


def gather_rows(local: torch.Tensor, runtime) -> torch.Tensor:
    """Concatenate every rank's rows (same row count on every rank), in rank order."""
    if not runtime.distributed:
        return local
    local = local.to(runtime.device).contiguous()
    parts = [torch.empty_like(local) for _ in range(runtime.world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu()


def rollout_statistics(table: torch.Tensor, reward_names: list[str], weights: list[float], num_generations: int):
    """Reward metrics over the whole (all-rank) batch. table columns: rewards per function, correct, length,
    truncated."""
    num_funcs = len(reward_names)
    rewards = reward_lib.combine(table[:, :num_funcs], weights)
    grouped = rewards.view(-1, num_generations)
    stats = {"reward": rewards.mean().item(), "reward_std": grouped.std(dim=1).mean().item(),
             "frac_reward_zero_std": (grouped == grouped[:, :1]).all(dim=1).float().mean().item()}
    for j, name in enumerate(reward_names):
        column = table[:, j]
        stats[f"rewards/{name}/mean"] = column.nanmean().item()
        stats[f"rewards/{name}/std"] = column[~column.isnan()].std().item() if (~column.isnan()).sum() > 1 else 0.0
    correct = table[:, num_funcs]
    if not correct.isnan().all():
        stats["accuracy"] = correct.nanmean().item()
    lengths, truncated = table[:, num_funcs + 1], table[:, num_funcs + 2]
    stats.update(completion_length=lengths.mean().item(), completion_length_max=lengths.max().item(),
                 truncated_ratio=truncated.mean().item())
    return rewards, stats


# ========================================================================================================= loss


def policy_loss(model, rollout: Rollout, args, num_items_in_batch=None) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of one micro-batch of completions (+ the MoE balancing loss)."""
    logps, aux_loss = completion_logprobs(model, rollout, args.temperature)
    loss, metrics = grpo_loss(logps, rollout.old_logps, rollout.ref_logps, rollout.advantages.to(logps.device),
                              rollout.completion_mask, beta=args.beta, epsilon_low=args.epsilon,
                              epsilon_high=args.epsilon_high, loss_type=args.loss_type,
                              max_completion_length=args.max_gen_len, num_items_in_batch=num_items_in_batch,
                              delta=args.delta)
    if aux_loss is not None:
        metrics["aux_loss"] = aux_loss.detach()
        loss = loss + aux_loss
    return loss, metrics


# ========================================================================================================= the loop


class GRPOTrainer:
    """The rollout -> reward -> update loop. The shared Trainer supplies the optimizer, DDP wrapping, mixed
    precision, clipping with the NaN guard, checkpoints/resume and the metrics log; this class only decides what
    one step computes."""

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

    @property
    def policy(self):
        """The bare model (generation and no-grad passes bypass DDP)."""
        return unwrap(self.trainer.model)

    def prompt_batches(self):
        """This rank's prompts, prompts_per_step at a time, in the order fixed by (seed, epoch), resuming mid-epoch
        from the trainer state (ResumableSampler shards the prompts across ranks)."""
        state = self.trainer.state
        while True:
            sampler = ResumableSampler(len(self.train_set), self.args.seed, state.epoch, self.runtime.rank,
                                       self.runtime.world_size, shuffle=True, start=state.samples_into_epoch)
            indices = sampler.indices()
            for start in range(0, len(indices) - self.prompts_per_step + 1, self.prompts_per_step):
                yield [self.train_set[i] for i in indices[start:start + self.prompts_per_step]]
            state.epoch += 1
            state.samples_into_epoch = 0

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
            parts, dropped = self.drop_uninformative_groups(parts, rewards.view(runtime.world_size, -1)[runtime.rank])
            stats["dropped_groups"] = all_reduce_mean(torch.tensor(float(dropped), device=runtime.device),
                                                      runtime).item() * runtime.world_size

        with runtime.autocast():
            for part in parts:
                if args.num_iterations > 1:  # pi_old: the policy that sampled, frozen for all mu updates
                    part.old_logps = completion_logprobs(policy, part, args.temperature)[0]
                if self.ref_model is not None:
                    part.ref_logps = completion_logprobs(self.ref_model, part, args.temperature)[0]
        return parts, stats

    def drop_uninformative_groups(self, parts: list[Rollout], local_rewards: torch.Tensor):
        """DAPO's dynamic sampling, without refilling: groups whose rewards are all equal (A = 0 for all G) are
        removed. A micro-batch left empty keeps one group with an all-zero mask: every rank must still run the same
        number of forward/backward passes for DDP's gradient all-reduce."""
        G, kept, dropped, start = self.args.num_generations, [], 0, 0
        for part in parts:
            rewards = local_rewards[start:start + len(part)].view(-1, G)
            start += len(part)
            informative = ~(rewards == rewards[:, :1]).all(dim=1)
            dropped += int((~informative).sum())
            rows = [g * G + i for g in range(rewards.shape[0]) if informative[g] for i in range(G)]
            if rows:
                kept.append(part.select(rows))
            else:
                empty = part.select(list(range(G)))
                empty.completion_mask = torch.zeros_like(empty.completion_mask)
                kept.append(empty)
        return kept, dropped

    # ---- 3: update -------------------------------------------------------------------------------------------
    def update(self, parts: list[Rollout], total_steps: int, warmup: int) -> dict:
        """One optimizer step over all micro-batches of the rollout."""
        args, runtime, trainer = self.args, self.runtime, self.trainer
        trainer.model.train()
        tokens = torch.tensor(float(sum(int(p.completion_mask.sum()) for p in parts)), device=runtime.device)
        if runtime.distributed:
            dist.all_reduce(tokens)
        # dapo/cispo divide by the step's token count. Trainer.backward also divides each micro-batch loss by
        # accumulation_steps, and DDP averages over ranks, so the per-call normaliser is tokens / (ranks * accum).
        num_items = tokens / (runtime.world_size * args.accumulation_steps)
        loss_sum = torch.zeros((), device=runtime.device)
        sums = {}  # kl, ratio, clip fractions...: token-weighted over micro-batches and ranks
        for k, part in enumerate(parts):
            with trainer.no_sync(k == len(parts) - 1), runtime.autocast():
                loss, metrics = policy_loss(trainer.model, part, args, num_items)
            trainer.backward(loss)
            loss_sum += loss.detach().float()
            n = metrics.pop("num_tokens").float()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.float() * n
            sums["num_tokens"] = sums.get("num_tokens", 0.0) + n
        lr = lr_at(trainer.state.step, total_steps, args.learning_rate, warmup, args.min_lr_ratio)
        grad_norm = trainer.optimizer_step(lr, loss_sum)
        trainer.state.step += 1
        names = sorted(sums)  # the same keys in the same order on every rank, for one all_reduce
        totals = torch.stack([sums[k] for k in names])
        if runtime.distributed:
            dist.all_reduce(totals)
        count = max(totals[names.index("num_tokens")].item(), 1.0)
        record = {"loss": all_reduce_mean(loss_sum / len(parts), runtime).item(), "lr": lr, "grad_norm": grad_norm}
        record.update({k: totals[i].item() / count for i, k in enumerate(names) if k != "num_tokens"})
        return record

    # ---- the loop --------------------------------------------------------------------------------------------
    def train(self, evaluate=None):
        args, runtime, trainer = self.args, self.runtime, self.trainer
        state = trainer.state
        rollouts_per_epoch = len(self.train_set) // runtime.world_size // self.prompts_per_step
        if rollouts_per_epoch == 0:
            raise SystemExit(f"error: {len(self.train_set)} prompts are fewer than one step needs ({args.batch_size} "
                             f"x {args.accumulation_steps} accumulation x {runtime.world_size} ranks)")
        total_steps = rollouts_per_epoch * args.epochs * args.num_iterations
        if args.max_steps > 0:
            total_steps = min(total_steps, args.max_steps) if args.epochs > 0 else args.max_steps
        warmup = args.warmup_steps or max(1, total_steps // 100)
        print0(f"grpo: {len(self.train_set):,} prompts, {total_steps:,} optimizer steps: {self.prompts_per_step} "
               f"prompts x {args.num_generations} completions x {runtime.world_size} ranks per rollout, "
               f"{args.num_iterations} update(s) per rollout; rewards {self.describe_rewards()}; "
               f"loss {args.loss_type}, beta {args.beta}; device {runtime.device}, "
               f"dtype {str(runtime.dtype).replace('torch.', '')}")
        # Time per phase since the last log line: rollout = generation + rewards + pi_old/pi_ref passes.
        window = {"rollout": 0.0, "update": 0.0, "tokens": 0.0, "generation": 0.0}
        run_start = time.time() - state.elapsed
        batches = self.prompt_batches()
        while state.step < total_steps:
            started = time.time()
            parts, stats = self.collect(next(batches))
            window["rollout"] += time.time() - started
            window["tokens"] += stats.pop("generated_tokens")
            window["generation"] += stats.pop("generation_time")
            state.samples_into_epoch += self.prompts_per_step
            for iteration in range(args.num_iterations):
                if state.step >= total_steps:
                    break
                started = time.time()
                record = self.update(parts, total_steps, warmup)
                window["update"] += time.time() - started
                step = state.step
                if step % args.log_interval == 0 or step == total_steps:
                    spent = window["rollout"] + window["update"]
                    record = {"step": step, "epoch": state.epoch, "iteration": iteration, **record, **stats,
                              "rollout_time": window["rollout"], "update_time": window["update"],
                              "rollout_share": window["rollout"] / max(spent, 1e-9),
                              "generation_tokens_per_sec": window["tokens"] / max(window["generation"], 1e-9),
                              "elapsed": time.time() - run_start}
                    self.print_record(record, total_steps)
                    trainer.log.log(record)
                    window = dict.fromkeys(window, 0.0)
                if evaluate is not None and args.eval_interval > 0 and step % args.eval_interval == 0 \
                        and step != total_steps:
                    trainer.evaluate(evaluate, step)
            state.elapsed = time.time() - run_start
            # Checkpoints only between rollouts: a resumed run then starts with a fresh rollout, exactly where the
            # uninterrupted run would.
            if state.step // args.save_interval > (state.step - args.num_iterations) // args.save_interval:
                trainer.save()
        state.elapsed = time.time() - run_start
        final = trainer.evaluate(evaluate, state.step) if evaluate is not None else {}
        trainer.save(final=True)
        if runtime.distributed:
            trainer.check_ranks_in_sync()
        print0(f"grpo done: {state.step} steps in {format_seconds(state.elapsed)}; weights -> {trainer.weights_file}")
        trainer.log.finish()
        return final

    def describe_rewards(self) -> str:
        return " + ".join(f"{w:g}*{n}" for n, w in zip(self.reward_names, self.reward_weights))

    def print_record(self, record: dict, total_steps: int):
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
        print0(" | ".join(parts))


# ===================================================================================================== evaluation


@torch.no_grad()
def evaluate_rewards(model, tokenizer, val_set, reward_funcs, reward_names, reward_weights, runtime,
                     args) -> tuple[dict, list]:
    """Greedy answers to the held-out prompts (this rank's share), scored by the same reward functions. Greedy,
    so the number moves only when the model does, not with sampling luck. Sums are all-reduced across ranks.
    Returns (metrics, [(question, answer text, reference)] of this rank)."""
    config = GenerationConfig(max_new_tokens=args.max_gen_len, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    count = min(len(val_set), args.eval_samples)
    indices = list(range(runtime.rank, count, runtime.world_size))
    num_funcs = len(reward_names)
    sums = torch.zeros(num_funcs + 4, dtype=torch.float64)  # per function, total reward, correct, length, count
    samples = []
    for start in range(0, len(indices), args.eval_batch_size):
        items = [val_set[i] for i in indices[start:start + args.eval_batch_size]]
        rollout = generate_rollout(model, tokenizer, items, 1, config, runtime.device)
        table = score_rollout(rollout, reward_funcs)
        correct = correctness(rollout)
        sums[:num_funcs] += table.nan_to_num(0.0).sum(dim=0).double()
        sums[num_funcs] += reward_lib.combine(table, reward_weights).sum().double()
        sums[num_funcs + 1] += correct.nan_to_num(0.0).sum().double()
        sums[num_funcs + 2] += rollout.completion_mask.sum().double().cpu()
        sums[num_funcs + 3] += len(rollout)
        samples += list(zip([item["prompt"][-1]["content"] for item in items], rollout.texts,
                            [item["columns"].get("answer") for item in items]))
    if runtime.distributed:
        sums = sums.to(runtime.device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    n = max(sums[-1].item(), 1.0)
    metrics = {"reward": sums[num_funcs].item() / n}
    if "answer" in val_set[0]["columns"]:
        metrics["accuracy"] = sums[num_funcs + 1].item() / n
    metrics.update({f"rewards/{name}": sums[j].item() / n for j, name in enumerate(reward_names)})
    metrics["completion_length"] = sums[num_funcs + 2].item() / n
    return metrics, samples


# ============================================================================================================ main


def load_prompts(path: str, tokenizer, args, what: str) -> PromptDataset:
    try:
        dataset = PromptDataset(path, tokenizer, args.max_seq_len, bool(args.skip_bad_lines))
    except (BadInput, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    print0(f"{what}: {path}: {len(dataset):,} prompts; longer than --max_seq_len {args.max_seq_len}: "
           f"{dataset.stats['dropped_too_long']} dropped; {dataset.stats['bad_lines']} bad lines skipped")
    return dataset


def main(argv=None):
    args = parse_args(argv)
    runtime = init_runtime(args.device, args.dtype, args.seed, args.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    train_set = load_prompts(args.data_path, tokenizer, args, "train")
    val_path = args.val_data_path or default_val_path(args.data_path)
    val_set = load_prompts(val_path, tokenizer, args, "held-out") if val_path and args.eval_samples > 0 else None
    try:
        weights = [float(w) for w in args.reward_weights.split(",")] if args.reward_weights else None
        reward_funcs, reward_names, reward_weights = reward_lib.build_reward_functions(
            args.reward_funcs.split(","), weights, args.reward_model, runtime.device)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    if "answer" in reward_names and not all("answer" in item["columns"] for item in train_set.items):
        raise SystemExit(f'error: the "answer" reward needs an "answer" field on every line of {args.data_path}')

    model, _ = build_model(args, vocab_size=len(tokenizer))
    if len(tokenizer) > model.config.vocab_size:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    # The reference is the starting policy, frozen: copied before the Trainer can load resumed weights into `model`.
    ref_model = None
    if args.beta != 0.0:
        ref_model = copy.deepcopy(model).to(runtime.device).eval().requires_grad_(False)

    last_answers = []

    def evaluate(model):
        metrics, answers = evaluate_rewards(model, tokenizer, val_set, reward_funcs, reward_names, reward_weights,
                                            runtime, args)
        last_answers[:] = answers
        return metrics

    trainer = Trainer(args, model, runtime, "grpo")
    grpo = GRPOTrainer(args, trainer, runtime, tokenizer, train_set, reward_funcs, reward_names, reward_weights,
                       ref_model)
    before = trainer.evaluate(evaluate, 0) if val_set is not None and not trainer.resumed else None
    try:
        after = grpo.train(evaluate if val_set is not None else None)
    except TrainingDiverged as error:
        raise SystemExit(f"error: {error}")
    if before is not None:
        for key in ("reward", "accuracy", "completion_length"):
            if key in before:
                print0(f"held-out {key} {before[key]:.4f} -> {after[key]:.4f}")
    write_summary(args.save_dir, args.save_weight,
                  {"stage": "grpo", "weights": trainer.weights_file, "steps": trainer.state.step,
                   "seconds": trainer.state.elapsed, **(before_after(before, after) if before else {}),
                   "samples": {prompt: text for prompt, text, _ in last_answers[:4]}}, runtime)
    for prompt, text, answer in last_answers[:args.show_completions]:
        print0(f"answer | {prompt!r} -> {text!r} (reference {answer!r})")
    barrier(runtime)
    cleanup(runtime)
    return {"before": before, "after": after, "weights": trainer.weights_file}


if __name__ == "__main__":
    main()
