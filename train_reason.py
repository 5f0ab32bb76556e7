"""Stage 5b, reasoning SFT: teach the chat model to think before it answers (MiniMind's "distill_reason").

    python train_reason.py                                              # demo, from out/full_sft_<hidden>.pth
    python train_reason.py --data_path dataset/r1_mix_1024.jsonl --max_seq_len 1024     # MiniMind's data
    torchrun --nproc_per_node 8 train_reason.py --data_path dataset/r1_mix_1024.jsonl

No teacher model runs here: the replies in the data were written by a reasoning model in the format

    <think>\nhow to get there\n</think>\n<answer>\nthe answer\n</answer>

and this is SFT on them (assistant tokens only, as train_full_sft.py), with one change to the loss: the four tag
tokens are weighted --special_token_weight times (MiniMind: 10), so a small student reliably produces the format
that GRPO's format reward and the answer parser look for. It reports how many greedy replies to held-out prompts
are well formed, and how many answers equal the reference, before and after. Writes out/reason_<hidden>.pth and
out/logs/reason.jsonl.
"""
import argparse
import functools
import re

import torch
import torch.nn.functional as F

from model.data.chat import iter_conversations
from model.data.packing import pad_collate
from model.device import default_device
from model.generation import greedy_generate
from model.training.chat import load_chats_with_held_out
from model.training.cli import (HelpFormatter, add_common_args, add_data_args, build_model, exit_on_user_error,
                                start_stage)
from model.training.evaluation import make_padded_chat_evaluate
from model.training.losses import target_positions, weighted_mean, with_aux_loss
from model.training.runtime import barrier, cleanup, print0
from model.training.tracking import before_after, write_summary
from model.training.trainer import Trainer

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
REASONING_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.S)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    on_gpu = default_device() == "cuda"
    # Supervised training on chats: SFT's learning rates (measured on the demo, docs/sft.md).
    add_common_args(parser, "reason", from_weight="full_sft", batch_size=16, learning_rate=2e-4 if on_gpu else 1e-3,
                    max_seq_len=1024 if on_gpu else 512, eval_interval=100, save_interval=200)
    add_data_args(parser, "dataset/demo_reason.jsonl",
                  "conversations whose assistant replies are <think>...</think><answer>...</answer>", 0.05)
    g = parser.add_argument_group("reasoning SFT")
    g.add_argument("--special_token_weight", type=float, default=10.0,
                   help="loss weight of the <think> </think> <answer> </answer> tokens (MiniMind: 10; 1: plain SFT)")
    g.add_argument("--eval_prompts", type=int, default=48,
                   help="held-out prompts answered greedily before and after, to measure the well-formed rate")
    g.add_argument("--max_new_tokens", type=int, default=128, help="reply length limit for that check")
    args = parser.parse_args(argv)
    return args


def parse_reasoning(reply: str) -> str | None:
    """The answer of a well-formed reply, else None. Well formed: exactly <think>...</think><answer>...</answer>,
    each tag once, neither part empty (small models like to emit stray tags; those replies do not count)."""
    match = REASONING_FORMAT.fullmatch(reply)
    if match is None or any(reply.count(tag) != 1 for tag in TAGS):
        return None
    thinking, answer = match.group(1).strip(), match.group(2).strip()
    return answer if thinking and answer else None


def held_out_prompts(path: str, count: int, lines: set | None = None) -> list[tuple[list[dict], str]]:
    """(prompt messages, reference answer) for the first `count` held-out conversations (in `lines` if given)."""
    prompts = []
    for messages in iter_conversations(path, lines):
        if messages[-1].get("role") != "assistant":
            continue
        prompts.append((messages[:-1], parse_reasoning(messages[-1].get("content", "")) or ""))
        if len(prompts) >= count:
            break
    return prompts


def tag_token_ids(tokenizer) -> list[int]:
    """The ids of <think> </think> <answer> </answer>; each must be ONE token, or weighting it means nothing."""
    ids = []
    for tag in TAGS:
        encoded = tokenizer.encode(tag, add_special_tokens=False)
        if len(encoded) != 1:
            raise SystemExit(f"error: the tokenizer splits {tag} into {len(encoded)} tokens; reasoning SFT needs "
                             "the tags as single tokens (add them as special tokens)")
        ids.append(encoded[0])
    return ids


def tag_weights(labels: torch.Tensor, tag_ids: torch.Tensor, weight: float) -> torch.Tensor:
    """1 on every target token, `weight` on the tag tokens, 0 where labels are ignored (MiniMind's loss_mask)."""
    weights = (labels != -100).float()
    return torch.where(torch.isin(labels, tag_ids), weights * weight, weights)


def make_loss_fn(args, tag_ids: torch.Tensor):
    def loss_fn(model, batch):
        """CE over the assistant tokens with the tag tokens weighted --special_token_weight times."""
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        logits, labels, _ = target_positions(out.logits, batch["labels"])
        tag_ids_here = tag_ids.to(labels.device)
        per_token = F.cross_entropy(logits.float(), labels, reduction="none")  # once, for the loss and both logs
        loss = weighted_mean(per_token, tag_weights(labels, tag_ids_here, args.special_token_weight))
        on_tags = torch.isin(labels, tag_ids_here).float()
        metrics = {"ce": weighted_mean(per_token.detach()), "tag_ce": weighted_mean(per_token.detach(), on_tags),
                   "tokens": batch["attention_mask"].sum()}
        return with_aux_loss(loss, out.aux_loss, metrics)
    return loss_fn


def reasoning_format_rate(model, tokenizer, prompts, runtime, max_new_tokens: int) -> dict:
    """Greedy replies to held-out prompts: the share that are `<think>...</think><answer>...</answer>` and then
    stop, and the share whose answer equals the reference."""
    eos = tokenizer.eos_token_id
    rows = greedy_generate(model, tokenizer, [messages for messages, _ in prompts], max_new_tokens,
                           autocast=runtime.autocast)
    well_formed = correct = 0
    example = None
    for row, (_, reference) in zip(rows, prompts):
        stopped = eos in row
        reply = tokenizer.decode(row[:row.index(eos)] if stopped else row, skip_special_tokens=False)
        answer = parse_reasoning(reply) if stopped else None
        well_formed += answer is not None
        correct += answer is not None and answer == reference
        example = example or reply
    n = max(len(prompts), 1)
    return {"well_formed": well_formed / n, "answer_correct": correct / n, "example": example}


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    runtime, tokenizer = start_stage(args)
    train_set, val_set, val_path, val_lines = load_chats_with_held_out(args, tokenizer, runtime)
    model, _ = build_model(args, vocab_size=len(tokenizer))
    tag_ids = torch.tensor(tag_token_ids(tokenizer))
    evaluate = make_padded_chat_evaluate(args, val_set, runtime, tokenizer.pad_token_id, tag_ids=tag_ids)

    trainer = Trainer(args, model, runtime, args.save_weight)
    prompts = held_out_prompts(val_path, args.eval_prompts, val_lines)
    before = format_before = format_after = None
    if not trainer.resumed:
        before = trainer.evaluate(evaluate, 0)
        if prompts and runtime.is_main:
            format_before = reasoning_format_rate(model, tokenizer, prompts, runtime, args.max_new_tokens)
    after = trainer.fit(train_set, make_loss_fn(args, tag_ids), evaluate=evaluate,
                        collate_fn=functools.partial(pad_collate, pad_token_id=tokenizer.pad_token_id))
    if format_before is not None:
        format_after = reasoning_format_rate(model, tokenizer, prompts, runtime, args.max_new_tokens)
    barrier(runtime)  # the other ranks wait for rank 0's generation
    if before is not None:
        print0(f"held-out loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}")
    if format_before is not None:
        print0(f"well-formed <think>/<answer> replies on {len(prompts)} held-out prompts: "
               f"{format_before['well_formed']:.3f} -> {format_after['well_formed']:.3f}; "
               f"correct answers {format_before['answer_correct']:.3f} -> {format_after['answer_correct']:.3f}")
        print0(f"first held-out reply after training: {format_after['example']!r}")
        write_summary(args.save_dir, args.save_weight, before_after(format_before, format_after), runtime, merge=True)
    cleanup(runtime)
    return {"before": before, "after": after, "format_before": format_before, "format_after": format_after,
            "weights": trainer.weights_file}


if __name__ == "__main__":
    main()
