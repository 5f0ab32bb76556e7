"""Stage 5, distillation: a small student learns from a bigger teacher's full next-token distributions.

    python train_distillation.py --teacher_weight teacher_sft --teacher_hidden_size 384   # the pipeline's teacher
    python train_distillation.py --teacher_weight path/to/teacher.pth --from_weight none --preset nano
    python train_distillation.py --teacher_weight path/to/qwen_dir      # a transformers model with our vocabulary
    python train_distillation.py --teacher_weight teacher_sft --teacher_hidden_size 384 --alpha 1 --save_weight ce

White-box knowledge distillation (Hinton et al. 2015, arXiv 1503.02531). SFT trains on one token per position,
the reference answer; the teacher's softmax says much more: which other tokens were plausible and how much.
The student minimises, averaged over the assistant tokens of SFT conversations,

    alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(--kd_direction reverse uses KL(student || teacher), mode-seeking, as in MiniLLM). Teacher and student must share
the tokenizer (their logits are compared token id by token id); their sizes may differ. The teacher runs in
eval mode without gradients, optionally in a lower dtype (--teacher_dtype). As in SFT, several chats share a row
(--packing 1: block-diagonal attention, positions restarting per chat), and the teacher reads the same rows. Writes
out/distill_<hidden>.pth and out/logs/distill.jsonl. (MiniMind's "distill_reason", SFT on a reasoning model's
replies, is train_reason.py.)

--alpha 1 (the last command) is the baseline KD has to beat: plain SFT (cross-entropy on the labels) of the same
student on the same batches, in the same order, for the same steps. The teacher then never runs in training; it is
still loaded to measure the held-out KL to it, so the two runs can be compared on both numbers (--teacher_weight
none: no teacher at all, no KL). The pipeline runs both: distill and distill_ce (docs/distillation.md).
"""
import argparse
import functools
import os

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from model.data.packing import pad_collate
from model.device import DTYPES, cast_weights, default_device
from model.training.chat import chat_training_batches, load_chats_with_held_out
from model.training.cli import (HelpFormatter, add_common_args, add_data_args, build_model, exit_on_user_error,
                                start_stage)
from model.training.evaluation import make_padded_chat_evaluate
from model.training.frozen import freeze, is_transformers_dir, load_frozen_checkpoint
from model.training.losses import distillation_loss, target_positions, weighted_ce, with_aux_loss
from model.training.runtime import cleanup, print0
from model.training.tracking import write_summary
from model.training.trainer import Trainer


EVAL_CHATS_PER_BATCH = 16


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    on_gpu = default_device() == "cuda"
    # Supervised training on chats: SFT's learning rates (measured on the demo, docs/sft.md).
    add_common_args(parser, "distill", new_student=True, from_weight="full_sft", batch_size=8,
                    learning_rate=2e-4 if on_gpu else 1e-3, max_seq_len=1024 if on_gpu else 512, eval_interval=100,
                    save_interval=200)
    add_data_args(parser, "dataset/demo_sft.jsonl", "conversations jsonl (SFT format)", 0.05)
    g = parser.add_argument_group("knowledge distillation")
    g.add_argument("--teacher_weight", default="full_sft",
                   help="teacher: a stage name resolved in --save_dir, a .pth with its config JSON beside it, or a "
                        "transformers model directory (local files only) with the same vocabulary; 'none' (with "
                        "--alpha 1): no teacher, plain SFT without the held-out KL")
    g.add_argument("--teacher_hidden_size", type=int, default=None,
                   help="picks the teacher among several <stage>_<hidden>.pth files in --save_dir")
    g.add_argument("--teacher_dtype", default=None, choices=sorted(DTYPES),
                   help="cast the teacher's weights to this dtype (default: keep fp32; autocast still applies)")
    g.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the hard-label cross-entropy; 1 - alpha goes to the KL to the teacher. 1: CE "
                        "only, the baseline (the teacher, if any, is only evaluated against, never run in training)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="softens both distributions before the KL (the KL term is scaled by T^2)")
    g.add_argument("--kd_direction", default="forward", choices=["forward", "reverse"],
                   help="forward: KL(teacher || student), mass-covering; "
                        "reverse: KL(student || teacher), mode-seeking")
    g.add_argument("--packing", type=int, default=1, choices=[0, 1],
                   help="1: pack several chats per row of --max_seq_len tokens (block-diagonal attention, as SFT), "
                        "student and teacher alike; --batch_size then counts rows. 0: one chat per row, padded")
    g.add_argument("--pad_to_multiple_of", type=int, default=64,
                   help="with --packing 0: pad each batch to a multiple of this many tokens (padding is masked out "
                        "of the loss): a few batch shapes instead of one per length keep CPU memory flat "
                        "(docs/distillation.md); 1 pads to the batch's longest chat")
    args = parser.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.pad_to_multiple_of < 1:
        parser.error(f"--pad_to_multiple_of must be >= 1, got {args.pad_to_multiple_of}")
    if args.teacher_weight == "none" and args.alpha < 1.0:
        parser.error(f"--teacher_weight none needs --alpha 1 (CE only); got --alpha {args.alpha}")
    return args


def load_teacher(args, tokenizer, student, student_source: str | None, runtime) -> torch.nn.Module:
    """Our checkpoint (stage name or .pth + config JSON) or a transformers directory; frozen, in eval mode."""
    spec = args.teacher_weight
    vocab_size = student.get_output_embeddings().weight.shape[0]
    if is_transformers_dir(spec):
        from transformers import AutoModelForCausalLM
        # fp32 like our checkpoints, even when the directory stores bf16 (transformers would keep that):
        # --teacher_dtype alone decides the teacher's precision.
        teacher = freeze(AutoModelForCausalLM.from_pretrained(spec, local_files_only=True, dtype=torch.float32))
        check_teacher_tokenizer(spec, tokenizer)
        source = spec
        if teacher.get_output_embeddings().weight.shape[0] != vocab_size:
            raise SystemExit(f"error: the teacher {source} has a vocabulary of "
                             f"{teacher.get_output_embeddings().weight.shape[0]} tokens, the student {vocab_size}: "
                             f"distillation compares logits token id by token id, so both must use the same "
                             f"tokenizer (this repo's has {len(tokenizer)} tokens)")
    elif os.path.isdir(spec):
        raise SystemExit(f"error: --teacher_weight {spec} is a directory without config.json; expected a "
                         "transformers model directory, a .pth file or a stage name")
    else:
        teacher, source = load_frozen_checkpoint(spec, args.save_dir, args.teacher_hidden_size, args.tokenizer_path,
                                                 vocab_size, "teacher", "--teacher_weight")
    if student_source and os.path.abspath(student_source) == os.path.abspath(source):
        print0(f"warning: the teacher is the student's own starting checkpoint ({source}); the KL starts at 0 and "
               "there is nothing to distil (pass --teacher_weight / --teacher_hidden_size)")
    if args.teacher_dtype:  # the weights only: RoPE frequencies and the MoE bias stay fp32, as the teacher was trained
        cast_weights(teacher, DTYPES[args.teacher_dtype])
    teacher.to(runtime.device)
    size = sum(p.numel() for p in teacher.parameters())
    print0(f"teacher: {source}, {size / 1e6:.2f}M parameters ({size / student.num_params():.1f}x the student)")
    return teacher


def check_teacher_tokenizer(directory: str, tokenizer):
    """A transformers teacher may ship its own tokenizer: it must map text to the same ids as ours."""
    if not any(os.path.exists(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return
    theirs = AutoTokenizer.from_pretrained(directory, local_files_only=True).get_vocab()
    ours = tokenizer.get_vocab()
    if theirs != ours:
        differing = len(set(theirs.items()) ^ set(ours.items()))
        raise SystemExit(f"error: the teacher's tokenizer in {directory} differs from ours ({len(theirs)} vs "
                         f"{len(ours)} tokens, {differing} token/id entries differ): its logits would not line up")


def pad_to_multiple(batch: list[dict], pad_token_id: int, multiple: int, max_len: int) -> dict:
    """pad_collate to the batch's longest chat rounded up to `multiple` (at most max_len, the longest a chat is cut
    to). Padding to the longest alone makes a new sequence length almost every step, so new shapes for each matmul
    of student and teacher; oneDNN builds and caches a kernel per shape, and the process grew step after step. A few
    shapes keep its memory flat (docs/distillation.md); padding is masked, so the loss does not change."""
    longest = max(len(item["input_ids"]) for item in batch)
    return pad_collate(batch, pad_token_id, pad_to=max(longest, min(-(-longest // multiple) * multiple, max_len)))


def make_loss_fn(args, teacher):
    def loss_fn(model, batch):
        """alpha * CE(labels) + (1 - alpha) * T^2 * KL to the teacher, over the assistant tokens."""
        # packed rows carry a block-diagonal mask and per-chat positions; teacher and student read the same batch
        inputs = {"attention_mask": batch["attention_mask"], "position_ids": batch.get("position_ids")}
        out = model(batch["input_ids"], **inputs)
        logits, labels, valid = target_positions(out.logits, batch["labels"])
        metrics = {"tokens": batch["tokens"] if "tokens" in batch else batch["attention_mask"].sum()}
        normaliser = batch.get("loss_normaliser")  # the step's target tokens: each weighs the same
        if args.alpha >= 1.0:  # plain SFT, the baseline: the teacher never runs
            loss = weighted_ce(logits, labels) if normaliser is None else \
                F.cross_entropy(logits.float(), labels, reduction="sum") / normaliser
            metrics["ce"] = loss.detach()
        else:
            with torch.no_grad():
                teacher_logits = teacher(batch["input_ids"], **inputs).logits
                teacher_logits = teacher_logits[:, :-1][valid]
            loss, ce, kd = distillation_loss(logits, teacher_logits, labels, alpha=args.alpha,
                                             temperature=args.temperature, direction=args.kd_direction,
                                             return_parts=True, num_items_in_batch=normaliser)
            metrics.update(ce=ce.detach(), kd=kd.detach())
        return with_aux_loss(loss, out.aux_loss, metrics)
    return loss_fn


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    runtime, tokenizer = start_stage(args)
    train_chats, val_set, _, _ = load_chats_with_held_out(args, tokenizer, runtime)
    if args.packing:  # the demo's chats average 60 tokens: padded batches would be more than half padding
        train_set, collate_fn = chat_training_batches(train_chats, args, tokenizer.pad_token_id)
    else:
        train_set, collate_fn = train_chats, functools.partial(pad_to_multiple, pad_token_id=tokenizer.pad_token_id,
                                                               multiple=args.pad_to_multiple_of,
                                                               max_len=args.max_seq_len)
    model, source = build_model(args, vocab_size=len(tokenizer))
    model.to(runtime.device)
    teacher = None if args.teacher_weight == "none" else load_teacher(args, tokenizer, model, source, runtime)
    if args.alpha >= 1.0:
        print0("--alpha 1: CE only (the baseline); " + ("the teacher is only evaluated against, never run in "
                                                         "training" if teacher is not None else "no teacher"))
    # held-out chats in batches of a fixed size, so the held-out numbers do not depend on how training batches
    evaluate = make_padded_chat_evaluate(args, val_set, runtime, tokenizer.pad_token_id, teacher=teacher,
                                         batch_size=EVAL_CHATS_PER_BATCH)

    trainer = Trainer(args, model, runtime, args.save_weight)
    before, teacher_loss = None, None
    if teacher is not None:  # the bar: a student that beats this needs nothing from the teacher
        with torch.no_grad(), runtime.autocast():
            teacher_loss = evaluate(teacher)["val_loss"]
        print0(f"teacher held-out loss {teacher_loss:.4f}")
    if not trainer.resumed:
        before = trainer.evaluate(evaluate, 0)
    after = trainer.fit(train_set, make_loss_fn(args, teacher), evaluate=evaluate, token_normalised=True,
                        collate_fn=collate_fn)
    # what the report card's "KD vs CE only" table names each run by
    settings = {"alpha": args.alpha, "temperature": args.temperature, "kd_direction": args.kd_direction,
                "teacher": args.teacher_weight, **({"teacher_val_loss": teacher_loss} if teacher is not None else {})}
    write_summary(args.save_dir, args.save_weight, settings, runtime, merge=True)
    if before is not None:
        print0(f"held-out loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}")
        if teacher is not None:
            print0(f"held-out KL(teacher || student) {before['kl_to_teacher']:.4f} -> {after['kl_to_teacher']:.4f}")
    cleanup(runtime)
    return {"before": before, "after": after, "weights": trainer.weights_file, "teacher_val_loss": teacher_loss}


if __name__ == "__main__":
    main()
