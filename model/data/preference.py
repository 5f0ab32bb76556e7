"""Preference pairs for DPO: {"chosen": [messages], "rejected": [messages]} sharing their prompt (TRL's and ShareGPT's
pair formats are turned into it by formats.py), tokenized through the chat cache and masked on the final reply only
(DPO compares completions, not the shared history)."""
import numpy as np
import torch
from torch.utils.data import Dataset

from .chat import ChatCache
from .jsonl import BadInput
from .packing import pad_collate


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
                "rejected_input_ids": rejected_ids, "rejected_labels": rejected_labels}


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
