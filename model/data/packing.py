"""Batching variable-length chats: right padding to the batch's longest, or packing several conversations into
one row with a block-diagonal attention mask so almost no compute goes to padding."""
import numpy as np
import torch
from torch.utils.data import Dataset


def pad_collate(batch: list[dict], pad_token_id: int = 0, pad_to: int | None = None) -> dict:
    """Right-pad to the longest sample (or to `pad_to`, as MiniMind does with max_seq_len); padding gets label -100
    and attention_mask 0."""
    length = pad_to or max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = item["input_ids"], item["labels"], 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class PackedDataset(Dataset):
    """Groups variable-length samples into bins of at most max_seq_len tokens (first-fit over a seeded shuffle), so a
    batch of bins carries almost no padding. Each bin becomes one row: samples concatenated, position ids restarting
    at 0 for each sample, and a block-diagonal causal mask so no sample attends to another. The loss per sample is
    exactly what it would be unpacked (tested)."""

    def __init__(self, dataset, max_seq_len: int, seed: int = 0):
        self.dataset, self.max_seq_len = dataset, max_seq_len
        lengths = dataset.lengths()
        order = np.random.default_rng(seed).permutation(len(lengths))
        self.bins: list[list[int]] = []
        free: list[int] = []  # remaining room of each open bin
        for index in order:
            n = int(lengths[index])
            for b in range(max(0, len(free) - 8), len(free)):  # first fit among the last 8 open bins: O(n)
                room = free[b]
                if room >= n:
                    self.bins[b].append(int(index))
                    free[b] -= n
                    break
            else:
                self.bins.append([int(index)])
                free.append(max_seq_len - n)

    def __len__(self):
        return len(self.bins)

    def __getitem__(self, index):
        items = [self.dataset[i] for i in self.bins[index]]
        return {"input_ids": torch.cat([it["input_ids"] for it in items]),
                "labels": torch.cat([it["labels"] for it in items]),
                "position_ids": torch.cat([torch.arange(len(it["input_ids"])) for it in items]),
                "segment_ids": torch.cat([torch.full((len(it["input_ids"]),), k) for k, it in enumerate(items)])}

    def fill_ratio(self) -> float:
        return float(self.dataset.lengths().sum() / (len(self.bins) * self.max_seq_len))


def packed_collate(batch: list[dict], pad_token_id: int = 0) -> dict:
    """Pad bins to the longest one and build the [B, 1, T, T] block-diagonal causal mask from segment ids."""
    length = max(len(item["input_ids"]) for item in batch)
    n = len(batch)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    segments = torch.full((n, length), -1, dtype=torch.long)
    for row, item in enumerate(batch):
        k = len(item["input_ids"])
        input_ids[row, :k], labels[row, :k] = item["input_ids"], item["labels"]
        position_ids[row, :k], segments[row, :k] = item["position_ids"], item["segment_ids"]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_segment = segments[:, :, None] == segments[:, None, :]
    mask = (same_segment & causal)[:, None] | torch.eye(length, dtype=torch.bool)  # padding rows see themselves
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": mask}


class ChatCollate:
    """Packed rows or padded conversations -> a batch that also says how many real (non-padding) tokens it holds,
    so the Trainer's tokens/s counts work done, not padding. A class rather than a closure: DataLoader workers
    may need to pickle it."""

    def __init__(self, packed: bool, pad_token_id: int):
        self.packed, self.pad_token_id = packed, pad_token_id

    def __call__(self, items):
        batch = (packed_collate if self.packed else pad_collate)(items, self.pad_token_id)
        batch["tokens"] = sum(len(item["input_ids"]) for item in items)
        return batch


def training_batches(dataset, args, pad_token_id: int):
    """(dataset, collate_fn) for the Trainer: packed rows, or one conversation per row padded to the batch max."""
    if args.packing:
        return PackedDataset(dataset, args.max_seq_len, seed=args.seed), ChatCollate(True, pad_token_id)
    return dataset, ChatCollate(False, pad_token_id)
