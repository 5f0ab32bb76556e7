"""Held-out measurements the stages report as "before -> after": language-model loss, loss per assistant token, and
greedy replies to held-out prompts. Every one is sharded across ranks and reduced, so all ranks agree."""
import functools
import math
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..data.packing import PackedDataset, packed_collate, pad_collate
from ..generation import greedy_generate
from .losses import kd_loss, next_token_losses, target_positions
from .runtime import Runtime, all_reduce_mean, print0
from .schedule import ResumableSampler


# Fewer batches than this finish before a bar would tell the reader anything.
MIN_BATCHES_FOR_BAR = 10


def eval_progress(batches, total: int, runtime: Runtime, dataset, label: str | None = None):
    """`batches` with a progress bar on rank 0, only on a terminal (as the Trainer's bar: in a redirected stdout
    the carriage returns would pile up into the log) and only for long evaluations. `label` says what is being
    evaluated; by default the held-out file's name. leave=False: the finished bar makes way for the training bar
    and the log lines."""
    from tqdm import tqdm
    show = runtime.is_main and total >= MIN_BATCHES_FOR_BAR and sys.stdout.isatty()
    if label is None:
        path = getattr(dataset, "path", None) or getattr(getattr(dataset, "dataset", None), "path", None)
        label = f"eval {os.path.basename(str(path))}" if path else "eval held-out"
    return tqdm(batches, total=total, desc=label, disable=not show, leave=False, dynamic_ncols=True,
                file=sys.stdout, mininterval=0.5)


def batch_count(samples: int, batch_size: int, max_batches: int = 0) -> int:
    """Batches an evaluation runs: all of this rank's samples, or the first max_batches (0: no limit)."""
    count = math.ceil(samples / batch_size)
    return min(count, max_batches) if max_batches else count


@torch.no_grad()
def evaluate_lm_loss(model, dataset, runtime: Runtime, batch_size: int, max_batches: int, collate_fn=None,
                     label: str | None = None) -> float:
    """Mean next-token loss over the first max_batches batches of a held-out dataset (all ranks, then averaged)."""
    sampler = ResumableSampler(len(dataset), 0, 0, runtime.rank, runtime.world_size, shuffle=False)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)
    total, count = torch.zeros((), device=runtime.device), 0
    batches = eval_progress(loader, batch_count(len(sampler), batch_size, max_batches), runtime, dataset, label)
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        batch = {k: v.to(runtime.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        output = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
        total += output.loss.float()
        count += 1
    return all_reduce_mean(total / max(count, 1), runtime).item()


def chat_token_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-position next-token losses [B, T-1] of a chat batch, the mask of assistant targets, and the MoE aux
    loss. Works for packed batches (4D block mask + position ids) and padded ones (2D mask) alike."""
    out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), position_ids=batch.get("position_ids"))
    losses, mask = next_token_losses(out.logits, batch["labels"])
    return losses, mask, out.aux_loss


@torch.no_grad()
def assistant_token_loss(model, dataset, runtime, batch_size: int, max_seq_len: int, max_batches: int = 0,
                         label: str | None = None) -> float:
    """Held-out loss per assistant token: summed over all of them, divided by their number (not a mean of batch
    means, which would weight short batches more). Packed, sharded across ranks, summed across ranks."""
    was_training = model.training
    model.eval()
    packed = PackedDataset(dataset, max_seq_len, seed=0)
    sampler = ResumableSampler(len(packed), 0, 0, runtime.rank, runtime.world_size, shuffle=False)
    loader = DataLoader(packed, batch_size=batch_size, sampler=sampler, collate_fn=packed_collate)
    totals = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    batches = eval_progress(loader, batch_count(len(sampler), batch_size, max_batches), runtime, dataset, label)
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        batch = {k: v.to(runtime.device) for k, v in batch.items()}
        with runtime.autocast():
            losses, mask, _ = chat_token_losses(model, batch)
        totals += torch.stack([losses.sum().double(), mask.sum().double()])
    if runtime.distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    return (totals[0] / totals[1].clamp(min=1)).item()


def held_out_batches(dataset, batch_size: int, max_batches: int, runtime, collate_fn, label: str | None = None):
    """This rank's share of the first max_batches held-out batches, on the device; the same ones every time."""
    sampler = list(range(runtime.rank, len(dataset) - len(dataset) % runtime.world_size, runtime.world_size))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)
    for i, batch in enumerate(eval_progress(loader, batch_count(len(sampler), batch_size, max_batches), runtime,
                                            dataset, label)):
        if i >= max_batches:
            break
        yield {k: v.to(runtime.device) for k, v in batch.items()}


def make_padded_chat_evaluate(args, val_set, runtime, pad_token_id: int, teacher=None, tag_ids=None,
                              batch_size: int | None = None):
    """Held-out evaluation of distillation and reasoning SFT on padded chat batches, per token like every held-out
    loss here (summed over the tokens, divided by their number, over all ranks): the CE on assistant tokens; with a
    teacher also KL(teacher || student) at T = 1 (the distance distillation closes, whatever --temperature or
    --kd_direction trained it); with tag ids also the CE on those tag tokens. `batch_size` chats per batch
    (default --batch_size), at most --eval_batches batches."""
    collate = functools.partial(pad_collate, pad_token_id=pad_token_id)
    batch_size = batch_size or args.batch_size

    def evaluate(model):
        # CE sum, KL sum, tag CE sum, target tokens, tag tokens
        totals = torch.zeros(5, dtype=torch.float64, device=runtime.device)
        for batch in held_out_batches(val_set, batch_size, args.eval_batches, runtime, collate):
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, labels, valid = target_positions(logits, batch["labels"])
            ce = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
            totals[0] += ce.sum().double()
            totals[3] += labels.numel()
            if teacher is not None:
                teacher_logits = teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                totals[1] += kd_loss(logits, teacher_logits[:, :-1][valid], temperature=1.0, direction="forward",
                                     num_items_in_batch=1.0).double()  # the sum over the tokens
            if tag_ids is not None:
                on_tags = torch.isin(labels, tag_ids.to(labels.device))
                totals[2] += ce[on_tags].sum().double()
                totals[4] += on_tags.sum()
        if runtime.distributed:
            dist.all_reduce(totals)
        tokens, tag_tokens = totals[3].clamp(min=1), totals[4].clamp(min=1)
        metrics = {"val_loss": (totals[0] / tokens).item()}
        if teacher is not None:
            metrics["kl_to_teacher"] = (totals[1] / tokens).item()
        if tag_ids is not None:
            metrics["tag_loss"] = (totals[2] / tag_tokens).item()
        return metrics
    return evaluate


def generate_replies(model, tokenizer, conversations: list[list[dict]], runtime, max_new_tokens: int,
                     batch_size: int = 16) -> list[dict]:
    """Greedy replies. Each reply: its text (up to <|im_end|>), its token count, and whether it followed the
    template: ended with <|im_end|> within max_new_tokens, without starting a new <|im_start|> turn or emitting
    <|endoftext|> first."""
    pad, bos, eos = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    replies = []
    for row in greedy_generate(model, tokenizer, conversations, max_new_tokens, batch_size, runtime.autocast):
        end = row.index(eos) if eos in row else len(row)
        body = row[:end]
        followed = end < len(row) and bos not in body and pad not in body
        replies.append({"text": tokenizer.decode(body, skip_special_tokens=True), "tokens": len(body),
                        "ended_with_im_end": followed})
    return replies


def end_of_turn_rate(replies: list[dict]) -> float:
    return sum(r["ended_with_im_end"] for r in replies) / max(1, len(replies))


def describe_metrics(label: str, metrics: dict) -> str:
    return label + ": " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))


def print_changes(before: dict, after: dict, names: list[str]):
    """"name before -> after" for each metric both hold: the line a reader looks for at the end of a stage."""
    for name in names:
        if name in before and name in after:
            print0(f"{name} {before[name]:.4f} -> {after[name]:.4f}")
