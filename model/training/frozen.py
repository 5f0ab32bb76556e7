"""Frozen models the policy is measured against: DPO's and GRPO's reference, distillation's teacher. Frozen means
eval mode (no dropout: it must be a fixed function) and no gradients (out of autograd and the optimizer)."""
import copy
import os

import torch

from ..checkpoint import check_same_tokenizer, load_state_into, load_weights, resolve_weight
from ..model import TinyMindForCausalLM


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the starting weights that never trains (take it before a resume loads other weights)."""
    return freeze(copy.deepcopy(model))


def load_frozen_checkpoint(spec: str, save_dir: str, hidden_size: int | None, tokenizer_path: str | None,
                           vocab_size: int, what: str, flag: str) -> tuple[TinyMindForCausalLM, str]:
    """One of our checkpoints (a stage name resolved in save_dir, or a .pth with its config JSON beside it),
    trained with the same tokenizer and vocabulary as the policy, frozen. Returns (model, the file). `flag`: the
    stage's flag for it, named in errors."""
    path = resolve_weight(spec, save_dir, hidden_size, flag)
    state, config = load_weights(path)
    if config is None:
        raise SystemExit(f"error: the {what} {path} has no config JSON beside it (saved by an older script?)")
    check_same_tokenizer(config, tokenizer_path, f"the {what} {path}")
    if config.vocab_size != vocab_size:
        raise SystemExit(f"error: the {what} {path} has vocab_size {config.vocab_size}, the policy {vocab_size}: "
                         "their log-probs are compared token id by token id, so both need the same tokenizer")
    model = TinyMindForCausalLM(config)
    load_state_into(model, state, path)
    return freeze(model), path


def is_transformers_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))
