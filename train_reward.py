"""Reward model: train a scalar score r(prompt, answer) that ranks the chosen answer of a pair above the rejected.

    python train_reward.py                                # demo pairs, from out/full_sft_<hidden>.pth
    python train_reward.py --center_rewards_coefficient 0.01     # also pull the mean reward towards 0
    python train_reward.py --data_path dataset/dpo.jsonl --learning_rate 1e-5 --max_seq_len 1024   # MiniMind's data
    torchrun --nproc_per_node 8 train_reward.py --data_path dataset/dpo.jsonl

The model is the SFT model's trunk plus one linear head, hidden -> 1, read at the sequence's last real token (what
transformers' *ForSequenceClassification computes, and TRL's RewardTrainer trains). With r_c and r_r the scores of
the chosen and the rejected conversation, the Bradley-Terry loss is

    -log sigmoid(r_c - r_r - margin)  [+ center_rewards_coefficient * (r_c + r_r)^2]

so only differences of rewards matter: at r_c == r_r the loss is ln 2, and a pair is ranked right when r_c > r_r.
`margin` is the pair's "margin" field when the data has one (TRL's), else 0.

Data: the DPO pairs, MiniMind's format {"chosen": [messages], "rejected": [messages]} (and the other layouts DPO
reads). A "type" field (what kind of rejected answer the pair has, as in the demo data) breaks the held-out accuracy
down by type. Pairs longer than --max_seq_len are left out, as TRL does: the score is read at the last token, and a
cut conversation's last token is not its end. Writes out/reward_<hidden>.pth: the model's weights plus
"score.weight" [1, hidden] (+ config JSON), which GRPO reads with --reward_model out/reward_<hidden>.pth; a resume
checkpoint; out/logs/reward.jsonl with the loss, the rewards, their margin and how often chosen wins.
"""
import argparse
import collections
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Subset

from model.data.formats import open_source
from model.data.jsonl import BadInput, default_val_path, location
from model.data.preference import DPODataset, IndexedPairs, collate_pairs
from model.device import default_device
from model.training.cli import (NON_NEGATIVE, HelpFormatter, add_common_args, add_data_args, build_model,
                                exit_on_user_error, start_stage)
from model.training.evaluation import held_out_batches
from model.training.losses import with_aux_loss
from model.training.reward_model import RewardModel, pair_rewards, reward_loss
from model.training.runtime import cleanup, main_rank_first, print0
from model.training.trainer import Trainer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    on_gpu = default_device() == "cuda"
    # LR: on the demo pairs 3e-4 opened a clearer held-out gain than TRL's 1e-4 in one epoch (docs/reward_model.md).
    # weight_decay 0 (TRL's default): decay would pull the SFT trunk towards zero, not towards where it started.
    # eval_batches x batch_size covers the demo's 123 held-out pairs.
    add_common_args(parser, "reward", from_weight="full_sft", batch_size=16 if on_gpu else 8,
                    learning_rate=3e-4, weight_decay=0.0, max_seq_len=1024 if on_gpu else 256,
                    eval_interval=100, save_interval=100, log_interval=10, eval_batches=20)
    add_data_args(parser, "dataset/demo_dpo.jsonl",
                  'jsonl of {"chosen": [messages], "rejected": [messages]} pairs sharing their prompt; optional '
                  '"type" (held-out accuracy is reported per type) and "margin" fields', 0.05)
    g = parser.add_argument_group("reward model")
    g.add_argument("--center_rewards_coefficient", type=NON_NEGATIVE, default=0.0,
                   help="weight of the mean((r_c + r_r)^2) term that pulls rewards towards 0 (TRL's option, "
                        "arXiv 2312.09244; 0.01 recommended there); 0: off, the loss alone leaves the mean free")
    g.add_argument("--use_margin", type=int, default=1, choices=[0, 1],
                   help='1: when the data\'s pairs have a "margin" field, the chosen reward must beat the rejected '
                        "one by at least that much (TRL's RewardTrainer); 0: ignore it")
    return parser.parse_args(argv)


# ================================================================================================ data


@dataclass
class PairSet:
    """Preference pairs with their index (IndexedPairs) and, per index, the data's optional fields."""
    pairs: IndexedPairs
    types: list[str] | None  # the "type" field of each pair, or None when the data has none
    margins: torch.Tensor | None  # the "margin" field of each pair [N], or None


def pair_index(dataset: DPODataset) -> tuple[np.ndarray, np.ndarray]:
    """(file line or record number [N], whole, uncut token lengths [N, 2]) of each pair DPODataset kept, from its
    token cache (which stores chosen and rejected of a pair as two consecutive sequences)."""
    cache = dataset.cache
    rows = np.searchsorted(cache.starts.reshape(-1, 2)[:, 0], dataset.starts[:, 0])
    return cache.line_numbers.reshape(-1, 2)[rows, 0], cache.lengths.reshape(-1, 2)[rows]


def open_pairs(path: str, args, tokenizer, runtime, name: str) -> tuple[Subset, np.ndarray]:
    """The pairs of a file whose both conversations fit in --max_seq_len, and their line numbers."""
    with main_rank_first(runtime):  # rank 0 tokenizes into the cache the others open
        dataset = DPODataset(path, tokenizer, args.max_seq_len, bool(args.skip_bad_lines), runtime.is_main)
    lines, lengths = pair_index(dataset)
    keep = np.flatnonzero((lengths <= args.max_seq_len).all(axis=1))
    stats = dataset.stats
    if stats["bad_lines"] or len(keep) < len(dataset) or stats["dropped_no_completion"]:
        print0(f"{name} pairs: {stats['bad_lines']} bad lines skipped, "
               f"{len(dataset) - len(keep) + stats['dropped_no_completion']} pairs longer than --max_seq_len "
               f"{args.max_seq_len} left out")
    if not len(keep):
        raise BadInput(f"{path}: every pair is longer than --max_seq_len {args.max_seq_len} tokens")
    return Subset(dataset, keep.tolist()), lines[keep]


def read_pair_fields(path: str, line_numbers: np.ndarray, use_margin: bool):
    """(types, margins) of the pairs at `line_numbers` (file lines, or records of a JSON array / parquet file),
    read from the data file itself: the token cache keeps no fields. Only when its first pair has a "type" or
    (with use_margin) a "margin", so a file without them is not read twice. Once the first pair has a margin,
    every pair needs a finite number there: anything else is an error naming its line."""
    source = open_source(path, "dpo", skip_bad_lines=True)
    _, first = next(source.records(skip_bad_lines=True), (None, {}))
    has_type, has_margin = "type" in first, use_margin and "margin" in first
    if not (has_type or has_margin):
        return None, None
    wanted, found = set(line_numbers.tolist()), {}
    for number, record in source.records(skip_bad_lines=True):  # the dataset has already stopped at bad lines
        if number not in wanted:
            continue
        margin = record.get("margin")
        if has_margin and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                           or not math.isfinite(margin)):
            raise BadInput(f"{location(path, number, source.unit)}: \"margin\" is {margin!r}, not a finite number "
                           "(the first pair has one, so every pair needs one; --use_margin 0 ignores them)")
        found[number] = (str(record.get("type", "(no type)")), margin)
    types = [found[n][0] for n in line_numbers.tolist()] if has_type else None
    margins = torch.tensor([float(found[n][1]) for n in line_numbers.tolist()]) if has_margin else None
    return types, margins


def load_pairs(args, tokenizer, runtime) -> tuple[PairSet, PairSet]:
    val_path = args.val_data_path or default_val_path(args.data_path)
    train, train_lines = open_pairs(args.data_path, args, tokenizer, runtime, "train")
    if val_path:
        val, val_lines = open_pairs(val_path, args, tokenizer, runtime, "held-out")
    else:
        if len(train) < 2:  # holding one out would leave nothing to train on
            raise BadInput(f"{args.data_path}: {len(train)} usable pair: too few to hold any out; pass "
                           "--val_data_path")
        held_out = np.zeros(len(train), dtype=bool)  # at random (seeded): a file's tail may be all one kind
        held_out[np.random.default_rng(args.seed).choice(len(train), max(1, int(len(train) * args.val_fraction)),
                                                          replace=False)] = True
        val_rows, train_rows = np.flatnonzero(held_out), np.flatnonzero(~held_out)
        val, val_lines = Subset(train.dataset, [train.indices[i] for i in val_rows]), train_lines[val_rows]
        train, train_lines = Subset(train.dataset, [train.indices[i] for i in train_rows]), train_lines[train_rows]
    sets = []
    for pairs, path, lines in ((train, args.data_path, train_lines), (val, val_path or args.data_path, val_lines)):
        types, margins = read_pair_fields(path, lines, bool(args.use_margin))
        sets.append(PairSet(IndexedPairs(pairs), types, None if margins is None else margins.to(runtime.device)))
    return sets[0], sets[1]


# ================================================================================================ loss, evaluation


def margins_of(pairs: PairSet, batch: dict) -> torch.Tensor | None:
    return None if pairs.margins is None else pairs.margins[batch["index"]]


def make_loss_fn(args, train: PairSet):
    def loss_fn(model, batch):
        chosen, rejected, aux_loss = pair_rewards(model, batch)
        loss = reward_loss(chosen, rejected, margins_of(train, batch), args.center_rewards_coefficient).mean()
        chosen, rejected = chosen.detach(), rejected.detach()
        metrics = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                   "rewards/margin": (chosen - rejected).mean(), "rewards/accuracy": (chosen > rejected).float().mean(),
                   "tokens": batch["attention_mask"].sum()}
        return with_aux_loss(loss, aux_loss, metrics)
    return loss_fn


def make_evaluate(args, dataset, pairs: PairSet, runtime, pad_token_id: int):
    """Pairwise accuracy (r_c > r_r, strict, as TRL), mean margin r_c - r_r, loss (the training objective, with its
    margins and centering) and mean reward over the held-out pairs, summed over all ranks; accuracy also per
    "type" (of the types among the pairs scored). `dataset`: the pairs to score (an IndexedPairs, or a Subset of
    one whose "index" still looks up `pairs`' fields)."""
    collate = functools.partial(collate_pairs, pad_token_id=pad_token_id)
    names = sorted(set(pairs.types)) if pairs.types else []
    type_of = torch.tensor([names.index(t) for t in pairs.types], device=runtime.device) if names else None

    def evaluate(model):
        # one row for all pairs, then one per type; columns: pairs, right, margin, loss, reward (mean of both)
        sums = torch.zeros(1 + len(names), 5, dtype=torch.float64, device=runtime.device)
        for batch in held_out_batches(dataset, args.batch_size, args.eval_batches, runtime, collate):
            chosen, rejected, _ = pair_rewards(model, batch)
            losses = reward_loss(chosen, rejected, margins_of(pairs, batch), args.center_rewards_coefficient)
            rows = torch.stack([torch.ones_like(chosen), (chosen > rejected).float(), chosen - rejected, losses,
                                (chosen + rejected) / 2], dim=1).double()
            sums[0] += rows.sum(dim=0)
            if type_of is not None:
                sums[1:].index_add_(0, type_of[batch["index"]], rows)
        if runtime.distributed:
            dist.all_reduce(sums)
        means = (sums[:, 1:] / sums[:, :1].clamp(min=1)).tolist()
        metrics = dict(zip(["accuracy", "margin", "loss", "reward_mean"], means[0]))
        metrics.update({f"accuracy/{name}": means[1 + i][0] for i, name in enumerate(names) if sums[1 + i, 0] > 0})
        return metrics
    return evaluate


def print_before_after(before: dict, after: dict, counts: collections.Counter, what: str):
    print0(f"{what}: pairwise accuracy (r_chosen > r_rejected) {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
           f"margin r_chosen - r_rejected {before['margin']:.3f} -> {after['margin']:.3f}, "
           f"loss {before['loss']:.4f} -> {after['loss']:.4f}")
    for name in sorted(counts):
        key = f"accuracy/{name}"
        print0(f"  {name:<24} {counts[name]:>5} pairs  accuracy {before[key]:.3f} -> {after[key]:.3f}")


# ================================================================================================ main


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    runtime, tokenizer = start_stage(args)
    train, val = load_pairs(args, tokenizer, runtime)
    print0(f"data: {len(train.pairs):,} train / {len(val.pairs):,} held-out preference pairs"
           + (f"; margins from the data (mean {train.margins.mean().item():.3f})" if train.margins is not None else ""))

    # TRL's disable_dropout: the loss compares two forward passes, which dropout would make noisy.
    language_model, _ = build_model(args, vocab_size=len(tokenizer), dropout=False)
    model = RewardModel(language_model).to(runtime.device)
    pad_id = tokenizer.pad_token_id
    trainer = Trainer(args, model, runtime, args.save_weight)

    evaluate = make_evaluate(args, val.pairs, val, runtime, pad_id)
    # The same metrics on the first training pairs tell "learned what it was shown" apart from "generalised".
    probe = Subset(train.pairs, range(min(len(train.pairs), args.eval_batches * args.batch_size)))
    evaluate_train = make_evaluate(args, probe, train, runtime, pad_id)
    before = train_before = None
    if not trainer.resumed:
        before = trainer.evaluate(evaluate, 0)
        with torch.no_grad(), runtime.autocast():
            train_before = evaluate_train(model.eval())
        model.train()
    after = trainer.fit(train.pairs, make_loss_fn(args, train),
                        collate_fn=functools.partial(collate_pairs, pad_token_id=pad_id), evaluate=evaluate)
    train_after = None
    if before is not None:
        with torch.no_grad(), runtime.autocast():
            train_after = evaluate_train(model.eval())
        evaluated = min(len(val.pairs), args.eval_batches * args.batch_size)
        print_before_after(train_before, train_after, collections.Counter(), f"training pairs ({len(probe)})")
        print_before_after(before, after, collections.Counter(val.types[:evaluated] if val.types else []),
                           f"held-out pairs ({evaluated})")
    cleanup(runtime)
    return {"before": before, "after": after, "train_before": train_before, "train_after": train_after,
            "weights": trainer.weights_file}


if __name__ == "__main__":
    main()
