"""Stage 2, supervised fine-tuning (SFT): teach the pretrained model to hold a conversation.

    python train_full_sft.py                            # demo chats, from out/pretrain_<hidden>.pth, minutes on a CPU
    python train_full_sft.py --data_path dataset/sft_mini_512.jsonl --batch_size 16     # MiniMind's SFT data
    torchrun --nproc_per_node 8 train_full_sft.py --data_path dataset/sft_512.jsonl     # 8 GPUs

Pretraining taught the model to continue text. SFT shows it conversations and trains it to produce only the
assistant's side of them:

- Data: MiniMind's format, one {"conversations": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} per
  line. Each conversation is rendered with the tokenizer's ChatML chat template
  (`<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>\\n`). An assistant message's
  "reasoning_content" is rendered as `<think>\\n...\\n</think>\\n\\n` before its answer and trained on like the answer.
- Loss: next-token cross-entropy on the assistant tokens only: every assistant reply and its closing <|im_end|>
  (so the model learns to stop), never the system/user text or the role headers. The mask comes from the chat
  template's own {% generation %} blocks, token by token (model/dataset.py SFTDataset).
- Too long: a conversation longer than --max_seq_len is dropped (`--truncation drop`, the default: a reply cut
  mid-sentence would teach the model to stop without <|im_end|>), or cut to its first max_seq_len tokens
  (`--truncation keep_prefix`: what MiniMind does; the cut reply then has no <|im_end|> to learn).
- Packing (`--packing 1`, the default): conversations are short (the demo's average 60 tokens, max_seq_len 512), so
  padding each one to max_seq_len as MiniMind does spends most of the compute on padding. Several conversations
  share one row instead; a block-diagonal attention mask keeps each one from seeing the others and position ids
  restart at 0 for each, so every conversation's loss is exactly what it would be alone (tests/test_sft.py).
  `--batch_size` then counts packed rows of up to max_seq_len tokens. `--packing 0` pads each batch to its longest.

Starts from out/pretrain_<hidden>[_moe].pth (`--from_weight pretrain`) and writes out/full_sft_<hidden>[_moe].pth.
At the end it prints held-out metrics as "metric before -> after": the assistant-token loss, and the share of
greedy replies to held-out prompts that follow the template and end with <|im_end|>.
"""
import argparse
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from model.dataset import (BadInput, PackedDataset, SFTDataset, default_val_path, iter_conversations, packed_collate,
                           pad_collate)
from model.train_utils import (ResumableSampler, Trainer, TrainingDiverged, add_common_args, before_after, build_model,
                               cleanup, default_device, init_runtime, main_rank_first, print0, write_summary)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = default_device() == "cuda"
    add_common_args(parser, "full_sft", from_weight="pretrain", epochs=2,
                    batch_size=16 if on_gpu else 8, learning_rate=2e-4 if on_gpu else 1e-3, max_seq_len=512,
                    eval_interval=100, save_interval=200)
    add_chat_data_args(parser, data_path="dataset/demo_sft.jsonl")
    args = parser.parse_args(argv)
    if args.preset is None and args.hidden_size is None and args.from_weight == "none":
        args.preset = "small" if on_gpu else "tiny"
    return args


def add_chat_data_args(parser, data_path: str):
    """The data flags of every stage that trains on conversations (SFT, LoRA)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data_path", default=data_path, help='jsonl with a "conversations" list per line')
    g.add_argument("--val_data_path", default=None,
                   help="held-out conversations (default: <data>_val.jsonl beside the data if it exists, else "
                        "--val_fraction of the data)")
    g.add_argument("--val_fraction", type=float, default=0.01,
                   help="share of the conversations held out (at random, --seed) when there is no validation file")
    g.add_argument("--tokenizer_path", default="model", help="directory with tokenizer.json / tokenizer_config.json")
    g.add_argument("--skip_bad_lines", type=int, default=0, choices=[0, 1],
                   help="1: skip malformed lines (counted and reported) instead of stopping at the first")
    g.add_argument("--truncation", default="drop", choices=["drop", "keep_prefix"],
                   help="conversations longer than max_seq_len: drop them, or keep their first max_seq_len tokens")
    g.add_argument("--packing", type=int, default=1, choices=[0, 1],
                   help="1: pack several conversations per row (block-diagonal attention); 0: one per row, padded")
    g.add_argument("--eval_prompts", type=int, default=64,
                   help="held-out prompts answered greedily before and after training (0: skip generation)")
    g.add_argument("--max_new_tokens", type=int, default=128, help="reply length limit for those answers")
    g.add_argument("--show_replies", type=int, default=3, help="print this many of the final held-out replies")
    return g


# ============================================================================================================ data


def load_chat_dataset(path: str, tokenizer, args, runtime, what: str) -> SFTDataset:
    """Tokenize a conversation file (errors name path:line) and report what was dropped or cut. Shared by SFT, LoRA
    and distillation (which has no --truncation flag: it drops what is too long)."""
    try:
        with main_rank_first(runtime):  # rank 0 tokenizes into the cache the others open
            dataset = SFTDataset(path, tokenizer, args.max_seq_len, bool(args.skip_bad_lines),
                                 getattr(args, "truncation", "drop"), show_progress=runtime.is_main)
    except (BadInput, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    lengths = dataset.lengths()
    stats = dataset.stats
    print0(f"{what}: {path}: {len(dataset):,} conversations, {int(lengths.sum()):,} tokens (mean {lengths.mean():.0f}, "
           f"max {lengths.max()}); longer than {args.max_seq_len}: {stats['dropped_too_long']} dropped, "
           f"{stats['truncated']} cut; {stats['bad_lines']} bad lines skipped")
    return dataset


class ChatCollate:
    """Packed rows or padded conversations -> a batch that also says how many real (non-padding) tokens it holds,
    so the Trainer's tokens/s counts work done, not padding. A class rather than a closure: DataLoader workers
    may need to pickle it."""

    def __init__(self, packed: bool, pad_token_id: int):
        self.packed, self.pad_token_id = packed, pad_token_id

    def __call__(self, items):
        batch = (packed_collate if self.packed else pad_collate)(items, self.pad_token_id)
        batch["tokens"] = sum(len(item["input_ids"]) for item in items)
        return batch


def training_batches(dataset: SFTDataset, args, pad_token_id: int):
    """(dataset, collate_fn) for the Trainer: packed rows, or one conversation per row padded to the batch max."""
    if args.packing:
        return PackedDataset(dataset, args.max_seq_len, seed=args.seed), ChatCollate(True, pad_token_id)
    return dataset, ChatCollate(False, pad_token_id)


class LengthsOnly:
    """Stands in for a dataset when only its sample lengths matter (PackedDataset bins by length)."""

    def __init__(self, lengths):
        self._lengths = np.asarray(lengths)

    def lengths(self):
        return self._lengths


def padding_fractions(lengths, max_seq_len: int, batch_size: int, seed: int = 0) -> dict:
    """Share of the positions in a training batch that are padding, for the three ways of batching chats:
    each padded to max_seq_len (MiniMind), padded to the longest in its random batch, or packed (PackedDataset's
    bins, a batch padded to its longest bin). Packed batches hold batch_size rows of up to max_seq_len tokens."""
    lengths = np.minimum(np.asarray(lengths), max_seq_len)
    real = lengths.sum()
    rng = np.random.default_rng(seed)

    def padded_positions(row_lengths, rows_per_batch):
        order = rng.permutation(len(row_lengths))
        batches = [row_lengths[order[i:i + rows_per_batch]] for i in range(0, len(order), rows_per_batch)]
        return sum(len(b) * b.max() for b in batches)

    bins = PackedDataset(LengthsOnly(lengths), max_seq_len, seed=seed).bins
    bin_lengths = np.asarray([lengths[b].sum() for b in bins])
    return {"pad_to_max_seq_len": float(1 - real / (len(lengths) * max_seq_len)),
            "pad_to_batch_max": float(1 - real / padded_positions(lengths, batch_size)),
            "packed": float(1 - real / padded_positions(bin_lengths, batch_size)),
            "conversations_per_row": len(lengths) / len(bins)}


def minimind_like_lengths(count: int = 4000, seed: int = 0) -> np.ndarray:
    """Synthetic token lengths shaped like MiniMind's sft_mini_512 (conversations kept under 512 tokens): a
    log-normal with median 200 tokens, clipped to [16, 512]. An assumption, not a measurement of that file."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=math.log(200), sigma=0.6, size=count), 16, 512).astype(int)


# ============================================================================================================ loss


def token_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-position next-token losses [B, T-1] (0 where the label is -100), the target mask, and the MoE aux loss.
    Works for packed batches (4D block mask + position ids) and padded ones (2D mask) alike."""
    out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"))
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                             reduction="none").view_as(targets)
    return losses, targets != -100, out.aux_loss


def sft_loss(model, batch):
    """Mean loss over the batch's assistant tokens (+ the MoE balancing loss); the Trainer's loss_fn."""
    losses, mask, aux_loss = token_losses(model, batch)
    loss = losses.sum() / mask.sum().clamp(min=1)
    metrics = {"tokens": batch["tokens"]} if "tokens" in batch else {}
    if aux_loss is not None:
        metrics.update(lm_loss=loss.detach(), aux_loss=aux_loss.detach())
        loss = loss + aux_loss
    return loss, metrics


@torch.no_grad()
def assistant_token_loss(model, dataset, runtime, batch_size: int, max_seq_len: int, max_batches: int = 0) -> float:
    """Held-out loss per assistant token: summed over all of them, divided by their number (not a mean of batch
    means, which would weight short batches more). Packed, sharded across ranks, summed across ranks."""
    was_training = model.training
    model.eval()
    packed = PackedDataset(dataset, max_seq_len, seed=0)
    sampler = ResumableSampler(len(packed), 0, 0, runtime.rank, runtime.world_size, shuffle=False)
    loader = DataLoader(packed, batch_size=batch_size, sampler=sampler, collate_fn=packed_collate)
    totals = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batch = {k: v.to(runtime.device) for k, v in batch.items()}
        with runtime.autocast():
            losses, mask, _ = token_losses(model, batch)
        totals += torch.stack([losses.sum().double(), mask.sum().double()])
    if runtime.distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    return (totals[0] / totals[1].clamp(min=1)).item()


# ====================================================================================================== generation


def load_chats_with_held_out(args, tokenizer, runtime) -> tuple[SFTDataset, SFTDataset, str, set | None]:
    """(train, held-out, the held-out file, its lines or None for all): the held-out set is the _val.jsonl beside
    the data, or --val_fraction of the data itself when there is none (as with MiniMind's files)."""
    train = load_chat_dataset(args.data_path, tokenizer, args, runtime, "train")
    val_path = args.val_data_path or default_val_path(args.data_path)
    if val_path:
        return train, load_chat_dataset(val_path, tokenizer, args, runtime, "held-out"), val_path, None
    try:
        val = train.split_held_out(args.val_fraction, args.seed)
    except BadInput as error:
        raise SystemExit(f"error: {error}; pass --val_data_path")
    print0(f"held-out: no _val.jsonl beside {args.data_path}, so {len(val):,} of its conversations chosen at random "
           f"(--val_fraction {args.val_fraction}) are held out")
    return train, val, args.data_path, set(val.line_numbers.tolist())


def write_chat_summary(args, before: dict, after: dict, prompts: list, runtime):
    """Add the before/after metrics and the first four held-out replies to out/summaries/<name>.json (the report)."""
    samples = {m[-1]["content"]: r["text"] for (m, _), r in list(zip(prompts, after.get("replies", [])))[:4]}
    write_summary(args.save_dir, args.save_weight, {**before_after(before, after), "samples": samples}, runtime,
                  merge=True)


def held_out_prompts(path: str, count: int, lines: set | None = None) -> list[tuple[list[dict], str]]:
    """(conversation up to the last assistant turn, that turn's reference reply) for the first `count`
    conversations of a held-out file (of its `lines` only, if given)."""
    prompts = []
    for messages in iter_conversations(path, lines):
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last == 0:
            continue  # nothing to prompt with
        prompts.append((messages[:last], messages[last]["content"]))
        if len(prompts) >= count:
            break
    return prompts


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: list[list[dict]], runtime, max_new_tokens: int,
                     batch_size: int = 16) -> list[dict]:
    """Greedy replies, batched with left padding. Each reply: its text (up to <|im_end|>), its token count, and
    whether it followed the template: ended with <|im_end|> within max_new_tokens, without starting a new
    <|im_start|> turn or emitting <|endoftext|> first."""
    was_training = model.training
    model.eval()
    pad, bos, eos = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    replies = []
    for start in range(0, len(conversations), batch_size):
        prompts = [tokenizer.apply_chat_template(c, tokenize=True, add_generation_prompt=True, return_dict=True)
                   ["input_ids"] for c in conversations[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=runtime.device)
        attention_mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None])
        with runtime.autocast():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask.long().to(runtime.device),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=pad)
        for row in out[:, width:].tolist():
            end = row.index(eos) if eos in row else len(row)
            body = row[:end]
            followed = end < len(row) and bos not in body and pad not in body
            replies.append({"text": tokenizer.decode(body, skip_special_tokens=True), "tokens": len(body),
                            "ended_with_im_end": followed})
    model.train(was_training)
    return replies


def end_of_turn_rate(replies: list[dict]) -> float:
    return sum(r["ended_with_im_end"] for r in replies) / max(1, len(replies))


# ============================================================================================================ main


def chat_metrics(model, tokenizer, val_set, prompts, runtime, args) -> dict:
    """Held-out assistant-token loss, plus (on rank 0, when prompts are given) greedy replies and their
    end-of-turn rate."""
    metrics = {"val_loss": assistant_token_loss(model, val_set, runtime, args.batch_size, args.max_seq_len)}
    if prompts and runtime.is_main:
        replies = generate_replies(model, tokenizer, [p for p, _ in prompts], runtime, args.max_new_tokens)
        metrics["end_of_turn_rate"] = end_of_turn_rate(replies)
        metrics["mean_reply_tokens"] = sum(r["tokens"] for r in replies) / len(replies)
        metrics["replies"] = replies
    return metrics


def describe_metrics(label: str, metrics: dict) -> str:
    return label + ": " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))


def print_changes(before: dict, after: dict, names: list[str]):
    for name in names:
        if name in before and name in after:
            print0(f"{name} {before[name]:.4f} -> {after[name]:.4f}")


def main(argv=None):
    args = parse_args(argv)
    runtime = init_runtime(args.device, args.dtype, args.seed, args.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    train_chats, val_chats, val_path, val_lines = load_chats_with_held_out(args, tokenizer, runtime)
    pad = padding_fractions(train_chats.lengths(), args.max_seq_len, args.batch_size, args.seed)
    synthetic = padding_fractions(minimind_like_lengths(), args.max_seq_len, args.batch_size, args.seed)
    for label, p in (("this data", pad), ("sft_mini_512-like lengths (synthetic)", synthetic)):
        print0(f"padding share on {label}: per-sample to max_seq_len {100 * p['pad_to_max_seq_len']:.1f}% (MiniMind), "
               f"to batch max {100 * p['pad_to_batch_max']:.1f}%, packed {100 * p['packed']:.1f}% "
               f"({p['conversations_per_row']:.1f} conversations per row)")
    train_set, collate_fn = training_batches(train_chats, args, tokenizer.pad_token_id)
    if args.packing:
        print0(f"packing: {len(train_chats):,} conversations -> {len(train_set):,} rows of up to {args.max_seq_len} "
               f"tokens ({100 * train_set.fill_ratio():.1f}% full); --batch_size counts rows")

    model, _ = build_model(args, vocab_size=len(tokenizer))
    if len(tokenizer) > model.config.vocab_size:
        raise SystemExit(f"tokenizer has {len(tokenizer)} tokens, the model's vocab_size is {model.config.vocab_size}")
    prompts = held_out_prompts(val_path, args.eval_prompts, val_lines) if args.eval_prompts > 0 else []

    def evaluate(model):
        return {"val_loss": assistant_token_loss(model, val_chats, runtime, args.batch_size, args.max_seq_len,
                                                 args.eval_batches)}

    trainer = Trainer(args, model, runtime, "full_sft")
    before = None if trainer.resumed else chat_metrics(model, tokenizer, val_chats, prompts, runtime, args)
    if before is not None:
        print0(describe_metrics("held-out before training", before))
    try:
        trainer.fit(train_set, sft_loss, collate_fn=collate_fn, evaluate=evaluate)
    except TrainingDiverged as error:
        raise SystemExit(f"error: {error}")
    after = chat_metrics(model, tokenizer, val_chats, prompts, runtime, args)
    results = {"after": {k: v for k, v in after.items() if k != "replies"}, "padding": pad,
               "padding_minimind_like": synthetic, "weights": trainer.weights_file}
    if before is not None:
        results["before"] = {k: v for k, v in before.items() if k != "replies"}
        print_changes(before, after, ["val_loss", "end_of_turn_rate", "mean_reply_tokens"])
        write_chat_summary(args, before, after, prompts, runtime)
    for (messages, reference), reply in list(zip(prompts, after.get("replies", [])))[:args.show_replies]:
        print0(f"reply | {messages[-1]['content']!r} -> {reply['text']!r} (reference {reference!r})")
    cleanup(runtime)
    return results


if __name__ == "__main__":
    main()
