"""What DPO computes with a model on a batch of preference pairs: the summed answer log-probs of chosen and
rejected, under the policy or the frozen reference (looked up in a table scored once, or a forward pass)."""
import functools

import torch
from torch.utils.data import DataLoader

from ..data.preference import IndexedPairs, collate_pairs
from .losses import sequence_logprobs


def pair_logps(model, batch: dict):
    """Summed answer log-probs of a [chosen; rejected] batch: (chosen [B], rejected [B], chosen and rejected
    token counts, the model output)."""
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    logps, n_tokens = sequence_logprobs(out.logits, batch["labels"])
    chosen, rejected = logps.chunk(2)
    chosen_n, rejected_n = n_tokens.chunk(2)
    return chosen, rejected, chosen_n, rejected_n, out


@torch.no_grad()
def precompute_reference_logps(reference, pairs: IndexedPairs, runtime, batch_size: int,
                               pad_token_id: int = 0) -> torch.Tensor:
    """[N, 2] table of log pi_ref(chosen), log pi_ref(rejected), row i for pair i. Each rank scores every
    world_size-th pair and an all-reduce assembles the full table on every rank."""
    table = torch.zeros(len(pairs), 2, device=runtime.device)
    mine = list(range(runtime.rank, len(pairs), runtime.world_size))
    loader = DataLoader(pairs, batch_size=batch_size, sampler=mine,
                        collate_fn=functools.partial(collate_pairs, pad_token_id=pad_token_id))
    was_training = reference.training
    reference.eval()
    for batch in loader:
        batch = {k: v.to(runtime.device) for k, v in batch.items()}
        with runtime.autocast():
            chosen, rejected, *_ = pair_logps(reference, batch)
        table[batch["index"]] = torch.stack([chosen, rejected], dim=1)
    if runtime.distributed:
        torch.distributed.all_reduce(table)  # every row was filled by exactly one rank, zeros elsewhere
    reference.train(was_training)
    return table


def reference_logps(reference, table: torch.Tensor | None, batch: dict):
    """log pi_ref of the batch's chosen and rejected answers: looked up by pair index, or a forward pass."""
    if table is not None:
        rows = table[batch["index"]]
        return rows[:, 0], rows[:, 1]
    with torch.no_grad():
        chosen, rejected, *_ = pair_logps(reference, batch)
    return chosen, rejected
