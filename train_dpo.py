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
"""
import argparse
import copy
import functools

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import AutoTokenizer

from model.dataset import BadInput, DPODataset, default_val_path, dpo_collate
from model.losses import dpo_loss, sequence_logprobs
from model.model import TinyMindForCausalLM
from model.train_utils import (Trainer, TrainingDiverged, add_common_args, all_reduce_mean, build_model, cleanup,
                               default_device, init_runtime, load_state_into, load_weights, main_rank_first,
                               print0, resolve_weight)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = default_device() == "cuda"
    # LR: MiniMind's 4e-8 leaves the loss at ln 2 for a whole epoch; TRL's 1e-6 suits billion-parameter models.
    # A model of a few million parameters needs more (measured on the demo: see README, "DPO").
    # weight_decay 0: decay would pull the policy towards zero rather than towards the reference (TRL's default).
    add_common_args(parser, "dpo", from_weight="full_sft", batch_size=16 if on_gpu else 8,
                    learning_rate=2e-5, weight_decay=0.0, max_seq_len=1024 if on_gpu else 256,
                    eval_interval=100, save_interval=100, log_interval=10, eval_batches=20)
    g = parser.add_argument_group("data")
    g.add_argument("--data_path", default="dataset/demo_dpo.jsonl",
                   help='jsonl of {"chosen": [messages], "rejected": [messages]} pairs sharing their prompt')
    g.add_argument("--val_data_path", default=None,
                   help="held-out pairs (default: <data>_val.jsonl beside the data if it exists, else --val_fraction)")
    g.add_argument("--val_fraction", type=float, default=0.05,
                   help="share of the pairs held out when there is no validation file")
    g.add_argument("--tokenizer_path", default="model", help="directory with tokenizer.json / tokenizer_config.json")
    g.add_argument("--skip_bad_lines", type=int, default=0, choices=[0, 1],
                   help="1: skip malformed pairs (counted and reported) instead of stopping at the first")
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


class IndexedPairs(Dataset):
    """Preference pairs that also carry their own index, so a shuffled batch can look up each pair's
    precomputed reference log-probs."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        return {**self.pairs[index], "index": index}


def collate_pairs(items: list[dict], pad_token_id: int = 0) -> dict:
    """[chosen_1..chosen_B; rejected_1..rejected_B] in one right-padded batch, plus the pair indices."""
    batch = dpo_collate(items, pad_token_id)
    batch["index"] = torch.tensor([item["index"] for item in items])
    return batch


def load_pairs(args, tokenizer, runtime):
    val_path = args.val_data_path or default_val_path(args.data_path)
    with main_rank_first(runtime):  # rank 0 tokenizes into the cache the others open
        train = DPODataset(args.data_path, tokenizer, args.max_seq_len, bool(args.skip_bad_lines), runtime.is_main)
        if val_path:
            val = DPODataset(val_path, tokenizer, args.max_seq_len, bool(args.skip_bad_lines), runtime.is_main)
    if not val_path:
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


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """pi_ref: a copy of the starting weights that never trains. eval() turns dropout off (the reference must be a
    fixed function), requires_grad False keeps it out of autograd and out of the optimizer."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def load_reference(args, model, runtime) -> torch.nn.Module:
    """The policy's own starting weights, or another checkpoint given by --ref_weight."""
    if args.ref_weight is None:
        return frozen_copy(model)
    path = resolve_weight(args.ref_weight, args.save_dir, model.config.hidden_size)
    state, config = load_weights(path)
    if config is None:
        raise SystemExit(f"error: {path} has no config JSON beside it; the reference needs one")
    if config.vocab_size != model.config.vocab_size:
        raise SystemExit(f"error: reference {path} has vocab_size {config.vocab_size}, the policy "
                         f"{model.config.vocab_size}: DPO compares their log-probs token by token")
    reference = TinyMindForCausalLM(config)
    load_state_into(reference, state, path)
    print0(f"reference model: {path}")
    return frozen_copy(reference.to(runtime.device))


def pair_logps(model, batch: dict):
    """Summed answer log-probs of a [chosen; rejected] batch: (chosen [B], rejected [B], chosen and rejected
    token counts, the model output)."""
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    logps, n_tokens = sequence_logprobs(out.logits, batch["labels"])
    chosen, rejected = logps.chunk(2)
    chosen_n, rejected_n = n_tokens.chunk(2)
    return chosen, rejected, chosen_n, rejected_n, out


@torch.no_grad()
def precompute_reference_logps(reference, pairs: IndexedPairs, runtime, batch_size: int,
                               pad_token_id: int = 0) -> torch.Tensor:
    """[N, 2] table of log pi_ref(chosen), log pi_ref(rejected), row i for pair i. Each rank scores every
    world_size-th pair and an all-reduce assembles the full table on every rank."""
    table = torch.zeros(len(pairs), 2, device=runtime.device)
    mine = list(range(runtime.rank, len(pairs), runtime.world_size))
    loader = DataLoader(pairs, batch_size=batch_size, sampler=mine,
                        collate_fn=functools.partial(collate_pairs, pad_token_id=pad_token_id))
    was_training = reference.training
    reference.eval()
    for batch in loader:
        batch = {k: v.to(runtime.device) for k, v in batch.items()}
        with runtime.autocast():
            chosen, rejected, *_ = pair_logps(reference, batch)
        table[batch["index"]] = torch.stack([chosen, rejected], dim=1)
    if runtime.distributed:
        torch.distributed.all_reduce(table)  # every row was filled by exactly one rank, zeros elsewhere
    reference.train(was_training)
    return table


def reference_logps(reference, table: torch.Tensor | None, batch: dict):
    """log pi_ref of the batch's chosen and rejected answers: looked up by pair index, or a forward pass."""
    if table is not None:
        rows = table[batch["index"]]
        return rows[:, 0], rows[:, 1]
    with torch.no_grad():
        chosen, rejected, *_ = pair_logps(reference, batch)
    return chosen, rejected


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
        if out.aux_loss is not None:
            metrics["aux_loss"] = out.aux_loss.detach()
            loss = loss + out.aux_loss
        return loss, metrics
    return loss_fn


def make_evaluate(args, val_set: IndexedPairs, reference, table: torch.Tensor | None, runtime, pad_token_id: int):
    """Held-out metrics. Two views of "does the model prefer the chosen answer":
    preference accuracy / log-prob margin: log pi(chosen) vs log pi(rejected) under the model alone (meaningful
    before training too: the prompt is shared, so this compares the two answers' probabilities directly);
    reward accuracy / margin: DPO's implicit rewards, relative to the reference (all zero at step 0)."""
    sampler = list(range(runtime.rank, len(val_set) - len(val_set) % runtime.world_size, runtime.world_size))
    loader = DataLoader(val_set, batch_size=args.batch_size, sampler=sampler,
                        collate_fn=functools.partial(collate_pairs, pad_token_id=pad_token_id))

    def evaluate(model):
        sums, count = torch.zeros(6, device=runtime.device), 0
        for i, batch in enumerate(loader):
            if i >= args.eval_batches:
                break
            batch = {k: v.to(runtime.device) for k, v in batch.items()}
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
        means = all_reduce_mean(sums / max(count, 1), runtime).tolist()
        names = ["dpo_loss", "pref_accuracy", "logp_margin", "reward_accuracy", "reward_margin",
                 "logp_per_token_margin"]
        return dict(zip(names, means))
    return evaluate


# ================================================================================================ main


def main(argv=None):
    args = parse_args(argv)
    runtime = init_runtime(args.device, args.dtype, args.seed, args.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    try:
        train_set, val_set = load_pairs(args, tokenizer, runtime)
    except (BadInput, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    print0(f"data: {len(train_set):,} train / {len(val_set):,} held-out preference pairs")

    model, _ = build_model(args, vocab_size=len(tokenizer))
    if len(tokenizer) > model.config.vocab_size:
        raise SystemExit(f"error: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
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

    trainer = Trainer(args, model, runtime, "dpo")
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
    try:
        after = trainer.fit(train_set, make_loss_fn(args, reference, train_table),
                            collate_fn=functools.partial(collate_pairs, pad_token_id=pad_id), evaluate=evaluate)
    except TrainingDiverged as error:
        raise SystemExit(f"error: {error}")
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
    cleanup(runtime)
    return {"before": before, "after": after, "train_before": train_before, "train_after": train_after,
            "weights": trainer.weights_file}


if __name__ == "__main__":
    main()
