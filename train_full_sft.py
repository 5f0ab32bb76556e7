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
  template's own {% generation %} blocks, token by token (model/data/chat.py SFTDataset).
- Too long: a conversation longer than --max_seq_len is dropped (`--truncation drop`, the default: a reply cut
  mid-sentence would teach the model to stop without <|im_end|>), or cut to its first max_seq_len tokens
  (`--truncation keep_prefix`: what MiniMind does; the cut reply then has no <|im_end|> to learn).
- Packing (`--packing 1`, the default): conversations are short (the demo's average 60 tokens, max_seq_len 512), so
  padding each one to max_seq_len as MiniMind does spends most of the compute on padding. Several conversations
  share one row instead; a block-diagonal attention mask keeps each one from seeing the others and position ids
  restart at 0 for each, so every conversation's loss is exactly what it would be alone (tests/stages/test_sft.py).
  `--batch_size` then counts packed rows of up to max_seq_len tokens. `--packing 0` pads each batch to its longest.

Starts from out/pretrain_<hidden>[_moe].pth (`--from_weight pretrain`) and writes out/full_sft_<hidden>[_moe].pth.
At the end it prints held-out metrics as "metric before -> after": the assistant-token loss, and the share of
greedy replies to held-out prompts that follow the template and end with <|im_end|>.
"""
import argparse

from model.device import default_device
from model.training.chat import (add_chat_data_args, chat_training_batches, held_out_prompts, load_chats_with_held_out,
                                 write_chat_summary)
from model.training.cli import HelpFormatter, add_common_args, build_model, exit_on_user_error, start_stage
from model.training.evaluation import (assistant_token_loss, chat_token_losses, describe_metrics, end_of_turn_rate,
                                       generate_replies, print_changes)
from model.training.losses import with_aux_loss
from model.training.runtime import cleanup, print0
from model.training.trainer import Trainer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    on_gpu = default_device() == "cuda"
    add_common_args(parser, "full_sft", from_weight="pretrain", epochs=2,
                    batch_size=16 if on_gpu else 8, learning_rate=2e-4 if on_gpu else 1e-3, max_seq_len=512,
                    eval_interval=100, save_interval=200)
    add_chat_data_args(parser, data_path="dataset/demo_sft.jsonl")
    args = parser.parse_args(argv)
    return args


def loss_fn(model, batch):
    """Mean next-token loss over the assistant tokens of the whole optimizer step (+ the MoE balancing loss)."""
    losses, mask, aux_loss = chat_token_losses(model, batch)
    loss = losses.sum() / batch.get("loss_normaliser", mask.sum().clamp(min=1))
    return with_aux_loss(loss, aux_loss, {"tokens": batch["tokens"]} if "tokens" in batch else {})


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


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    runtime, tokenizer = start_stage(args)
    train_chats, val_chats, val_path, val_lines = load_chats_with_held_out(args, tokenizer, runtime)
    train_set, collate_fn = chat_training_batches(train_chats, args, tokenizer.pad_token_id)

    model, _ = build_model(args, vocab_size=len(tokenizer))
    prompts = held_out_prompts(val_path, args.eval_prompts, val_lines) if args.eval_prompts > 0 else []

    def evaluate(model):
        return {"val_loss": assistant_token_loss(model, val_chats, runtime, args.batch_size, args.max_seq_len,
                                                 args.eval_batches)}

    trainer = Trainer(args, model, runtime, args.save_weight)
    before = None if trainer.resumed else chat_metrics(model, tokenizer, val_chats, prompts, runtime, args)
    if before is not None:
        print0(describe_metrics("held-out before training", before))
    trainer.fit(train_set, loss_fn, collate_fn=collate_fn, evaluate=evaluate, token_normalised=True)
    after = chat_metrics(model, tokenizer, val_chats, prompts, runtime, args)
    results = {"after": {k: v for k, v in after.items() if k != "replies"}, "weights": trainer.weights_file}
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
