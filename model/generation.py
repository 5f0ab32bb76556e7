"""Batched generation for evaluation and RL: prompts of different lengths are left-padded into one batch, so every
row's last prompt token sits in the last column and `generate` continues all rows at once with the KV cache. The
attention mask hides the padding and the model derives positions from it (each row's first real token is
position 0), so a padded row computes exactly what it would alone."""
import contextlib

import torch


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, longest] token ids padded on the left, and the [N, longest] attention mask (1 on real tokens)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, width - len(sequence):] = torch.as_tensor(sequence, dtype=torch.long)
            mask[row, width - len(sequence):] = 1
    return ids, mask


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation rendered with the chat template, ending with the assistant header the reply follows."""
    return tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"]


@torch.no_grad()
def greedy_generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 16,
                    autocast=contextlib.nullcontext) -> list[list[int]]:
    """The greedy continuation of each conversation (token ids after its prompt, `max_new_tokens` of them unless
    every row of its batch stopped earlier), `batch_size` conversations per generate call, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    rows = []
    for start in range(0, len(conversations), batch_size):
        prompts = [chat_prompt_ids(tokenizer, c) for c in conversations[start:start + batch_size]]
        input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
        with autocast():
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        rows += out[:, input_ids.shape[1]:].tolist()
    model.train(was_training)
    return rows
