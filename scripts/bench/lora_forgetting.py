"""Where a LoRA adapter's forgetting is: the general held-out loss before and after the adapter, split by the kind
of chat, and the chats whose loss rose most.

    python -m scripts.bench.lora_forgetting --save_dir out --lora_name lora_identity
    python -m scripts.bench.lora_forgetting --save_dir /tmp/sweep --lora_name lora_replay0.5_s1 --top 10

train_lora.py reports one number, the rise of the mean loss per assistant token over --general_val_path. This splits
that rise by kind of chat (the demo SFT file's kinds, told apart by their first question and reply) and lists the
chats that account for most of it in nats (a long reply weighs as many tokens as it has), as docs/lora.md shows.
"""
import argparse
import json
from collections import defaultdict

import torch

from model.data.chat import SFTDataset
from model.data.jsonl import iter_lines, location, parse_line
from model.inference import load_model_for_inference
from model.training.evaluation import chat_token_losses

KINDS = ["sums worked digit by digit", "poems (next line, author)", "Shakespeare (next line, recitals)",
         "Chinese chats", "English chats"]


def kind_of(messages: list[dict]) -> str:
    question = next(m["content"] for m in messages if m["role"] == "user")
    reply = next((m["content"] for m in messages if m["role"] == "assistant"), "")
    if "<think>" in reply:
        return KINDS[0]
    if any(cue in question for cue in ("下一句", "接着", "接下句", "作者", "谁写", "笔下")):
        return KINDS[1]
    if "Shakespeare" in question or " line " in f" {question} ":
        return KINDS[2]
    return KINDS[3] if any("\u4e00" <= ch <= "\u9fff" for ch in question) else KINDS[4]


def read_chats(path: str) -> dict[int, list[dict]]:
    """Line number -> the chat's messages (to tell its kind; the tokens come from SFTDataset, as in train_lora)."""
    chats = {}
    for number, raw in iter_lines(path):
        record, why = parse_line(raw)
        if why is None and not isinstance(record.get("conversations"), list):
            why = "no \"conversations\" list"
        if why is not None:
            raise SystemExit(f"{location(path, number)}: {why}")
        chats[number] = record["conversations"]
    return chats


@torch.no_grad()
def chat_losses(model, dataset: SFTDataset) -> list[tuple[float, int]]:
    """(summed loss over the assistant tokens, their number) for each chat of the dataset."""
    model.eval()
    results = []
    for i in range(len(dataset)):
        item = dataset[i]
        losses, mask, _ = chat_token_losses(model, {"input_ids": item["input_ids"][None],
                                                    "labels": item["labels"][None]})
        results.append((losses.sum().item(), int(mask.sum())))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save_dir", default="out",
                        help="holds <weight>_<hidden>.pth and lora/<lora_name>_<hidden>.pth")
    parser.add_argument("--weight", default="full_sft", help="the base the adapter was trained on")
    parser.add_argument("--lora_name", required=True, help="the adapter: a name under <save_dir>/lora/ or a path")
    parser.add_argument("--hidden_size", type=int, default=256, help="the checkpoints' width")
    parser.add_argument("--general_val_path", default="dataset/demo_sft_val.jsonl", help="train_lora.py's general "
                                                                                         "held-out chats")
    parser.add_argument("--max_seq_len", type=int, default=512, help="longer chats are left out, as train_lora does")
    parser.add_argument("--top", type=int, default=8, help="how many of the chats whose loss rose most to list")
    args = parser.parse_args(argv)
    chats = read_chats(args.general_val_path)
    common = dict(weight=args.weight, save_dir=args.save_dir, hidden_size=args.hidden_size, dtype="float32",
                  device="cpu", verbose=False)
    base = load_model_for_inference(**common)
    dataset = SFTDataset(args.general_val_path, base.tokenizer, args.max_seq_len, show_progress=False)
    before = chat_losses(base.model, dataset)
    after = chat_losses(load_model_for_inference(**common, lora_name=args.lora_name).model, dataset)

    totals = defaultdict(lambda: [0, 0.0, 0.0, 0])  # kind -> chats, loss before, loss after, tokens
    rises = []
    for line, old, new in zip(dataset.line_numbers, before, after):
        messages = chats[int(line)]
        row = totals[kind_of(messages)]
        row[0], row[1], row[2], row[3] = row[0] + 1, row[1] + old[0], row[2] + new[0], row[3] + old[1]
        rises.append((new[0] - old[0], old[1], messages))
    rise = sum(r[2] - r[1] for r in totals.values())
    tokens = sum(r[3] for r in totals.values())
    old_mean, new_mean = sum(r[1] for r in totals.values()) / tokens, sum(r[2] for r in totals.values()) / tokens
    print(f"general held-out loss {old_mean:.4f} -> {new_mean:.4f} ({new_mean / old_mean - 1:+.1%}): "
          f"{rise:+.1f} nats over {tokens:,} assistant tokens of {len(rises)} chats\n")
    print("| kind of held-out chat | chats | tokens | loss before -> after | share of the rise |")
    print("|---|---|---|---|---|")
    for kind in KINDS:
        if kind in totals:
            count, old, new, n = totals[kind]
            print(f"| {kind} | {count} | {n:,} | {old / n:.3f} -> {new / n:.3f} | {(new - old) / rise:.0%} |")
    print(f"\nthe {args.top} chats whose loss rose most (nats, tokens, first question):")
    for delta, n, messages in sorted(rises, key=lambda r: -r[0])[:args.top]:
        question = next(m["content"] for m in messages if m["role"] == "user")
        print(f"  {delta:+7.1f}  {n:4d}  {json.dumps(question[:60], ensure_ascii=False)}")


if __name__ == "__main__":
    main()
