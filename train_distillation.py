"""Stage 5, distillation: a small student learns from a bigger teacher's full next-token distributions, or
(--mode reason) learns to think before it answers from <think>...</think><answer>...</answer> examples.

    python train_distillation.py --teacher_weight full_sft --teacher_hidden_size 384 --hidden_size 256
    python train_distillation.py --teacher_weight path/to/teacher.pth --from_weight none --preset nano
    python train_distillation.py --teacher_weight path/to/qwen_dir      # a transformers model with our vocabulary
    python train_distillation.py --mode reason                         # MiniMind's distill_reason

White-box knowledge distillation (Hinton et al. 2015, arXiv 1503.02531). SFT trains on one token per position,
the reference answer; the teacher's softmax says much more: which other tokens were plausible and how much.
The student minimises, averaged over the assistant tokens of SFT conversations,

    alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(--kd_direction reverse uses KL(student || teacher), mode-seeking, as in MiniLLM). Teacher and student must share
the tokenizer (their logits are compared token id by token id); their sizes may differ. The teacher runs in
eval mode without gradients, optionally in a lower dtype (--teacher_dtype).

--mode reason is MiniMind's "distill_reason": no teacher model, plain SFT on replies a reasoning model wrote in
the <think>/<answer> format, with the four tag tokens weighted --special_token_weight times in the loss so the
student reliably produces the format. It reports how many greedy replies to held-out prompts are well formed
before and after. Writes out/distill_<hidden>.pth (reason: out/reason_<hidden>.pth) and out/logs/<name>.jsonl.
"""
import argparse
import functools
import os
import re

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from model.dataset import BadInput, iter_conversations, pad_collate
from model.losses import distillation_loss, kd_loss
from model.model import TinyMindForCausalLM
from model.train_utils import (DTYPES, Trainer, TrainingDiverged, add_common_args, all_reduce_mean, barrier,
                               before_after, build_model, check_same_tokenizer, cleanup, default_device, init_runtime,
                               load_state_into, load_weights, print0, resolve_weight, write_summary)
from train_full_sft import load_chats_with_held_out

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
REASONING_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.S)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    on_gpu = default_device() == "cuda"
    # Both modes are supervised training on chats: SFT's learning rates (measured on the demo, see README).
    add_common_args(parser, "distill", from_weight="full_sft", batch_size=16, learning_rate=2e-4 if on_gpu else 1e-3,
                    max_seq_len=1024 if on_gpu else 512, eval_interval=100, save_interval=200)
    parser.set_defaults(save_weight=None)
    g = parser.add_argument_group("data")
    g.add_argument("--mode", default="kd", choices=["kd", "reason"],
                   help="kd: distil a teacher model's distributions; reason: SFT on <think>/<answer> replies")
    g.add_argument("--data_path", default=None,
                   help="conversations jsonl (default: dataset/demo_sft.jsonl, reason: dataset/demo_reason.jsonl)")
    g.add_argument("--val_data_path", default=None,
                   help="held-out jsonl (default: <data>_val.jsonl beside the data if it exists, else --val_fraction)")
    g.add_argument("--val_fraction", type=float, default=0.05, help="share held out when there is no validation file")
    g.add_argument("--tokenizer_path", default="model", help="directory with tokenizer.json / tokenizer_config.json")
    g.add_argument("--skip_bad_lines", type=int, default=0, choices=[0, 1],
                   help="1: skip malformed lines (counted and reported) instead of stopping at the first")
    g = parser.add_argument_group("knowledge distillation (--mode kd)")
    g.add_argument("--teacher_weight", default="full_sft",
                   help="teacher: a stage name resolved in --save_dir, a .pth with its config JSON beside it, or a "
                        "transformers model directory (local files only) with the same vocabulary")
    g.add_argument("--teacher_hidden_size", type=int, default=None,
                   help="picks the teacher among several <stage>_<hidden>.pth files in --save_dir")
    g.add_argument("--teacher_dtype", default=None, choices=sorted(DTYPES),
                   help="cast the teacher's weights to this dtype (default: keep fp32; autocast still applies)")
    g.add_argument("--alpha", type=float, default=0.5,
                   help="weight of the hard-label cross-entropy; 1 - alpha goes to the KL to the teacher")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="softens both distributions before the KL (the KL term is scaled by T^2)")
    g.add_argument("--kd_direction", default="forward", choices=["forward", "reverse"],
                   help="forward: KL(teacher || student), mass-covering; "
                        "reverse: KL(student || teacher), mode-seeking")
    g = parser.add_argument_group("reasoning SFT (--mode reason)")
    g.add_argument("--special_token_weight", type=float, default=10.0,
                   help="loss weight of the <think> </think> <answer> </answer> tokens (MiniMind: 10; 1: plain SFT)")
    g.add_argument("--eval_prompts", type=int, default=48,
                   help="held-out prompts answered greedily before and after, to measure the well-formed rate")
    g.add_argument("--max_new_tokens", type=int, default=128, help="reply length limit for that check")
    args = parser.parse_args(argv)
    if args.data_path is None:
        args.data_path = "dataset/demo_reason.jsonl" if args.mode == "reason" else "dataset/demo_sft.jsonl"
    if args.save_weight is None:
        args.save_weight = "reason" if args.mode == "reason" else "distill"
    if args.preset is None and args.hidden_size is None and args.from_weight == "none":
        args.preset = "small" if on_gpu else "tiny"
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    return args


# ================================================================================================ data


# ================================================================================================ the teacher


def is_transformers_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def load_teacher(args, tokenizer, student, student_source: str | None, runtime) -> torch.nn.Module:
    """Our checkpoint (stage name or .pth + config JSON) or a transformers directory; frozen, in eval mode."""
    spec = args.teacher_weight
    if is_transformers_dir(spec):
        from transformers import AutoModelForCausalLM
        teacher = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True)
        check_teacher_tokenizer(spec, tokenizer)
        source = spec
    else:
        if os.path.isdir(spec):
            raise SystemExit(f"error: --teacher_weight {spec} is a directory without config.json; expected a "
                             "transformers model directory, a .pth file or a stage name")
        source = resolve_weight(spec, args.save_dir, args.teacher_hidden_size)
        state, config = load_weights(source)
        if config is None:
            raise SystemExit(f"error: teacher {source} has no config JSON beside it (saved by an older script?)")
        check_same_tokenizer(config, args.tokenizer_path, f"the teacher {source}")
        teacher = TinyMindForCausalLM(config)
        load_state_into(teacher, state, source)
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    student_vocab = student.get_output_embeddings().weight.shape[0]
    if teacher_vocab != student_vocab:
        raise SystemExit(f"error: the teacher {source} has a vocabulary of {teacher_vocab} tokens, the student "
                         f"{student_vocab}: distillation compares logits token id by token id, so both must use the "
                         f"same tokenizer (this repo's has {len(tokenizer)} tokens)")
    if student_source and os.path.abspath(student_source) == os.path.abspath(source):
        print0(f"warning: the teacher is the student's own starting checkpoint ({source}); the KL starts at 0 and "
               "there is nothing to distil (pass --teacher_weight / --teacher_hidden_size)")
    if args.teacher_dtype:
        teacher.to(DTYPES[args.teacher_dtype])
    teacher.to(runtime.device).eval().requires_grad_(False)
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


# ================================================================================================ losses


def target_positions(logits: torch.Tensor, labels: torch.Tensor):
    """Shift (position t predicts token t+1), then keep only the positions that are trained on: [N, V] logits and
    [N] labels, plus the [B, T-1] mask that selected them. The losses ignore prompts and padding anyway, and
    [N, V] is several times smaller than [B, T, V], which matters for the fp32 copies the losses make."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != -100
    return logits[valid], labels[valid], valid


def weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t w_t * CE_t / sum_t w_t over [N, V] logits and [N] labels. weights None: the plain mean."""
    per_token = F.cross_entropy(logits.float(), labels, reduction="none")
    weights = torch.ones_like(per_token) if weights is None else weights.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1e-8)


def tag_token_ids(tokenizer) -> list[int]:
    """The ids of <think> </think> <answer> </answer>; each must be ONE token, or weighting it means nothing."""
    ids = []
    for tag in TAGS:
        encoded = tokenizer.encode(tag, add_special_tokens=False)
        if len(encoded) != 1:
            raise SystemExit(f"error: the tokenizer splits {tag} into {len(encoded)} tokens; --mode reason needs the "
                             "tags as single tokens (add them as special tokens)")
        ids.append(encoded[0])
    return ids


def tag_weights(labels: torch.Tensor, tag_ids: torch.Tensor, weight: float) -> torch.Tensor:
    """1 on every target token, `weight` on the tag tokens, 0 where labels are ignored (MiniMind's loss_mask)."""
    weights = (labels != -100).float()
    return torch.where(torch.isin(labels, tag_ids), weights * weight, weights)


def make_kd_loss_fn(args, teacher):
    def loss_fn(model, batch):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        logits, labels, valid = target_positions(out.logits, batch["labels"])
        metrics = {"tokens": batch["attention_mask"].sum()}
        if args.alpha >= 1.0:  # plain SFT: no teacher forward needed
            loss = weighted_ce(logits, labels)
            metrics["ce"] = loss.detach()
        else:
            with torch.no_grad():
                teacher_logits = teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                teacher_logits = teacher_logits[:, :-1][valid]
            loss, ce, kd = distillation_loss(logits, teacher_logits, labels, alpha=args.alpha,
                                             temperature=args.temperature, direction=args.kd_direction,
                                             return_parts=True)
            metrics.update(ce=ce.detach(), kd=kd.detach())
        if out.aux_loss is not None:
            metrics["aux_loss"] = out.aux_loss.detach()
            loss = loss + out.aux_loss
        return loss, metrics
    return loss_fn


def make_reason_loss_fn(args, tag_ids: torch.Tensor):
    def loss_fn(model, batch):
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        logits, labels, _ = target_positions(out.logits, batch["labels"])
        tag_ids_here = tag_ids.to(labels.device)
        loss = weighted_ce(logits, labels, tag_weights(labels, tag_ids_here, args.special_token_weight))
        on_tags = torch.isin(labels, tag_ids_here).float()
        metrics = {"ce": weighted_ce(logits.detach(), labels), "tag_ce": weighted_ce(logits.detach(), labels, on_tags),
                   "tokens": batch["attention_mask"].sum()}
        if out.aux_loss is not None:
            metrics["aux_loss"] = out.aux_loss.detach()
            loss = loss + out.aux_loss
        return loss, metrics
    return loss_fn


def make_evaluate(args, val_set, runtime, pad_token_id: int, teacher=None, tag_ids=None):
    """Held-out CE on assistant tokens; with a teacher also KL(teacher || student) at T = 1 (the distance the
    distillation closes, whatever --temperature or --kd_direction trained it); with tags the CE on the tags."""
    sampler = list(range(runtime.rank, len(val_set) - len(val_set) % runtime.world_size, runtime.world_size))
    loader = DataLoader(val_set, batch_size=args.batch_size, sampler=sampler,
                        collate_fn=functools.partial(pad_collate, pad_token_id=pad_token_id))

    def evaluate(model):
        sums, batches = torch.zeros(3, device=runtime.device), 0
        for i, batch in enumerate(loader):
            if i >= args.eval_batches:
                break
            batch = {k: v.to(runtime.device) for k, v in batch.items()}
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, labels, valid = target_positions(logits, batch["labels"])
            sums[0] += weighted_ce(logits, labels)
            if teacher is not None:
                teacher_logits = teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                sums[1] += kd_loss(logits, teacher_logits[:, :-1][valid], temperature=1.0, direction="forward")
            if tag_ids is not None:
                sums[2] += weighted_ce(logits, labels, torch.isin(labels, tag_ids.to(labels.device)).float())
            batches += 1
        means = all_reduce_mean(sums / max(batches, 1), runtime).tolist()
        metrics = {"val_loss": means[0]}
        if teacher is not None:
            metrics["kl_to_teacher"] = means[1]
        if tag_ids is not None:
            metrics["tag_loss"] = means[2]
        return metrics
    return evaluate


# ================================================================================================ format check


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


@torch.no_grad()
def reasoning_format_rate(model, tokenizer, prompts, runtime, max_new_tokens: int, batch_size: int = 16) -> dict:
    """Greedy replies to held-out prompts: the share that are `<think>...</think><answer>...</answer>` and then
    stop, and the share whose answer equals the reference. Left-padded batches (the model takes position ids from
    the attention mask)."""
    was_training = model.training
    model.eval()
    well_formed = correct = 0
    example = None
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        encoded = [tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"] for messages, _ in chunk]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in encoded], device=runtime.device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded],
                                      device=runtime.device)
        with runtime.autocast():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=eos, pad_token_id=pad)
        for row, (_, reference) in zip(output[:, width:].tolist(), chunk):
            stopped = eos in row
            reply = tokenizer.decode(row[:row.index(eos)] if stopped else row, skip_special_tokens=False)
            answer = parse_reasoning(reply) if stopped else None
            well_formed += answer is not None
            correct += answer is not None and answer == reference
            example = example or reply
    model.train(was_training)
    n = max(len(prompts), 1)
    return {"well_formed": well_formed / n, "answer_correct": correct / n, "example": example}


# ================================================================================================ main


def main(argv=None):
    args = parse_args(argv)
    runtime = init_runtime(args.device, args.dtype, args.seed, args.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    try:
        train_set, val_set, val_path, val_lines = load_chats_with_held_out(args, tokenizer, runtime)
    except (BadInput, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    print0(f"data: {len(train_set):,} train / {len(val_set):,} held-out conversations ({args.data_path})")

    model, source = build_model(args, vocab_size=len(tokenizer))
    if len(tokenizer) > model.config.vocab_size:
        raise SystemExit(f"error: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    model.to(runtime.device)

    teacher = tag_ids = None
    if args.mode == "kd":
        teacher = load_teacher(args, tokenizer, model, source, runtime)
        loss_fn = make_kd_loss_fn(args, teacher)
    else:
        tag_ids = torch.tensor(tag_token_ids(tokenizer))
        loss_fn = make_reason_loss_fn(args, tag_ids)
    evaluate = make_evaluate(args, val_set, runtime, tokenizer.pad_token_id, teacher, tag_ids)

    trainer = Trainer(args, model, runtime, args.save_weight)
    format_before = format_after = None
    prompts = held_out_prompts(val_path, args.eval_prompts, val_lines) if args.mode == "reason" else []
    before = None
    if not trainer.resumed:
        if teacher is not None:
            with torch.no_grad(), runtime.autocast():
                print0(f"teacher held-out loss {evaluate(teacher)['val_loss']:.4f}")
        before = trainer.evaluate(evaluate, 0)
        if prompts and runtime.is_main:
            format_before = reasoning_format_rate(model, tokenizer, prompts, runtime, args.max_new_tokens)
    try:
        after = trainer.fit(train_set, loss_fn, collate_fn=functools.partial(pad_collate,
                                                                             pad_token_id=tokenizer.pad_token_id),
                            evaluate=evaluate)
    except TrainingDiverged as error:
        raise SystemExit(f"error: {error}")
    if format_before is not None:
        format_after = reasoning_format_rate(model, tokenizer, prompts, runtime, args.max_new_tokens)
    barrier(runtime)  # the other ranks wait for rank 0's generation
    if before is not None:
        print0(f"held-out loss {before['val_loss']:.4f} -> {after['val_loss']:.4f}")
        if teacher is not None:
            print0(f"held-out KL(teacher || student) {before['kl_to_teacher']:.4f} -> {after['kl_to_teacher']:.4f}")
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
