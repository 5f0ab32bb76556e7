"""What every stage that trains on conversations shares (SFT, LoRA, distillation, reasoning): the data flags,
loading a chat file with its held-out split, held-out prompts, and the summary the report card reads."""
from ..data.chat import SFTDataset, iter_conversations
from ..data.jsonl import BadInput, default_val_path
from ..data.packing import training_batches
from .cli import add_data_args
from .runtime import main_rank_first, print0
from .tracking import before_after, write_summary


def add_chat_data_args(parser, data_path: str):
    """The data flags of every stage that trains on conversations (SFT, LoRA)."""
    g = add_data_args(parser, data_path, 'jsonl with a "conversations" list per line')
    g.add_argument("--truncation", default="drop", choices=["drop", "keep_prefix"],
                   help="conversations longer than max_seq_len: drop them, or keep their first max_seq_len tokens")
    g.add_argument("--packing", type=int, default=1, choices=[0, 1],
                   help="1: pack several conversations per row (block-diagonal attention); 0: one per row, padded")
    g.add_argument("--eval_prompts", type=int, default=64,
                   help="held-out prompts answered greedily before and after training (0: skip generation)")
    g.add_argument("--max_new_tokens", type=int, default=128, help="reply length limit for those answers")
    g.add_argument("--show_replies", type=int, default=3, help="print this many of the final held-out replies")
    return g


def chat_training_batches(chats: SFTDataset, args, pad_token_id: int):
    """model.data.packing.training_batches (packed rows with --packing 1, else padded chats), saying how full the
    packed rows are: SFT's and distillation's training set."""
    dataset, collate_fn = training_batches(chats, args, pad_token_id)
    if args.packing:
        print0(f"packing: {len(chats):,} conversations -> {len(dataset):,} rows of up to {args.max_seq_len} tokens "
               f"({100 * dataset.fill_ratio():.1f}% full); --batch_size counts rows")
    return dataset, collate_fn


def load_chat_dataset(path: str, tokenizer, args, runtime, what: str) -> SFTDataset:
    """Tokenize a conversation file (errors name path:line) and report what was dropped or cut. Shared by SFT, LoRA
    and distillation (which has no --truncation flag: it drops what is too long)."""
    try:
        with main_rank_first(runtime):  # rank 0 tokenizes into the cache the others open
            dataset = SFTDataset(path, tokenizer, args.max_seq_len, bool(args.skip_bad_lines),
                                 getattr(args, "truncation", "drop"), show_progress=runtime.is_main)
    except (BadInput, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    lengths = dataset.lengths()
    stats = dataset.stats
    print0(f"{what}: {path}: {len(dataset):,} conversations, {int(lengths.sum()):,} tokens (mean {lengths.mean():.0f}, "
           f"max {lengths.max()}); longer than {args.max_seq_len}: {stats['dropped_too_long']} dropped, "
           f"{stats['truncated']} cut; {stats['bad_lines']} bad lines skipped")
    return dataset


def load_chats_with_held_out(args, tokenizer, runtime) -> tuple[SFTDataset, SFTDataset, str, set | None]:
    """(train, held-out, the held-out file, its lines or None for all): the held-out set is the _val.jsonl beside
    the data, or --val_fraction of the data itself when there is none (as with MiniMind's files)."""
    train = load_chat_dataset(args.data_path, tokenizer, args, runtime, "train")
    val_path = args.val_data_path or default_val_path(args.data_path)
    if val_path:
        return train, load_chat_dataset(val_path, tokenizer, args, runtime, "held-out"), val_path, None
    try:
        val = train.split_held_out(args.val_fraction, args.seed)
    except BadInput as error:
        raise SystemExit(f"error: {error}; pass --val_data_path")
    print0(f"held-out: no _val.jsonl beside {args.data_path}, so {len(val):,} of its conversations chosen at random "
           f"(--val_fraction {args.val_fraction}) are held out")
    return train, val, args.data_path, set(val.line_numbers.tolist())


def held_out_prompts(path: str, count: int, lines: set | None = None) -> list[tuple[list[dict], str]]:
    """(conversation up to the last assistant turn, that turn's reference reply) for the first `count`
    conversations of a held-out file (of its `lines` only, if given)."""
    prompts = []
    for messages in iter_conversations(path, lines):
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last == 0:
            continue  # nothing to prompt with
        prompts.append((messages[:last], messages[last]["content"]))
        if len(prompts) >= count:
            break
    return prompts


def write_chat_summary(args, before: dict, after: dict, prompts: list, runtime):
    """Add the before/after metrics and the first four held-out replies to out/summaries/<name>.json (the report)."""
    samples = {m[-1]["content"]: r["text"] for (m, _), r in list(zip(prompts, after.get("replies", [])))[:4]}
    write_summary(args.save_dir, args.save_weight, {**before_after(before, after), "samples": samples}, runtime,
                  merge=True)
