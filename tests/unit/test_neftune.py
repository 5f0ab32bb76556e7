"""NEFTune's embedding noise against transformers' own hook: the same output from the same random state in training
mode, nothing added in eval mode, and a noise bound of alpha / sqrt(length x hidden)."""
import copy

import pytest
import torch
from transformers.integrations.neftune import neftune_post_forward_hook

from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
from model.training.neftune import add_embedding_noise


@pytest.mark.parametrize("alpha", [5.0, 10.0])
def test_noise_matches_transformers_hook_in_training_and_is_off_in_eval(alpha):
    torch.manual_seed(0)
    ours = TinyMindForCausalLM(TinyMindConfig(**PRESETS["nano"]))
    reference = copy.deepcopy(ours)
    handle = add_embedding_noise(ours.model.embed_tokens, alpha)
    reference.model.embed_tokens.neftune_noise_alpha = alpha
    reference.model.embed_tokens.register_forward_hook(neftune_post_forward_hook)
    ids = torch.randint(0, ours.config.vocab_size, (3, 17))
    for model in (ours, reference):
        model.train()
    torch.manual_seed(1)
    noisy = ours(ids).logits
    torch.manual_seed(1)
    expected = reference(ids).logits
    torch.testing.assert_close(noisy, expected, rtol=0, atol=1e-6)

    clean_embeddings = ours.model.embed_tokens.weight[ids]
    noise = ours.model.embed_tokens(ids) - clean_embeddings
    bound = alpha / (17 * ours.config.hidden_size) ** 0.5
    assert noise.abs().max() <= bound and noise.abs().max() > 0.9 * bound

    ours.eval()
    assert torch.equal(ours.model.embed_tokens(ids), clean_embeddings)
    ours.train()
    handle.remove()
    assert torch.equal(ours.model.embed_tokens(ids), clean_embeddings)
    assert not torch.allclose(ours(ids).logits, noisy)
