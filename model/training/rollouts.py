"""On-policy rollouts for GRPO (and the RL stages to come): B prompts x G completions sampled in one batched,
KV-cached `generate` call, the completion masks, the log-probs of the sampled tokens, and the rewards and their
batch statistics."""
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from transformers import GenerationConfig

from ..generation import left_pad
from . import rewards as reward_lib
from .schedule import ResumableSampler
from .losses import token_logprobs


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
