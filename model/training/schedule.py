"""The learning-rate schedule and the data order: both are pure functions of (step, seed, epoch), which is what
makes a resumed run see exactly what an uninterrupted one would."""
import math

import torch
from torch.utils.data import Sampler


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to the peak, then cosine decay to min_lr_ratio * peak at the last step (step total_steps - 1:
    steps count from 0, so a schedule that reached its floor at total_steps would never use it)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class ResumableSampler(Sampler):
    """Shuffled order fixed by (seed, epoch), split across ranks, able to start mid-epoch: resuming at sample k
    sees exactly the samples an uninterrupted run would have seen next. Drops the tail that does not split
    evenly across ranks (every rank must run the same number of steps, or DDP hangs)."""

    def __init__(self, num_samples: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, start: int = 0):
        self.num_samples, self.seed, self.epoch = num_samples, seed, epoch
        self.rank, self.world_size, self.shuffle, self.start = rank, world_size, shuffle, start

    def indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank = self.num_samples // self.world_size
        return order[self.rank:per_rank * self.world_size:self.world_size][self.start:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self):
        return max(0, self.num_samples // self.world_size - self.start)
