"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): while training, uniform
noise in [-a, a] is added to the input embeddings, a = alpha / sqrt(sequence length x hidden size), the formula of
transformers' `neftune_post_forward_hook` (tests/unit/test_neftune.py). Evaluation and generation (eval mode) see
the embeddings unchanged. The noise is meant to keep a small fine-tuning set from being learned token for token; on
the demo's identity adapter it did not beat dropout on the adapter's input (docs/lora.md)."""
import torch
from torch import nn


def add_embedding_noise(embeddings: nn.Embedding, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Noise on this embedding's output in training mode; `.remove()` on the returned handle turns it off."""
    def noisy(module, inputs, output):
        if not module.training:
            return output
        bound = alpha / (output.size(1) * output.size(2)) ** 0.5
        return output + torch.zeros_like(output).uniform_(-bound, bound)

    return embeddings.register_forward_hook(noisy)
