"""On-policy rollouts for GRPO, agent RL and PPO: B prompts x G completions sampled in one batched, KV-cached
`generate` call, the completion masks, the log-probs of the sampled tokens, the rewards and their batch statistics,
the optimizer steps GRPO and agent RL share (GroupRelativeSteps) and the end-of-run report of every RL stage."""
import itertools
import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from transformers import GenerationConfig

from ..checkpoint import unwrap
from ..generation import left_pad
from . import rewards as reward_lib
from .losses import group_advantages, token_logprobs
from .runtime import all_reduce_mean, print0
from .schedule import ResumableSampler
from .tracking import write_summary
from .trainer import StepResult


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


def drop_uninformative_groups(parts: list[Rollout], local_rewards: torch.Tensor, G: int):
    """DAPO's dynamic sampling, without refilling: groups whose rewards are all equal (A = 0 for all G) are
    removed. A micro-batch left empty keeps one group with an all-zero mask: every rank must still run the same
    number of forward/backward passes for DDP's gradient all-reduce."""
    kept, dropped, start = [], 0, 0
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


def prompt_batches(prompts, state, seed: int, runtime, per_batch: int):
    """This rank's prompts, per_batch at a time, in the order fixed by (seed, epoch), resuming mid-epoch from the
    trainer state (ResumableSampler shards the prompts across ranks); endless, one epoch after another. GRPO, PPO
    and agent RL all draw their rollouts' prompts this way."""
    while True:
        sampler = ResumableSampler(len(prompts), seed, state.epoch, runtime.rank, runtime.world_size, shuffle=True,
                                   start=state.samples_into_epoch)
        indices = sampler.indices()
        for start in range(0, len(indices) - per_batch + 1, per_batch):
            yield [prompts[i] for i in indices[start:start + per_batch]]
        state.epoch += 1
        state.samples_into_epoch = 0


def rollout_step_count(num_prompts: int, runtime, per_rollout: int, steps_per_rollout: int, args, needs: str) -> int:
    """Optimizer steps of an RL run: rollouts per epoch x --epochs x steps per rollout, capped by --max_steps
    (--epochs 0: --max_steps alone). `needs` says what one rollout takes, for the error when there are too few."""
    rollouts_per_epoch = num_prompts // runtime.world_size // per_rollout
    if rollouts_per_epoch == 0:
        raise SystemExit(f"error: {num_prompts} prompts are fewer than one rollout needs ({needs})")
    total = rollouts_per_epoch * args.epochs * steps_per_rollout
    if args.max_steps > 0:
        total = min(total, args.max_steps) if args.epochs > 0 else args.max_steps
    return total


def token_weighted_metrics(micro_metrics: list[dict], runtime) -> dict[str, float]:
    """Per-token means over micro-batches and ranks, so the logged kl or clip fraction ignores how a step is split."""
    sums = {}
    for metrics in micro_metrics:
        n = metrics["num_tokens"].float()
        for key, value in metrics.items():
            if key != "num_tokens":
                sums[key] = sums.get(key, 0.0) + value.float() * n
        sums["num_tokens"] = sums.get("num_tokens", 0.0) + n
    names = sorted(sums)  # the same keys in the same order on every rank, for one all_reduce
    totals = torch.stack([torch.as_tensor(sums[k], device=runtime.device) for k in names])
    if runtime.distributed:
        dist.all_reduce(totals)
    count = max(totals[names.index("num_tokens")].item(), 1.0)
    return {k: totals[i].item() / count for i, k in enumerate(names) if k != "num_tokens"}


class GroupRelativeSteps:
    """The optimizer steps of group-relative policy optimisation for the shared Trainer loop: a step collects a
    rollout (B prompts x G samples, their rewards, group-relative advantages) when the previous one has been used
    --num_iterations times, then runs the clipped-surrogate update over its micro-batches. The Trainer does the rest
    (LR, NaN guard, logging, evaluation, checkpoints, SIGTERM); it checkpoints only between rollouts, so a resumed
    run starts with a fresh rollout exactly where the uninterrupted run would.

    It exists because GRPO (train_grpo.py, one completion per sample) and agent RL (train_agent.py, a multi-turn
    tool-calling episode per sample) differ only in how a step's prompts become samples and a reward table, and in
    which tokens the log-probs cover; the advantages, dynamic sampling, pi_old / pi_ref passes, the token-weighted
    update and its resume rules must stay identical. A subclass supplies `sample`, `logprobs`, `loss`, `describe`
    and `log_line`."""

    # What log_fields sums since the last log line: the seconds of each phase (rollout = sampling + rewards +
    # pi_old/pi_ref passes); a subclass may add keys of its own.
    window_keys = ("rollout", "update")

    def __init__(self, args, trainer, runtime, tokenizer, train_set, reward_funcs, reward_names, reward_weights,
                 ref_model=None):
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
        self.window = dict.fromkeys(self.window_keys, 0.0)

    @property
    def policy(self):
        """The bare model (generation and no-grad passes bypass DDP)."""
        return unwrap(self.trainer.model)

    def describe_rewards(self) -> str:
        return " + ".join(f"{w:g}*{n}" for n, w in zip(self.reward_names, self.reward_weights))

    # ---- what a subclass supplies ------------------------------------------------------------------------------
    def sample(self, policy, items: list[dict]) -> tuple[list[Rollout], torch.Tensor, dict]:
        """Sample G answers to each of this step's prompts with `policy` (in eval mode, no grad) and score them.
        Returns this rank's micro-batches, the combined reward of every rank's samples in rank order, and the
        batch's metrics."""
        raise NotImplementedError

    def logprobs(self, model, part: Rollout) -> torch.Tensor:
        """[N, C] log-probs of the trained tokens of one micro-batch under `model` (pi_old and pi_ref)."""
        raise NotImplementedError

    def loss(self, model, part: Rollout, num_items_in_batch) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch and its metrics, with "num_tokens" among them."""
        raise NotImplementedError

    def prompt_chunks(self, items: list[dict]) -> list[list[dict]]:
        """One step's prompts cut into its --accumulation_steps micro-batches."""
        size = self.args.batch_size
        return [items[k * size:(k + 1) * size] for k in range(self.args.accumulation_steps)]

    # ---- one optimizer step: a rollout when the last one is used up, then an update ----------------------------
    def step(self) -> StepResult:
        if self.iteration >= self.args.num_iterations:
            if self.batches is None:
                self.batches = prompt_batches(self.train_set, self.trainer.state, self.args.seed,
                                              self.runtime, self.prompts_per_step)
            started = time.time()
            self.parts, self.stats = self.collect(next(self.batches))
            self.window["rollout"] += time.time() - started
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
        fields = {"rollout_time": self.window["rollout"], "update_time": self.window["update"]}
        self.window = dict.fromkeys(self.window, 0.0)
        return fields

    @torch.no_grad()
    def collect(self, items: list[dict]) -> tuple[list[Rollout], dict]:
        """Sample and score one step's prompts, then compute advantages (and pi_old / pi_ref log-probs when
        needed). Returns the micro-batches to train on and the batch's metrics."""
        args, runtime, G = self.args, self.runtime, self.args.num_generations
        policy = self.policy
        policy.eval()
        parts, rewards, stats = self.sample(policy, items)
        # From every rank's rewards: batch-scaled advantages need the global std, and ranks must agree on "good".
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
                    part.old_logps = self.logprobs(policy, part)
                if self.ref_model is not None:
                    part.ref_logps = self.logprobs(self.ref_model, part)
        return parts, stats

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
        loss_sum, micro_metrics = torch.zeros((), device=runtime.device), []
        for k, part in enumerate(parts):
            with trainer.engine.no_sync(k == len(parts) - 1), runtime.autocast():
                loss, metrics = self.loss(trainer.model, part, num_items)
            trainer.backward(loss)
            loss_sum += loss.detach().float()
            micro_metrics.append(metrics)
        return StepResult(loss_sum, len(parts), local_tokens, token_weighted_metrics(micro_metrics, runtime))


def report_run_end(args, runtime, before: dict | None, after: dict, keys, samples, shown: list[str]):
    """How every RL stage ends: each held-out metric in `keys` that was measured as "held-out key before -> after"
    (when the run measured a before, i.e. was not resumed), the first four (prompt, answer) pairs of `samples`
    into the run's summary JSON (the report shows them) and the `shown` lines, a few held-out answers, printed."""
    if before is not None:
        for key in keys:
            if key in before:
                print0(f"held-out {key} {before[key]:.4f} -> {after[key]:.4f}")
    write_summary(args.save_dir, args.save_weight, {"samples": dict(itertools.islice(samples, 4))}, runtime,
                  merge=True)
    for line in shown:
        print0(line)
