"""Stage 4, DPO: teach the SFT model to prefer the chosen answer of each pair over the rejected one.

    python train_dpo.py                                   # demo pairs, from out/full_sft_<hidden>.pth
    python train_dpo.py --precompute_ref 1                # reference log-probs in a first pass: no second model
    python train_dpo.py --data_path dataset/dpo.jsonl --learning_rate 1e-6 --max_seq_len 1024   # MiniMind's data
    torchrun --nproc_per_node 8 train_dpo.py --data_path dataset/dpo.jsonl

Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) needs no reward model and no sampling.
For a prompt x with a chosen answer y_w and a rejected one y_l it minimises

    -log sigmoid(beta * ([log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]))

where log pi(y|x) is the SUM of the answer's token log-probs under the model being trained and pi_ref is the
frozen starting model. The reference keeps the policy close to where it started: the loss only rewards moving
the chosen answer up RELATIVE to the rejected one, compared with what the SFT model already thought. At step 0
policy == reference, so every pair's loss is exactly ln 2 = 0.6931; it falls as the margin opens.

Data: MiniMind's format, {"chosen": [messages], "rejected": [messages]} per line; the two conversations share every
turn before the final assistant answer (the prompt) and differ in that answer. Only the final answer's tokens are
scored. Writes out/dpo_<hidden>.pth (+ config JSON), a resume checkpoint and out/logs/dpo.jsonl with the loss,
the implicit rewards beta * (log pi - log pi_ref) of both answers, their margin and how often chosen wins.
Pairs may carry a "type" string (the demo's say how the rejected answer was made: wrong_sum, looping_reply, ...):
the held-out accuracies are then also reported per type (by_type/<type>/... in the log and out/summaries/dpo.json,
a table at the end and on the report card).
"""
import argparse
import functools

import torch
from torch.utils.data import Subset

from model.data.jsonl import BadInput, default_val_path
from model.data.preference import DPODataset, IndexedPairs, collate_pairs, pair_types
from model.device import default_device
from model.training.cli import (HelpFormatter, add_common_args, add_data_args, build_model, exit_on_user_error,
                                start_stage)
from model.training.evaluation import held_out_batches
from model.training.frozen import frozen_copy, load_frozen_checkpoint
from model.training.losses import dpo_loss, with_aux_loss
from model.training.preference import pair_logps, precompute_reference_logps, reference_logps
from model.training.runtime import all_reduce_mean, cleanup, main_rank_first, print0
from model.training.trainer import Trainer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    on_gpu = default_device() == "cuda"
    # LR: MiniMind's 4e-8 leaves the loss at ln 2 for a whole epoch; TRL's 1e-6 suits billion-parameter models.
    # A model of a few million parameters needs more (measured on the demo: docs/dpo.md).
    # weight_decay 0: decay would pull the policy towards zero rather than towards the reference (TRL's default).
    add_common_args(parser, "dpo", from_weight="full_sft", batch_size=16 if on_gpu else 8,
                    learning_rate=2e-5, weight_decay=0.0, max_seq_len=1024 if on_gpu else 256,
                    eval_interval=100, save_interval=100, log_interval=10, eval_batches=20)
    add_data_args(parser, "dataset/demo_dpo.jsonl",
                  'jsonl of {"chosen": [messages], "rejected": [messages]} pairs sharing their prompt', 0.05)
    g = parser.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1,
                   help="strength of the pull towards the reference: larger keeps the policy closer to it")
    g.add_argument("--loss_type", default="sigmoid", choices=["sigmoid", "ipo", "hinge", "robust"],
                   help="sigmoid: DPO; ipo: squared loss on length-averaged log-ratios; hinge: SLiC; "
                        "robust: unbiased under --label_smoothing label noise")
    g.add_argument("--label_smoothing", type=float, default=0.0,
                   help="assumed share of flipped preference labels (sigmoid: cDPO; robust: rDPO); 0: trust labels")
    g.add_argument("--precompute_ref", type=int, default=0, choices=[0, 1],
                   help="1: score every pair with the reference once, before training, and drop the reference "
                        "model (saves its memory and one forward per step)")
    g.add_argument("--ref_weight", default=None,
                   help="reference model weights (stage name or .pth); default: the --from_weight starting point")
    return parser.parse_args(argv)


# ================================================================================================ data


def load_pairs(args, tokenizer, runtime):
    val_path = args.val_data_path or default_val_path(args.data_path)
    with main_rank_first(runtime):  # rank 0 tokenizes into the cache the others open
        train = DPODataset(args.data_path, tokenizer, args.max_seq_len, bool(args.skip_bad_lines), runtime.is_main)
        if val_path:
            val = DPODataset(val_path, tokenizer, args.max_seq_len, bool(args.skip_bad_lines), runtime.is_main)
    if not val_path:
        if len(train) < 2:  # holding one out would leave nothing to train on
            raise BadInput(f"{args.data_path}: {len(train)} usable pair: too few to hold any out; pass "
                           "--val_data_path")
        held_out = max(1, int(len(train) * args.val_fraction))
        val = Subset(train, range(len(train) - held_out, len(train)))
        train = Subset(train, range(len(train) - held_out))
    for name, dataset in (("train", train), ("held-out", val)):
        stats = (dataset.dataset if isinstance(dataset, Subset) else dataset).stats
        if stats.get("bad_lines") or stats.get("truncated") or stats.get("dropped_no_completion"):
            print0(f"{name} pairs: {stats['bad_lines']} bad lines skipped, {stats['truncated']} answers cut to "
                   f"--max_seq_len, {stats['dropped_no_completion']} pairs dropped (answer cut away entirely)")
    return IndexedPairs(train), IndexedPairs(val)


# ================================================================================================ the reference


def load_reference(args, model, runtime) -> torch.nn.Module:
    """pi_ref: the policy's own starting weights (a frozen copy), or another checkpoint given by --ref_weight."""
    if args.ref_weight is None:
        return frozen_copy(model)
    reference, path = load_frozen_checkpoint(args.ref_weight, args.save_dir, model.config.hidden_size,
                                             args.tokenizer_path, model.config.vocab_size, "reference",
                                             "--ref_weight")
    print0(f"reference model: {path}")
    return reference.to(runtime.device)


def make_loss_fn(args, reference, table: torch.Tensor | None):
    def loss_fn(model, batch):
        chosen, rejected, chosen_n, rejected_n, out = pair_logps(model, batch)
        ref_chosen, ref_rejected = reference_logps(reference, table, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, beta=args.beta, loss_type=args.loss_type,
            label_smoothing=args.label_smoothing, chosen_lengths=chosen_n, rejected_lengths=rejected_n)
        loss = losses.mean()
        metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
                   "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
                   "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
                   "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean(),
                   "tokens": batch["attention_mask"].sum()}
        return with_aux_loss(loss, out.aux_loss, metrics)
    return loss_fn


TYPE_METRICS = ("pairs", "pref_accuracy", "reward_accuracy")


def type_codes(pairs: IndexedPairs) -> tuple[list[str], torch.Tensor]:
    """(the pair types in sorted order, each pair's index into them or -1 for a pair without a type)."""
    types = pair_types(pairs)
    names = sorted({t for t in types if t is not None})
    return names, torch.tensor([names.index(t) if t is not None else -1 for t in types], dtype=torch.long)


def by_type_metrics(names: list[str], totals: torch.Tensor) -> dict:
    """{"by_type/<type>/pairs", ".../pref_accuracy", ".../reward_accuracy"} from per-type rows of (pairs, pairs the
    model prefers the chosen answer of, pairs whose chosen implicit reward is higher)."""
    metrics = {}
    for name, (count, pref, reward) in zip(names, totals.tolist()):
        if count > 0:
            metrics.update({f"by_type/{name}/pairs": round(count), f"by_type/{name}/pref_accuracy": pref / count,
                            f"by_type/{name}/reward_accuracy": reward / count})
    return metrics


def make_evaluate(args, val_set: IndexedPairs, reference, table: torch.Tensor | None, runtime, pad_token_id: int):
    """Held-out metrics. Two views of "does the model prefer the chosen answer":
    preference accuracy / log-prob margin: log pi(chosen) vs log pi(rejected) under the model alone (meaningful
    before training too: the prompt is shared, so this compares the two answers' probabilities directly);
    reward accuracy / margin: DPO's implicit rewards, relative to the reference (all zero at step 0).
    When the pairs carry a "type", both accuracies also per type (by_type/<type>/...), over the same pairs."""
    collate = functools.partial(collate_pairs, pad_token_id=pad_token_id)
    names, codes = type_codes(val_set)
    codes = codes.to(runtime.device)

    def evaluate(model):
        sums, count = torch.zeros(6, device=runtime.device), 0
        per_type = torch.zeros(len(names) + 1, 3, dtype=torch.float64, device=runtime.device)  # last row: no type
        for batch in held_out_batches(val_set, args.batch_size, args.eval_batches, runtime, collate):
            chosen, rejected, chosen_n, rejected_n, _ = pair_logps(model, batch)
            ref_chosen, ref_rejected = reference_logps(reference, table, batch)
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen, rejected, ref_chosen, ref_rejected, beta=args.beta, loss_type=args.loss_type,
                label_smoothing=args.label_smoothing, chosen_lengths=chosen_n, rejected_lengths=rejected_n)
            sums += torch.stack([losses.sum(), (chosen > rejected).float().sum(), (chosen - rejected).sum(),
                                 (chosen_rewards > rejected_rewards).float().sum(),
                                 (chosen_rewards - rejected_rewards).sum(),
                                 (chosen / chosen_n.clamp(min=1) - rejected / rejected_n.clamp(min=1)).sum()]).float()
            count += len(chosen)
            if names:
                rows = codes[batch["index"]]
                rows = torch.where(rows < 0, len(names), rows)
                per_type.index_add_(0, rows, torch.stack([torch.ones_like(chosen), (chosen > rejected).float(),
                                                          (chosen_rewards > rejected_rewards).float()], 1).double())
        means = all_reduce_mean(sums / max(count, 1), runtime).tolist()
        metric_names = ["dpo_loss", "pref_accuracy", "logp_margin", "reward_accuracy", "reward_margin",
                        "logp_per_token_margin"]
        metrics = dict(zip(metric_names, means))
        if names:  # sums over every rank's pairs: the mean of the ranks' sums, times the ranks, is their sum
            per_type = all_reduce_mean(per_type, runtime) * runtime.world_size
            metrics.update(by_type_metrics(names, per_type[:len(names)]))
        return metrics
    return evaluate


def by_type_table(before: dict, after: dict) -> list[str]:
    """Lines of the held-out per-type accuracies, before -> after (empty when the pairs carry no type)."""
    names = sorted({k.split("/")[1] for k in after if k.startswith("by_type/")})
    if not names:
        return []
    lines = [f"{'held-out by type':<24} {'pairs':>5}  {'preference accuracy':>20}  {'implicit reward accuracy':>24}"]
    for name in names:
        key = f"by_type/{name}/"
        pref, reward = (before.get(key + "pref_accuracy", float("nan")), after[key + "pref_accuracy"]), \
            (before.get(key + "reward_accuracy", float("nan")), after[key + "reward_accuracy"])
        lines.append(f"{name:<24} {after[key + 'pairs']:>5}  {pref[0]:>11.3f} -> {pref[1]:.3f}  "
                     f"{reward[0]:>15.3f} -> {reward[1]:.3f}")
    return lines


# ================================================================================================ main


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    runtime, tokenizer = start_stage(args)
    train_set, val_set = load_pairs(args, tokenizer, runtime)
    print0(f"data: {len(train_set):,} train / {len(val_set):,} held-out preference pairs")

    model, _ = build_model(args, vocab_size=len(tokenizer), dropout=False)
    model.to(runtime.device)
    pad_id = tokenizer.pad_token_id
    # The reference comes from the STARTING weights, before Trainer may load a resume checkpoint into the policy.
    train_table = val_table = None
    if args.precompute_ref:
        # Before its first step the policy IS the reference: score with it directly, no copy ever exists.
        reference = load_reference(args, model, runtime) if args.ref_weight else model
        print0(f"scoring {len(train_set) + len(val_set):,} pairs with the reference model (--precompute_ref 1)")
        train_table = precompute_reference_logps(reference, train_set, runtime, args.batch_size, pad_id)
        val_table = precompute_reference_logps(reference, val_set, runtime, args.batch_size, pad_id)
        reference = None
    else:
        reference = load_reference(args, model, runtime)

    trainer = Trainer(args, model, runtime, args.save_weight)
    evaluate = make_evaluate(args, val_set, reference, val_table, runtime, pad_id)
    # The same metrics on the first training pairs tell "DPO learned what it was shown" apart from "it generalised".
    probe_set = Subset(train_set, range(min(len(train_set), args.eval_batches * args.batch_size)))
    evaluate_train = make_evaluate(args, probe_set, reference, train_table, runtime, pad_id)
    before = train_before = None
    if not trainer.resumed:
        before = trainer.evaluate(evaluate, 0)
        with torch.no_grad(), runtime.autocast():
            train_before = evaluate_train(model.eval())
        model.train()
    after = trainer.fit(train_set, make_loss_fn(args, reference, train_table),
                        collate_fn=functools.partial(collate_pairs, pad_token_id=pad_id), evaluate=evaluate)
    train_after = None
    if before is not None:
        with torch.no_grad(), runtime.autocast():
            train_after = evaluate_train(model.eval())
        print0(f"training pairs ({len(probe_set)}): preference accuracy {train_before['pref_accuracy']:.3f} -> "
               f"{train_after['pref_accuracy']:.3f}, implicit reward accuracy {train_before['reward_accuracy']:.3f} "
               f"-> {train_after['reward_accuracy']:.3f}, DPO loss {train_before['dpo_loss']:.4f} -> "
               f"{train_after['dpo_loss']:.4f}")
        print0(f"held-out preference accuracy (log pi(chosen) > log pi(rejected)) "
               f"{before['pref_accuracy']:.3f} -> {after['pref_accuracy']:.3f}")
        print0(f"held-out chosen-rejected log-prob margin {before['logp_margin']:.3f} -> {after['logp_margin']:.3f}")
        print0(f"held-out implicit reward accuracy {before['reward_accuracy']:.3f} -> {after['reward_accuracy']:.3f}, "
               f"reward margin {before['reward_margin']:.3f} -> {after['reward_margin']:.3f}, "
               f"DPO loss {before['dpo_loss']:.4f} -> {after['dpo_loss']:.4f}")
        for line in by_type_table(before, after):
            print0(line)
    cleanup(runtime)
    return {"before": before, "after": after, "train_before": train_before, "train_after": train_after,
            "weights": trainer.weights_file}


if __name__ == "__main__":
    main()
