"""Chat data: conversations in MiniMind's format ({"conversations": [{"role": "system"|"user"|"assistant"|"tool",
"content": ...}, ...]}), rendered with the tokenizer's ChatML template and tokenized once, in parallel, into a
cache every stage and rank reuses.

The loss mask comes from the template itself: its {% generation %} blocks mark each assistant reply and its closing
<|im_end|>, and transformers returns that as `assistant_masks`, token by token. No searching for marker strings in
text, which breaks as soon as a reply quotes one. DPO pairs go through the same cache (kind "dpo"), masked on their
final reply only. What a line must hold is checked in schema.py, which clean_data shares; other formats (OpenAI/TRL
messages, ShareGPT, Alpaca, JSON arrays, parquet, datasets folders) are turned into MiniMind's by formats.py."""
import copy
import json
import os
import re
import signal

import numpy as np
import torch
from jinja2.exceptions import TemplateError
from torch.utils.data import Dataset

from .formats import Source, open_source
from .jsonl import (BadInput, file_size, no_usable, note_bad_line, read_cache_summary, refuse_skipped_lines,
                    remove_files, sweep_stale_temps, token_cache_path)
from ..files import temp_path


def tools_of(messages: list[dict]) -> list | None:
    """MiniMind's tool-calling chats carry the tool schemas in the system message's "functions" field."""
    first = messages[0] if messages else {}
    tools = first.get("functions") if first.get("role") == "system" else None
    return json.loads(tools) if isinstance(tools, str) else tools or None


def template_inputs(messages: list[dict]) -> tuple[list[dict], list | None]:
    """(messages, tools) to render: the tools from the system message's "functions", and the messages less a system
    message that only carries them (null content: tools given without a system prompt, schema.py), so they render
    as the template renders tools alone."""
    tools = tools_of(messages)
    if messages and messages[0].get("role") == "system" and messages[0].get("content") is None:
        messages = messages[1:]
    return messages, tools


def iter_conversations(path: str, lines: set | None = None):
    """The "conversations" of each record of a chat file, in any format formats.py reads (only of `lines`, if
    given: a held-out split's line or record numbers). Bad records are skipped: the dataset that read the file
    first has stopped at or reported them."""
    for number, messages in iter_numbered_conversations(path):
        if lines is None or number in lines:
            yield messages


def iter_numbered_conversations(path: str):
    """(line or record number, "conversations") of each good record of a chat file, as iter_conversations."""
    for number, obj in open_source(path, "sft", skip_bad_lines=True).records(skip_bad_lines=True):
        messages, _ = template_inputs(obj["conversations"])
        # an assistant turn that only calls tools may have no content; readers of replies get ""
        yield number, [m if m.get("content") is not None else {**m, "content": ""} for m in messages]


def encode_chat(tokenizer, messages: list[dict], **template_kwargs) -> tuple[list[int], list[int]]:
    """(token ids, assistant mask) of a rendered conversation; mask is 1 on reply tokens and their <|im_end|>."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True, **template_kwargs)
    return list(encoded["input_ids"]), list(encoded["assistant_masks"])


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation so far plus the header that asks the model for the next assistant turn."""
    messages, tools = template_inputs(messages)
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                              tools=tools, return_dict=True)["input_ids"])


def final_turn_labels(ids: list[int], mask: list[int]) -> list[int]:
    """Labels covering only the LAST assistant reply (DPO compares completions, not the shared history)."""
    labels = [-100] * len(ids)
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    labels[start:end] = ids[start:end]
    return labels


_worker_tokenizer = None


def _init_tokenizing_worker(tokenizer):
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    # a forked worker inherits the trainer's SIGTERM handler (save and stop), which would make Pool.terminate() hang
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _encode_lines(source: Source, chunk: list[tuple[int, object]]) -> list[tuple[int, list | None, str | None]]:
    """Per record (number, [(ids, mask), ...], None), or (number, None, why) for a bad one; runs in a tokenizing
    worker. Kind "sft": one sequence per record, masked on every assistant reply; "dpo": chosen then rejected, each
    masked on its final reply only (DPO compares completions, not the shared history)."""
    kind = source.kind
    dtype = np.uint16 if len(_worker_tokenizer) <= 65536 else np.uint32
    encoded = []
    for line_number, payload in chunk:
        obj, reason = source.prepare(payload)  # parsed, converted to MiniMind's form and checked, here in the worker
        if reason is not None:
            encoded.append((line_number, None, reason))
            continue
        sequences = []
        try:
            for messages in [obj["conversations"]] if kind == "sft" else [obj["chosen"], obj["rejected"]]:
                messages, tools = template_inputs(messages)
                ids, mask = encode_chat(_worker_tokenizer, messages, tools=tools)
                if kind == "dpo":
                    mask = [int(label != -100) for label in final_turn_labels(ids, mask)]
                sequences.append((np.asarray(ids, dtype=dtype), np.asarray(mask, dtype=np.uint8)))
        except (TemplateError, TypeError, ValueError) as error:
            # the checks in schema.py should leave nothing the template cannot render; should one slip through, it
            # is this line's error, not a traceback from a worker
            encoded.append((line_number, None, f"the chat template cannot render it ({type(error).__name__}: "
                                               f"{error})"))
            continue
        encoded.append((line_number, sequences, None))
    return encoded


def _chunks(source: Source, on_progress, records_per_chunk: int = 512):
    chunk = []
    for number, payload in source.payloads(on_progress):
        chunk.append((number, payload))
        if len(chunk) >= records_per_chunk:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_chat_cache(data_path: str, tokenizer, cache_file: str, skip_bad_lines: bool = False,
                     num_proc: int | None = None, show_progress: bool = True, kind: str = "sft") -> dict:
    """Render and tokenize every conversation once, in `num_proc` processes (default: one per core, up to 16,
    for files over 8 MB), into flat token and mask files plus an index (length, file line or record number, first
    masked position) of each sequence. Whole sequences are stored; max_seq_len is applied when a dataset opens the
    cache, so one cache serves every length. Written under temp names and renamed, the summary last: a cache whose
    summary exists is complete. A failed build (a bad line, an error in a worker, Ctrl-C) removes its temp files; a
    killed one's are removed by the next build."""
    import functools
    import multiprocessing

    from tqdm import tqdm
    source = open_source(data_path, kind, skip_bad_lines)
    if num_proc is None:
        num_proc = min(16, os.cpu_count() or 1) if source.nbytes() > 8e6 else 1
    directory = os.path.dirname(cache_file)
    os.makedirs(directory, exist_ok=True)
    sweep_stale_temps(directory, os.path.basename(os.path.normpath(data_path)) + ".")
    parts = {part: temp_path(cache_file + part) for part in (".ids", ".mask", ".index.npy", ".json")}
    stats, lengths, line_numbers, first_targets = {"bad_lines": 0, "lines": 0}, [], [], []
    dtype = np.uint16 if len(tokenizer) <= 65536 else np.uint32
    progress = tqdm(total=source.progress_total(), unit="B" if source.unit == "line" else " records",
                    unit_scale=source.unit == "line", disable=not show_progress,
                    desc=f"tokenizing {os.path.basename(os.path.normpath(data_path))} ({num_proc} proc)")
    chunks = _chunks(source, progress.update)
    encode = functools.partial(_encode_lines, source)
    pool = None
    if num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # each worker is one thread of Rust tokenizing
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        pool = context.Pool(num_proc, initializer=_init_tokenizing_worker, initargs=(tokenizer,))
        results = pool.imap(encode, chunks)  # in order, so the first bad line reported is the first in the file
    else:
        global _worker_tokenizer
        _worker_tokenizer = tokenizer
        results = map(encode, chunks)
    failed = True
    try:
        with open(parts[".ids"], "wb") as ids_out, open(parts[".mask"], "wb") as mask_out:
            for encoded in results:
                for line_number, sequences, reason in encoded:
                    stats["lines"] += 1
                    if sequences is None:
                        note_bad_line(data_path, line_number, reason, skip_bad_lines, stats, source.unit)
                        continue
                    for ids, mask in sequences:
                        ids_out.write(ids.tobytes())  # already `dtype`: the workers choose it the same way
                        mask_out.write(mask.tobytes())
                        lengths.append(len(ids))
                        line_numbers.append(line_number)
                        first_targets.append(int(mask.argmax()) if mask.any() else len(mask))
        if not lengths:
            raise no_usable(data_path, "conversations" if kind == "sft" else "pairs", stats, unit=source.unit)
        with open(parts[".index.npy"], "wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, np.asarray([lengths, line_numbers, first_targets], dtype=np.int64))
        summary = {"sequences": len(lengths), "tokens": int(sum(lengths)), "dtype": np.dtype(dtype).name,
                   "bad_lines": stats["bad_lines"], "first_bad_line": stats.get("first_bad_line")}
        with open(parts[".json"], "w") as f:
            json.dump(summary, f)
        remove_files([cache_file + ".json"])  # an old, damaged summary must not vouch for the new parts
        for part, tmp in parts.items():  # the summary last
            os.replace(tmp, cache_file + part)
        failed = False
    finally:
        if pool is not None and failed:
            pool.terminate()  # drop the chunks still queued
        elif pool is not None:
            pool.close()
            pool.join()
        progress.close()
        if failed:
            remove_files(parts.values())
    return summary


def check_chat_cache(cache_file: str):
    """What read_cache_summary asks of a chat cache: token, mask and index files that match the summary."""
    def check(summary: dict) -> str | None:
        tokens, itemsize = summary["tokens"], np.dtype(summary["dtype"]).itemsize
        sizes = (file_size(cache_file + ".ids"), file_size(cache_file + ".mask"))
        if sizes != (tokens * itemsize, tokens):
            return f"token and mask files of {sizes} bytes, the summary says {(tokens * itemsize, tokens)}"
        index = np.load(cache_file + ".index.npy", mmap_mode="r")
        if index.shape != (3, summary["sequences"]) or int(index[0].sum()) != tokens:
            return f"an index of shape {index.shape} for {summary['sequences']} sequences"
        if not {"bad_lines", "first_bad_line"} <= summary.keys():
            return "the summary lacks the skipped lines"
        return None
    return check


class ChatCache:
    """An opened chat cache (built first if missing): `ids` and `masks` memmaps, and per sequence its `starts`,
    `lengths`, file `line_numbers` and `first_targets` (position of the first masked token, or its length)."""

    def __init__(self, data_path: str, tokenizer, kind: str, skip_bad_lines: bool = False,
                 cache_dir: str | None = None, num_proc: int | None = None, show_progress: bool = True):
        if not os.path.exists(data_path):
            raise FileNotFoundError(f"data file not found: {data_path}")
        cache_file = token_cache_path(data_path, tokenizer, cache_dir, suffix=kind)
        summary = read_cache_summary(cache_file, [".ids", ".mask", ".index.npy"], check_chat_cache(cache_file))
        if summary is None:
            summary = build_chat_cache(data_path, tokenizer, cache_file, skip_bad_lines, num_proc, show_progress,
                                       kind)
        refuse_skipped_lines(summary, skip_bad_lines)  # a cache built with --skip_bad_lines 1
        self.bad_lines = summary["bad_lines"]
        self.ids = np.memmap(cache_file + ".ids", dtype=summary["dtype"], mode="r")
        self.masks = np.memmap(cache_file + ".mask", dtype=np.uint8, mode="r")
        self.lengths, self.line_numbers, self.first_targets = np.load(cache_file + ".index.npy")
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    def tokens(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of a stored sequence's first `length` tokens; labels are -100 outside the mask."""
        input_ids = torch.from_numpy(self.ids[start:start + length].astype(np.int64))
        labels = input_ids.masked_fill(torch.from_numpy(self.masks[start:start + length] == 0), -100)
        return input_ids, labels


class SFTDataset(Dataset):
    """Tokenized conversations with assistant-only labels.

    Rendering the chat template is slow (about 1.2 MB of jsonl a second per process), so a file is tokenized once,
    in parallel, into a cache beside it (`<data dir>/.cache`, or `cache_dir`) that later runs, other stages and the
    other ranks open instantly; neither the text nor the tokens are held in RAM. Samples longer than max_seq_len are
    dropped (`truncation="drop"`, the default: a cut reply teaches the model to stop mid-sentence without
    <|im_end|>) or cut to their first max_seq_len tokens (`"keep_prefix"`)."""

    def __init__(self, data_path: str, tokenizer, max_seq_len: int, skip_bad_lines: bool = False,
                 truncation: str = "drop", show_progress: bool = True, max_samples: int | None = None,
                 cache_dir: str | None = None, num_proc: int | None = None):
        if truncation not in ("drop", "keep_prefix"):
            raise ValueError(f"truncation must be 'drop' or 'keep_prefix', not {truncation!r}")
        self.path, self.max_seq_len = data_path, max_seq_len
        cache = self.cache = ChatCache(data_path, tokenizer, "sft", skip_bad_lines, cache_dir, num_proc, show_progress)
        too_long = cache.lengths > max_seq_len
        keep = ~too_long if truncation == "drop" else np.ones(len(cache.lengths), dtype=bool)
        self.starts, self.sample_lengths = cache.starts[keep], np.minimum(cache.lengths[keep], max_seq_len)
        self.line_numbers = cache.line_numbers[keep]
        has_target = cache.first_targets[keep] < self.sample_lengths  # a cut can leave a sample nothing to learn
        cut = int(too_long.sum())
        self.stats = {"bad_lines": cache.bad_lines, "dropped_too_long": cut if truncation == "drop" else 0,
                      "truncated": cut if truncation == "keep_prefix" else 0,
                      "no_target_tokens": int((~has_target).sum())}
        self._select(np.flatnonzero(has_target)[:max_samples] if max_samples else np.flatnonzero(has_target))
        if not len(self.starts):
            raise BadInput(f"{data_path}: no usable conversations ({self.stats})")

    def _select(self, rows: np.ndarray):
        self.starts, self.sample_lengths = self.starts[rows], self.sample_lengths[rows]
        self.line_numbers = self.line_numbers[rows]

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, index):
        input_ids, labels = self.cache.tokens(int(self.starts[index]), int(self.sample_lengths[index]))
        return {"input_ids": input_ids, "labels": labels}

    def lengths(self) -> np.ndarray:
        return self.sample_lengths

    def drop_conversations_replying(self, pattern: str) -> int:
        """Leave out every conversation with an assistant reply that starts with a match of the regular expression
        `pattern` (re.match); returns how many. Reads the file's text once, since the cache keeps only tokens."""
        regex = re.compile(pattern)
        matching = [number for number, messages in iter_numbered_conversations(self.path)
                    if any(m["role"] == "assistant" and regex.match(m["content"]) for m in messages)]
        keep = ~np.isin(self.line_numbers, matching)
        self._select(np.flatnonzero(keep))
        if not len(self.starts):
            raise BadInput(f"{self.path}: every conversation has a reply matching {pattern!r}")
        return int((~keep).sum())

    def split_held_out(self, fraction: float, seed: int = 0) -> "SFTDataset":
        """Move a random `fraction` of the samples (at least one, never all) into a new dataset and return it: the
        held-out set of a file with no _val.jsonl beside it (MiniMind's files have none). Random rather than the
        file's tail, which may be all one source; its line_numbers say where its conversations are in the file."""
        if len(self) < 2:
            raise BadInput(f"{self.path}: {len(self)} usable conversation(s): too few to hold any out")
        count = min(len(self) - 1, max(1, round(len(self) * fraction)))
        chosen = np.zeros(len(self), dtype=bool)
        chosen[np.random.default_rng(seed).choice(len(self), count, replace=False)] = True
        held_out = copy.copy(self)
        held_out.stats = {}
        held_out._select(np.flatnonzero(chosen))
        self._select(np.flatnonzero(~chosen))
        return held_out
