"""Preference pairs for DPO: {"chosen": [messages], "rejected": [messages]} sharing their prompt (TRL's and ShareGPT's
pair formats are turned into it by formats.py), tokenized through the chat cache and masked on the final reply only
(DPO compares completions, not the shared history). An optional "type" string per pair (the demo's: how its rejected
answer was made) is carried through, so a held-out evaluation can be broken down by it."""
import hashlib
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..files import atomic_write_text
from .chat import ChatCache
from .formats import open_source
from .jsonl import BadInput, decode_line, token_cache_path
from .packing import pad_collate

# The pair types sit beside the token cache in <cache>.types.json (the token cache's own format is unchanged). Bump
# this when that file's layout changes: a file of another version counts as absent and is rebuilt.
TYPES_FORMAT_VERSION = 1


class DPODataset(Dataset):
    """MiniMind's DPO format: {"chosen": [messages], "rejected": [messages]} with identical prompts. Pairs longer
    than max_seq_len keep their start (TRL's keep_start), so the prompt survives; a pair whose completion is cut
    away entirely is dropped. Tokenized once into a cache, like SFTDataset (MiniMind's dpo.jsonl is 0.9 GB: as
    Python lists of token ids it would not fit in RAM on every rank)."""

    def __init__(self, data_path: str, tokenizer, max_seq_len: int, skip_bad_lines: bool = False,
                 show_progress: bool = True, cache_dir: str | None = None, num_proc: int | None = None):
        self.cache = ChatCache(data_path, tokenizer, "dpo", skip_bad_lines, cache_dir, num_proc, show_progress)
        lengths = self.cache.lengths.reshape(-1, 2)  # rows: (chosen, rejected)
        kept_lengths = np.minimum(lengths, max_seq_len)
        survives = (self.cache.first_targets.reshape(-1, 2) < kept_lengths).all(axis=1)
        self.starts, self.lengths = self.cache.starts.reshape(-1, 2)[survives], kept_lengths[survives]
        pair_lines = self.cache.line_numbers.reshape(-1, 2)[:, 0]
        all_types = read_pair_types(data_path, token_cache_path(data_path, tokenizer, cache_dir, suffix="dpo"),
                                    pair_lines)
        self.types = [t for t, keep in zip(all_types, survives) if keep]  # per pair: its "type", or None
        self.stats = {"bad_lines": self.cache.bad_lines, "dropped_no_completion": int((~survives).sum()),
                      "truncated": int((lengths > max_seq_len).sum())}
        if not len(self.starts):
            raise BadInput(f"{data_path}: no usable preference pairs ({self.stats})")

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, index):
        (chosen_start, rejected_start), (chosen_length, rejected_length) = self.starts[index], self.lengths[index]
        chosen_ids, chosen_labels = self.cache.tokens(int(chosen_start), int(chosen_length))
        rejected_ids, rejected_labels = self.cache.tokens(int(rejected_start), int(rejected_length))
        return {"chosen_input_ids": chosen_ids, "chosen_labels": chosen_labels,
                "rejected_input_ids": rejected_ids, "rejected_labels": rejected_labels, "type": self.types[index]}


def pair_types(pairs) -> list:
    """Each pair's "type" (None where the line has none) of a DPODataset, a Subset of one, or IndexedPairs around
    either, in the order of their indices."""
    if isinstance(pairs, IndexedPairs):
        pairs = pairs.pairs
    if isinstance(pairs, Subset):
        return [pair_types(pairs.dataset)[i] for i in pairs.indices]
    return list(pairs.types)


def read_pair_types(data_path: str, cache_file: str, pair_lines: np.ndarray) -> list:
    """The "type" of each cached pair (None where its record has none), from <cache_file>.types.json, written on
    first use by one pass over the file: a jsonl line is parsed only if it holds the bytes "type" (MiniMind's 0.9 GB
    dpo.jsonl has none, so its pass is a byte search). The file is written whole under a temp name and renamed, and
    it names the version and the pairs (their count and a digest of their line numbers) it was made for: one that
    does not match is rebuilt, so it is complete and current or absent, like the token cache beside it."""
    path = cache_file + ".types.json"
    lines_digest = hashlib.sha1(np.ascontiguousarray(pair_lines, dtype=np.int64).tobytes()).hexdigest()
    stamp = {"version": TYPES_FORMAT_VERSION, "pairs": int(len(pair_lines)), "lines_digest": lines_digest}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
            if all(stored.get(k) == v for k, v in stamp.items()) and len(stored["codes"]) == len(pair_lines):
                names = stored["names"]
                return [names[code] if code >= 0 else None for code in stored["codes"]]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            pass  # unreadable or of another version: rebuilt below
    wanted = set(int(n) for n in pair_lines)
    by_line = {}
    source = open_source(data_path, "dpo", skip_bad_lines=True)
    for number, payload in source.payloads():
        if number not in wanted:
            continue
        if isinstance(payload, bytes):
            if b'"type"' not in payload:
                continue
            try:
                payload = json.loads(decode_line(payload))
            except ValueError:
                continue  # a bad line never reached the cache
        value = payload.get("type") if isinstance(payload, dict) else None
        if isinstance(value, str) and value:
            by_line[number] = value
    names = sorted(set(by_line.values()))
    codes = [names.index(by_line[int(n)]) if int(n) in by_line else -1 for n in pair_lines]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(json.dumps({**stamp, "names": names, "codes": codes}), path)
    return [names[code] if code >= 0 else None for code in codes]


def dpo_collate(batch: list[dict], pad_token_id: int = 0) -> dict:
    """One batch [chosen_1..chosen_B; rejected_1..rejected_B], right-padded, so one forward scores both."""
    rows = [{"input_ids": b["chosen_input_ids"], "labels": b["chosen_labels"]} for b in batch]
    rows += [{"input_ids": b["rejected_input_ids"], "labels": b["rejected_labels"]} for b in batch]
    return pad_collate(rows, pad_token_id)


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
