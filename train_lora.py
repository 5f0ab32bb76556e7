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
held-out loss rose by 2.37 nats per token without replay, 0.41 with it: docs/lora.md). So by default half as many
general SFT chats as there are adapter chats are mixed into training (--replay_data_path, --replay_ratio);
`--replay_data_path none` trains on --data_path alone, as MiniMind does.

At the end it prints held-out metrics as "metric before -> after": the loss on the adapter's own held-out chats,
how often greedy replies to those prompts mention --keyword (for the identity set: "TinyMind"), and the loss on the
general SFT held-out chats, which should stay within --forgetting_margin of the base model's.
"""
import argparse
import copy
import os

import numpy as np
from torch.utils.data import Dataset

from model.checkpoint import save_weights, weight_path
from model.data.packing import training_batches
from model.device import default_device
from model.lora import DEFAULT_TARGETS, MLA_TARGETS, apply_lora, remove_lora, save_lora
from model.training.chat import (add_chat_data_args, held_out_prompts, load_chat_dataset, load_chats_with_held_out,
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
    # No weight decay: it would pull the adapters towards zero, i.e. towards "no change", which is not a prior we want.
    add_common_args(parser, "lora", from_weight="full_sft", epochs=8, batch_size=16 if on_gpu else 4,
                    learning_rate=1e-3 if on_gpu else 5e-3, max_seq_len=512, weight_decay=0.0, eval_interval=50,
                    save_interval=200, log_interval=5)
    parser.set_defaults(save_weight=None)
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora_name", default="lora_identity",
                   help="adapter name: saved as <save_dir>/lora/<lora_name>_<hidden>.pth (MiniMind's naming)")
    g.add_argument("--lora_r", type=int, default=8, help="rank r of each update B A")
    g.add_argument("--lora_alpha", type=float, default=16, help="scale: the update is (alpha / r) B A")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapter's input")
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
    g.add_argument("--replay_ratio", type=float, default=0.5,
                   help="replayed conversations per conversation of --data_path (drawn at random, without repeats)")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--keyword", default="TinyMind",
                   help="the word the adapter should teach: share of held-out replies that contain it (case-"
                        "insensitive), over the prompts whose reference reply contains it ('' to skip)")
    g.add_argument("--general_val_path", default="dataset/demo_sft_val.jsonl",
                   help="general held-out chats: the adapter should not make the model worse at these")
    g.add_argument("--forgetting_margin", type=float, default=0.5,
                   help="allowed rise of the general held-out loss (nats per token) before a warning is printed")
    args = parser.parse_args(argv)
    args.save_weight = args.save_weight or args.lora_name  # names the log and the resume checkpoint
    return args


def lora_targets(spec: str, config) -> str | tuple:
    """--lora_targets as model/lora.py takes it: a tuple of names, or a regex string."""
    if spec == "all":
        return DEFAULT_TARGETS + (MLA_TARGETS if config.use_mla else ())
    if any(c in spec for c in "*.|()[]\\^$+?"):
        return spec
    return tuple(name.strip() for name in spec.split(",") if name.strip())


class MixedChats(Dataset):
    """The adapter's conversations plus a seeded random sample of general ones. Trained on a narrow set alone, a
    small model drifts towards it everywhere; replaying some old data is the simplest guard against forgetting."""

    def __init__(self, own, replay, count: int, seed: int):
        chosen = np.random.default_rng(seed).choice(len(replay), size=min(count, len(replay)), replace=False)
        self.items = [(own, i) for i in range(len(own))] + [(replay, int(i)) for i in chosen]
        self._lengths = np.concatenate([own.lengths(), replay.lengths()[chosen]])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        dataset, i = self.items[index]
        return dataset[i]

    def lengths(self):
        return self._lengths


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
        own_count = len(train_chats)
        train_chats = MixedChats(train_chats, replay, round(args.replay_ratio * own_count), args.seed)
        print0(f"training on {own_count:,} conversations + {len(train_chats) - own_count:,} replayed ones")
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
    adapter_file = weight_path(os.path.join(args.save_dir, "lora"), args.lora_name, model.config)

    def evaluate(model):
        return {"val_loss": assistant_token_loss(model, own_val, runtime, args.batch_size, args.max_seq_len,
                                                 args.eval_batches)}

    # The Trainer writes the adapter (not the full model) as this stage's weights; its resume checkpoint keeps the
    # full state (base + adapters) beside the other stages', under the --save_weight name.
    trainer = Trainer(args, model, runtime, args.save_weight, params=adapters, weights_file=adapter_file,
                      save_weights_fn=lambda trained: save_lora(trained, adapter_file))
    before = None if trainer.resumed else lora_metrics(model, tokenizer, own_val, general_val, prompts, runtime, args)
    if before is not None:
        print0(describe_metrics("held-out before training", before))
    trainer.fit(train_set, loss_fn, collate_fn=collate_fn, evaluate=evaluate, token_normalised=True)
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
        results["general_loss_rise"], results["within_margin"] = rise, rise <= args.forgetting_margin
        print0(f"general held-out loss rose by {rise:+.4f} nats/token: "
               + ("within" if rise <= args.forgetting_margin else "WARNING, beyond")
               + f" the --forgetting_margin of {args.forgetting_margin}")
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
