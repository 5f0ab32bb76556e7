"""Stage 3, LoRA: teach the chat model something new (who it is, a domain) by training small adapters only.

    python train_lora.py                                # identity chats on out/full_sft_<hidden>.pth, minutes on a CPU
    python train_lora.py --lora_name lora_domain --data_path dataset/demo_lora_domain.jsonl
    python train_lora.py --lora_name lora_medical --data_path dataset/lora_medical.jsonl  # MiniMind's LoRA data
    python train_lora.py --merge 1 --export_peft out/peft/lora_identity                  # + merged model, PEFT copy

Same data, template, loss mask and packing as SFT (train_full_sft.py); what differs is what is trained. Every
targeted nn.Linear W of the SFT model (by default the attention and MLP projections) gets a low-rank update
W x + (alpha / r) B A x (model/lora.py); only A and B are trained, the base model stays frozen and its file on disk is
never written. On a MoE model that means attention, dense FFN layers and shared experts get adapters, the routed
experts (stacked 3D parameters, not nn.Linear) do not, and the routers' balancing biases are not updated either, so
base + adapter is exactly the trained model (docs/lora.md, "MoE models"). The result is a small adapter file,
out/lora/<lora_name>_<hidden>[_moe].pth, holding the A/B tensors and r/alpha/targets; load it on top of the base model
(eval_model.py --lora_name ...) or fold it in:

    --merge 1            also write out/<lora_name>_merged_<hidden>.pth, the base with W + (alpha / r) B A folded in
    --export_peft DIR    also write the adapter in Hugging Face PEFT's format (adapter_model.safetensors + config),
                         and the base model as a transformers directory beside it (DIR_base, or --peft_base_dir)
                         that the adapter names, so AutoPeftModelForCausalLM.from_pretrained(DIR) needs nothing else

Replay: trained on a narrow set alone, a model this small drifts towards it everywhere (on the demo, the general
held-out loss rose by 2.37 nats per token without replay: docs/lora.md). So by default --replay_ratio 0.5 of every
batch's tokens are general SFT chats (--replay_data_path), fresh ones each epoch; `--replay_data_path none` trains
on --data_path alone, as MiniMind does.

At the end it prints held-out metrics as "metric before -> after": the loss on the adapter's own held-out chats,
how often greedy replies to those prompts mention --keyword (for the identity set: "TinyMind"), and the loss on the
general SFT held-out chats, which should stay within --forgetting_margin of the base model's.
"""
import argparse
import copy
import os
import re

import numpy as np
import torch
from torch.utils.data import Dataset

from model.checkpoint import save_weights, weight_path
from model.data.jsonl import BadInput
from model.data.packing import ChatCollate, PackedDataset, training_batches
from model.device import default_device
from model.lora import DEFAULT_TARGETS, MLA_TARGETS, apply_lora, lora_param_groups, remove_lora, save_lora
from model.training.chat import (add_chat_data_args, held_out_prompts, load_chat_dataset, load_chats_with_held_out,
                                 write_chat_summary)
from model.training.cli import (NON_NEGATIVE, HelpFormatter, add_common_args, bounded, build_model, exit_on_user_error,
                                start_stage)
from model.training.evaluation import (assistant_token_loss, chat_token_losses, describe_metrics, end_of_turn_rate,
                                       generate_replies, print_changes)
from model.training.losses import with_aux_loss
from model.training.neftune import add_embedding_noise
from model.training.runtime import cleanup, print0
from model.training.trainer import SupervisedSteps, Trainer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    on_gpu = default_device() == "cuda"
    # No weight decay: it would pull the adapters towards zero, i.e. towards "no change", which is not a prior we want.
    add_common_args(parser, "lora", from_weight="full_sft", epochs=5, batch_size=16 if on_gpu else 4,
                    learning_rate=1e-3 if on_gpu else 5e-3, max_seq_len=512, weight_decay=0.0, eval_interval=50,
                    save_interval=200, log_interval=5)
    parser.set_defaults(save_weight=None)
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora_name", default="lora_identity",
                   help="adapter name: saved as <save_dir>/lora/<lora_name>_<hidden>.pth (MiniMind's naming)")
    g.add_argument("--lora_r", type=int, default=8, help="rank r of each update B A")
    g.add_argument("--lora_alpha", type=float, default=16, help="scale: the update is (alpha / r) B A")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapter's input")
    g.add_argument("--neftune_noise_alpha", type=NON_NEGATIVE, default=0.0,
                   help="NEFTune: uniform noise of at most alpha / sqrt(length x hidden) on the input embeddings "
                        "while training (0: off; measured on the demo in docs/lora.md)")
    g.add_argument("--loraplus_lr_ratio", type=bounded(float, above=0.0), default=1.0,
                   help="LoRA+: the B matrices learn at this multiple of --learning_rate (1: plain LoRA; the paper "
                        "suggests 16; measured on the demo in docs/lora.md)")
    g.add_argument("--lora_targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated Linear names to adapt (e.g. q_proj,v_proj), 'all' (every projection, "
                        "MLA ones included), or one regular expression matched against the whole module name")
    g.add_argument("--use_rslora", type=int, default=0, choices=[0, 1], help="1: scale by alpha / sqrt(r) (rsLoRA)")
    g.add_argument("--merge", type=int, default=0, choices=[0, 1],
                   help="1: also save the base with the adapter folded in, <save_dir>/<lora_name>_merged_<hidden>.pth")
    g.add_argument("--export_peft", default=None,
                   help="also write the adapter in PEFT's format into this directory, and the base model it adapts "
                        "as a transformers directory (see --peft_base_dir)")
    g.add_argument("--peft_base_dir", default=None,
                   help="where --export_peft writes the base model (default: <export_peft>_base); the adapter's "
                        "base_model_name_or_path is this directory's absolute path")
    g = add_chat_data_args(parser, data_path="dataset/demo_lora_identity.jsonl")
    g.add_argument("--replay_data_path", default="dataset/demo_sft.jsonl",
                   help="general chats mixed into training (replay), so the adapter does not make the model forget "
                        "them ('none': train on --data_path alone, as MiniMind does)")
    g.add_argument("--replay_skip_replies", default="",
                   help="leave out of the replay every chat with an assistant reply that starts with a match of "
                        "this regular expression ('': replay them all). The demo pipeline leaves out the verse task "
                        "('The next line is:'), whose replay made the adapter answer some identity questions with it "
                        "(docs/lora.md)")
    g.add_argument("--replay_ratio", type=float, default=0.5,
                   help="share of each batch drawn from --replay_data_path, in [0, 1): with --packing 1, of every "
                        "row's tokens (the rest are --data_path's chats); with --packing 0, of the conversations "
                        "(on average). Each epoch replays fresh chats. 0: no replay")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--keyword", default="TinyMind",
                   help="the word the adapter should teach: share of held-out replies that contain it (case-"
                        "insensitive), over the prompts whose reference reply contains it ('' to skip)")
    g.add_argument("--general_val_path", default="dataset/demo_sft_val.jsonl",
                   help="general held-out chats: the adapter should not make the model worse at these")
    g.add_argument("--forgetting_margin", type=float, default=0.02,
                   help="allowed rise of the general held-out loss, as a fraction of the base model's (0.02: 2%%), "
                        "before a warning is printed")
    args = parser.parse_args(argv)
    if not 0 <= args.replay_ratio < 1:
        parser.error(f"--replay_ratio must be in [0, 1), got {args.replay_ratio}")
    args.save_weight = args.save_weight or args.lora_name  # names the log and the resume checkpoint
    return args


def lora_targets(spec: str, config) -> str | tuple:
    """--lora_targets as model/lora.py takes it: a tuple of names, or a regex string."""
    if spec == "all":
        return DEFAULT_TARGETS + (MLA_TARGETS if config.use_mla else ())
    if any(c in spec for c in "*.|()[]\\^$+?"):
        return spec
    return tuple(name.strip() for name in spec.split(",") if name.strip())


class ReplayMix(Dataset):
    """The adapter's conversations with general ones replayed beside them, so that `ratio` of what each batch
    trains on is general chat. Trained on a narrow set alone, a small model drifts towards it everywhere;
    replaying some of the old data is the simplest guard against forgetting.

    Packed (--packing 1): the adapter's chats are packed into rows of (1 - ratio) * max_seq_len tokens (first fit
    over a seeded shuffle, as PackedDataset does), and each row is topped up with general chats until they make
    about `ratio` of its tokens. So every row, hence every batch, holds the asked share, not just the run on
    average. A general chat too long to share a row (longer than ratio * max_seq_len) gets a row of its own when
    the stream reaches it: left out, the long replies (code, recitals) were what the adapter forgot most
    (docs/lora.md). Unpacked (--packing 0): one conversation per row, ratio / (1 - ratio) general chats per
    adapter chat, so a batch holds the share on average (the sampler shuffles the rows).

    Each epoch draws fresh general chats, continuing through seeded permutations of the whole replay file, so a run
    replays as many different chats as it can rather than the same few every epoch. The rows of epoch e depend
    only on (seed, e): call set_epoch(e) before iterating (ReplaySteps does), and a resumed run sees the rows an
    uninterrupted one would have."""

    WINDOW = 32  # general chats considered for each row's free room (the first that fits is taken)

    def __init__(self, own, replay, ratio: float, max_seq_len: int, packed: bool, seed: int):
        if not 0 < ratio < 1:
            raise ValueError(f"replay ratio must be in (0, 1), got {ratio}")
        self.own, self.replay, self.ratio, self.packed, self.seed = own, replay, ratio, packed, seed
        self.max_seq_len = max_seq_len
        self.own_lengths, self.replay_lengths = own.lengths(), replay.lengths()
        if packed:
            own_room = max(1, round((1 - ratio) * max_seq_len))
            self.own_rows = PackedDataset(own, own_room, seed).bins  # a chat longer than own_room gets a row alone
            self.shared_room = max_seq_len - own_room  # a general chat longer than this is replayed alone
        else:
            self.own_rows = [[i] for i in range(len(own))]
            self.replay_per_epoch = round(len(own) * ratio / (1 - ratio))
            self.shared_room = max_seq_len
        self.epoch, self.rows = None, []
        self.set_epoch(0)

    # the stream of general chats: seeded permutations of all of them (the datasets already dropped chats longer
    # than max_seq_len), one after another
    def _restart(self):
        self.cycle, self.position, self.pending = 0, 0, []
        self.permutation = self._permute(0)

    def _permute(self, cycle: int) -> np.ndarray:
        return np.random.default_rng([self.seed, cycle]).permutation(len(self.replay_lengths))

    def _refill(self):
        while len(self.pending) < self.WINDOW:
            if self.position == len(self.permutation):
                self.cycle, self.position = self.cycle + 1, 0
                self.permutation = self._permute(self.cycle)
            self.pending.append(int(self.permutation[self.position]))
            self.position += 1

    def _replay_for(self, own_tokens: int) -> list[int]:
        """General chats for a row whose adapter part has own_tokens: as close to the target share as chats allow
        (a chat is taken only if it brings the row's replayed tokens nearer the target), within max_seq_len."""
        target = own_tokens * self.ratio / (1 - self.ratio)
        room, got, chosen = self.max_seq_len - own_tokens, 0, []
        while True:
            self._refill()
            pick = next((j for j, c in enumerate(self.pending)
                         if got + self.replay_lengths[c] <= room
                         and abs(target - got - self.replay_lengths[c]) < target - got), None)
            if pick is None:
                return chosen
            chosen.append(self.pending.pop(pick))
            got += int(self.replay_lengths[chosen[-1]])

    def _fill_epoch(self) -> list[tuple[list[int], list[int]]]:
        if not self.packed:
            self._refill()
            drawn = []
            for _ in range(self.replay_per_epoch):
                drawn.append(self.pending.pop(0))
                self._refill()
            return [(row, []) for row in self.own_rows] + [([], [c]) for c in drawn]
        rows = []
        for own_row in self.own_rows:
            rows.append((own_row, self._replay_for(int(self.own_lengths[own_row].sum()))))
            rows += [([], [chat]) for chat in self._take_long()]
        return rows

    def _take_long(self) -> list[int]:
        """The general chats in the window too long to share a row with the adapter's, each for a row alone."""
        long = [c for c in self.pending if self.replay_lengths[c] > self.shared_room]
        self.pending = [c for c in self.pending if self.replay_lengths[c] <= self.shared_room]
        return long

    def replayed_alone(self) -> int:
        """How many general chats are replayed in rows of their own (too long to share one)."""
        return int((self.replay_lengths > self.shared_room).sum())

    def set_epoch(self, epoch: int):
        """The rows of `epoch` (the general chats drawn continue from the previous epoch's)."""
        if epoch == self.epoch:
            return
        if self.epoch is None or epoch < self.epoch:
            self._restart()
            self.epoch = -1
        while self.epoch < epoch:
            self.rows = self._fill_epoch()
            self.epoch += 1

    def token_counts(self) -> tuple[int, int]:
        """(the adapter's tokens, replayed tokens) in the current epoch's rows."""
        own = sum(int(self.own_lengths[o].sum()) for o, _ in self.rows)
        return own, sum(int(self.replay_lengths[r].sum()) for _, r in self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        own, replayed = self.rows[index]
        items = [self.own[i] for i in own] + [self.replay[i] for i in replayed]
        if not self.packed:
            return items[0]
        return {"input_ids": torch.cat([it["input_ids"] for it in items]),
                "labels": torch.cat([it["labels"] for it in items]),
                "position_ids": torch.cat([torch.arange(len(it["input_ids"])) for it in items]),
                "segment_ids": torch.cat([torch.full((len(it["input_ids"]),), k) for k, it in enumerate(items)])}


class ReplaySteps(SupervisedSteps):
    """The Trainer's supervised steps, telling a ReplayMix which epoch it is before each epoch's batches."""

    def epoch_batches(self):
        self.dataset.set_epoch(self.trainer.state.epoch)
        return super().epoch_batches()


def replay_mix(own, replay, args) -> ReplayMix:
    try:
        mix = ReplayMix(own, replay, args.replay_ratio, args.max_seq_len, bool(args.packing), args.seed)
    except ValueError as error:
        raise SystemExit(f"error: --replay_data_path {args.replay_data_path}: {error}")
    own_tokens, replay_tokens = mix.token_counts()
    unit = "tokens" if args.packing else "conversations"
    share = replay_tokens / (own_tokens + replay_tokens) if args.packing else 1 - len(own) / len(mix)
    print0(f"replay: {args.replay_ratio:.0%} of the training {unit} from {args.replay_data_path}, drawn afresh each "
           f"epoch; epoch 0: {len(mix):,} rows, {own_tokens:,} adapter + {replay_tokens:,} replayed tokens "
           f"({share:.1%} replayed {unit}); {mix.replayed_alone():,} general chats are too long to share a row and "
           f"are replayed in rows of their own")
    return mix


def loss_fn(model, batch):
    """SFT's loss (mean over the step's assistant tokens); only the adapters get its gradient."""
    losses, mask, aux_loss = chat_token_losses(model, batch)
    loss = losses.sum() / batch.get("loss_normaliser", mask.sum().clamp(min=1))
    return with_aux_loss(loss, aux_loss, {"tokens": batch["tokens"]} if "tokens" in batch else {})


def keyword_rate(replies: list[dict], keyword: str) -> float:
    return sum(keyword.lower() in r["text"].lower() for r in replies) / max(1, len(replies))


def lora_metrics(model, tokenizer, own_val, general_val, prompts, runtime, args) -> dict:
    """Loss on the adapter's held-out chats and on the general ones; keyword rate of greedy replies (rank 0)."""
    metrics = {"val_loss": assistant_token_loss(model, own_val, runtime, args.batch_size, args.max_seq_len),
               "general_val_loss": assistant_token_loss(model, general_val, runtime, args.batch_size,
                                                        args.max_seq_len)}
    if prompts and runtime.is_main:
        replies = generate_replies(model, tokenizer, [p for p, _ in prompts], runtime, args.max_new_tokens)
        metrics["keyword_rate"] = keyword_rate(replies, args.keyword)
        metrics["end_of_turn_rate"] = end_of_turn_rate(replies)
        metrics["replies"] = replies
    return metrics


def export_for_peft(model, tokenizer, peft_dir: str, base_dir: str | None) -> dict:
    """The adapter in PEFT's format plus the base it adapts, exported as scripts/convert_model.py does: PEFT and
    llama.cpp load a base from a transformers directory or a hub id, never from our .pth, so the adapter's
    base_model_name_or_path names the exported directory."""
    from scripts.convert_model import export, export_peft_adapter
    base_dir = base_dir or peft_dir.rstrip(os.sep) + "_base"
    base = remove_lora(copy.deepcopy(model), merge=False).cpu()  # the frozen base, as the adapter was trained on
    arch = export(base, tokenizer, base_dir)
    base_name = export_peft_adapter(model, peft_dir, base_dir, arch)
    print0(f"PEFT adapter -> {peft_dir} (base exported to {base_name})")
    return {"peft_dir": peft_dir, "peft_base_dir": base_dir, "peft_arch": arch}


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    runtime, tokenizer = start_stage(args)
    train_chats, own_val, val_path, val_lines = load_chats_with_held_out(args, tokenizer, runtime)
    general_val = load_chat_dataset(args.general_val_path, tokenizer, args, runtime, "general held-out")
    if args.replay_data_path not in (None, "", "none") and args.replay_ratio > 0:
        replay = load_chat_dataset(args.replay_data_path, tokenizer, args, runtime, "replay")
        if args.replay_skip_replies:
            try:
                skipped = replay.drop_conversations_replying(args.replay_skip_replies)
            except (BadInput, re.error) as error:
                raise SystemExit(f"error: --replay_skip_replies: {error}")
            print0(f"replay: {skipped:,} chats with a reply matching {args.replay_skip_replies!r} left out, "
                   f"{len(replay):,} kept")
        train_set = replay_mix(train_chats, replay, args)
        collate_fn = ChatCollate(bool(args.packing), tokenizer.pad_token_id)
    else:
        train_set, collate_fn = training_batches(train_chats, args, tokenizer.pad_token_id)
    prompts = []
    if args.keyword and args.eval_prompts > 0:
        prompts = [(messages, reference) for messages, reference in held_out_prompts(val_path, 10 ** 9, val_lines)
                   if args.keyword.lower() in reference.lower()][:args.eval_prompts]

    model, base_file = build_model(args, vocab_size=len(tokenizer))
    if base_file is None:
        print0("warning: --from_weight none: LoRA on a random model only makes sense in tests")
    apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
               target_modules=lora_targets(args.lora_targets, model.config), use_rslora=bool(args.use_rslora),
               verbose=runtime.is_main)
    adapters = [p for p in model.parameters() if p.requires_grad]
    if args.neftune_noise_alpha > 0:
        add_embedding_noise(model.model.embed_tokens, args.neftune_noise_alpha)
    adapter_file = weight_path(os.path.join(args.save_dir, "lora"), args.lora_name, model.config)

    def evaluate(model):
        return {"val_loss": assistant_token_loss(model, own_val, runtime, args.batch_size, args.max_seq_len,
                                                 args.eval_batches)}

    # The Trainer writes the adapter (not the full model) as this stage's weights; its resume checkpoint keeps the
    # full state (base + adapters) beside the other stages', under the --save_weight name.
    trainer = Trainer(args, model, runtime, args.save_weight, params=lora_param_groups(model, args.loraplus_lr_ratio),
                      weights_file=adapter_file,
                      save_weights_fn=lambda trained: save_lora(trained, adapter_file))
    before = None if trainer.resumed else lora_metrics(model, tokenizer, own_val, general_val, prompts, runtime, args)
    if before is not None:
        print0(describe_metrics("held-out before training", before))
    steps = (ReplaySteps if isinstance(train_set, ReplayMix) else SupervisedSteps)(
        trainer, train_set, loss_fn, collate_fn, shuffle=True, token_normalised=True)
    trainer.run(steps, evaluate)  # what trainer.fit does, with the replay drawn afresh each epoch
    after = lora_metrics(model, tokenizer, own_val, general_val, prompts, runtime, args)
    size_kb = os.path.getsize(adapter_file) / 1024 if runtime.is_main else 0.0
    print0(f"adapter: {adapter_file} ({size_kb:,.0f} KB, {sum(p.numel() for p in adapters):,} parameters); "
           f"base weights {base_file} unchanged")
    results = {"after": {k: v for k, v in after.items() if k != "replies"}, "adapter": adapter_file,
               "adapter_kb": size_kb}
    if before is not None:
        results["before"] = {k: v for k, v in before.items() if k != "replies"}
        print_changes(before, after, ["val_loss", "keyword_rate", "end_of_turn_rate", "general_val_loss"])
        write_chat_summary(args, before, after, prompts, runtime)
        rise = after["general_val_loss"] - before["general_val_loss"]
        relative = rise / before["general_val_loss"]
        within = relative <= args.forgetting_margin
        results.update(general_loss_rise=rise, general_loss_rise_fraction=relative, within_margin=within)
        print0(f"general held-out loss rose by {rise:+.4f} nats/token ({relative:+.2%}): "
               + ("within" if within else "WARNING, beyond") + f" --forgetting_margin {args.forgetting_margin:.0%}")
    for (messages, reference), reply in list(zip(prompts, after.get("replies", [])))[:args.show_replies]:
        print0(f"reply | {messages[-1]['content']!r} -> {reply['text']!r} (reference {reference!r})")

    if runtime.is_main and args.export_peft:
        results.update(export_for_peft(model, tokenizer, args.export_peft, args.peft_base_dir))
    if runtime.is_main and args.merge:
        merged_file = weight_path(args.save_dir, f"{args.lora_name}_merged", model.config)
        save_weights(remove_lora(model, merge=True), merged_file)  # the model in memory is plain afterwards
        print0(f"merged model -> {merged_file}")
        results["merged"] = merged_file
    cleanup(runtime)
    return results


if __name__ == "__main__":
    main()
