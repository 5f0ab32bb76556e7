"""Stage 1, pretraining: teach a randomly initialised TinyMind to predict the next token of plain text.

    python train_pretrain.py                                  # demo corpus, tiny model, a few minutes on a CPU
    python train_pretrain.py --data_path dataset/pretrain_hq.jsonl --preset small --batch_size 32   # MiniMind data
    torchrun --nproc_per_node 8 train_pretrain.py --data_path dataset/pretrain_hq.jsonl             # 8 GPUs

Reads MiniMind's pretraining format ({"text": ...} per line), tokenizes it once into a cached memmap, packs the
documents into full windows and minimises next-token cross-entropy. Writes out/pretrain_<hidden>[_moe].pth
(+ its config JSON), a resume checkpoint, and a metrics log in out/logs/pretrain.jsonl.
"""
import argparse
import math

import torch
from torch.utils.data import Subset

from model.data.jsonl import default_val_path
from model.data.pretrain import PretrainDataset
from model.device import default_device
from model.training.cli import (HelpFormatter, add_common_args, add_data_args, build_model, exit_on_user_error,
                                start_stage)
from model.training.evaluation import evaluate_lm_loss
from model.training.losses import with_aux_loss
from model.training.runtime import cleanup, main_rank_first, print0
from model.training.tracking import write_summary
from model.training.trainer import Trainer

SAMPLE_PROMPTS = ["《静夜思》 李白\n", "To be, or not to be"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    on_gpu = default_device() == "cuda"
    add_common_args(parser, "pretrain", batch_size=32 if on_gpu else 16, learning_rate=5e-4 if on_gpu else 2e-3,
                    max_seq_len=512 if on_gpu else 256, eval_interval=100, save_interval=200)
    g = add_data_args(parser, "dataset/demo_pretrain.jsonl", "jsonl with a 'text' field per line")
    g.add_argument("--cache_dir", default=None, help="where token caches go (default: <data dir>/.cache)")
    g.add_argument("--sample_tokens", type=int, default=60, help="length of the sample continuation printed at the end")
    args = parser.parse_args(argv)
    return args


def load_datasets(args, tokenizer, runtime):
    """Rank 0 tokenizes (once; later runs reuse the cache), the other ranks wait and then open the cache."""
    val_path = args.val_data_path or default_val_path(args.data_path)
    with main_rank_first(runtime):
        train = PretrainDataset(args.data_path, tokenizer, args.max_seq_len, args.cache_dir,
                                bool(args.skip_bad_lines), show_progress=runtime.is_main)
        if val_path:
            val = PretrainDataset(val_path, tokenizer, args.max_seq_len, args.cache_dir,
                                  bool(args.skip_bad_lines), show_progress=runtime.is_main)
    if not val_path:
        held_out = max(1, int(len(train) * args.val_fraction))
        val = Subset(train, range(len(train) - held_out, len(train)))
        train = Subset(train, range(len(train) - held_out))
    return train, val


def loss_fn(model, batch):
    """Next-token cross-entropy over every position of the packed windows (+ the MoE balancing loss)."""
    out = model(batch["input_ids"], labels=batch["labels"])
    return with_aux_loss(out.loss, out.aux_loss, {})


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    runtime, tokenizer = start_stage(args)
    train_set, val_set = load_datasets(args, tokenizer, runtime)
    corpus = train_set.dataset if isinstance(train_set, Subset) else train_set
    print0(f"data: {corpus.summary['documents']:,} documents, {corpus.summary['tokens']:,} tokens -> "
           f"{len(train_set):,} train / {len(val_set):,} held-out windows of {args.max_seq_len}; per-document padding "
           f"(MiniMind style) would waste {100 * corpus.padding_fraction_if_padded():.1f}% of positions, packing 0%")

    model, _ = build_model(args, vocab_size=len(tokenizer))

    def evaluate(model):
        loss = evaluate_lm_loss(model, val_set, runtime, args.batch_size, args.eval_batches)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    trainer = Trainer(args, model, runtime, args.save_weight)
    before = None if trainer.resumed else trainer.evaluate(evaluate, 0)
    after = trainer.fit(train_set, loss_fn, evaluate=evaluate)
    if before is not None:
        print0(f"held-out loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}")
    samples = show_samples(model, tokenizer, runtime, args.sample_tokens) if runtime.is_main else {}
    write_summary(args.save_dir, args.save_weight, {"samples": samples}, runtime, merge=True)
    cleanup(runtime)
    return {"before": before, "after": after, "weights": trainer.weights_file, "samples": samples}


@torch.no_grad()
def show_samples(model, tokenizer, runtime, max_new_tokens) -> dict:
    model.eval()
    samples = {}
    for prompt in SAMPLE_PROMPTS if max_new_tokens > 0 else []:
        ids = tokenizer(tokenizer.bos_token + prompt, return_tensors="pt", add_special_tokens=False).to(runtime.device)
        with runtime.autocast():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_p=0.9,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        print0(f"sample | {prompt.strip()} -> {text!r}")
        samples[prompt] = text
    return samples


if __name__ == "__main__":
    main()
