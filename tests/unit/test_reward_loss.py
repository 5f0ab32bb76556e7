"""model/training/reward_model.py against its references: the Bradley-Terry loss against TRL's own
RewardTrainer.compute_loss (run on fixed tensors, margin and centering included), the score against transformers'
LlamaForSequenceClassification / Qwen3ForSequenceClassification with copied weights, and the invariants (ln 2 at
equal rewards, padding never changes a score). fp32, tiny random configs."""
import collections
import math
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, Qwen3Config, Qwen3ForSequenceClassification

from model import TinyMindConfig, TinyMindForCausalLM
from model.training.reward_model import RewardModel, last_token_index, pair_rewards, reward_loss

VOCAB = 97


def tiny_config(**overrides) -> TinyMindConfig:
    settings = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256, rope_theta=10000.0)
    settings.update(overrides)
    return TinyMindConfig(**settings)


def reward_model(seed=0, **overrides) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(TinyMindForCausalLM(tiny_config(**overrides))).eval()


def fixed_rewards(count=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, generator=g) * 2, torch.randn(count, generator=g) * 2, torch.rand(count, generator=g)


def trl_loss(chosen, rejected, margin=None, center=None):
    """TRL's own RewardTrainer.compute_loss (trl/trainer/reward_trainer.py, trl 1.16.0: L778-795), run unbound with
    stand-ins for the trainer state it touches: the model's output is [chosen; rejected] as logits [2B, 1]."""
    trl = pytest.importorskip("trl")
    inputs = {"input_ids": torch.zeros(2 * len(chosen), 3, dtype=torch.long),
              "attention_mask": torch.ones(2 * len(chosen), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    logits = torch.cat([chosen, rejected]).unsqueeze(-1)
    accelerator = types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=accelerator,
                                    args=types.SimpleNamespace(center_rewards_coefficient=center),
                                    _metrics={"train": collections.defaultdict(list)},
                                    _total_train_tokens=0, _tp_size=1)
    return trl.RewardTrainer.compute_loss(trainer, lambda **kw: types.SimpleNamespace(logits=logits), inputs)


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01, 0.5])
def test_loss_and_gradients_match_trl_reward_trainer(with_margin, center):
    chosen, rejected, margin = fixed_rewards()
    margin = margin if with_margin else None
    ours_c, ours_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    ours = reward_loss(ours_c, ours_r, margin, center or 0.0).mean()
    ref_c, ref_r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    ref = trl_loss(ref_c, ref_r, margin, center)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours_c.grad, ref_c.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_r.grad, ref_r.grad, atol=1e-6, rtol=0)


def test_loss_is_ln2_at_equal_rewards_and_falls_as_chosen_wins():
    rewards = torch.tensor([-3.0, 0.0, 0.5, 7.0])
    torch.testing.assert_close(reward_loss(rewards, rewards), torch.full((4,), math.log(2)), atol=1e-7, rtol=0)
    losses = reward_loss(torch.tensor([0.0, 1.0, 3.0]), torch.zeros(3))
    assert losses[0] > losses[1] > losses[2]
    # a margin is a handicap: winning by exactly the margin is ln 2 again
    torch.testing.assert_close(reward_loss(torch.tensor([2.0]), torch.tensor([1.5]), torch.tensor([0.5])),
                               torch.tensor([math.log(2)]), atol=1e-7, rtol=0)
    # the pairwise loss sees differences only; the centering term does not
    shifted = reward_loss(rewards + 5, rewards.flip(0) + 5)
    torch.testing.assert_close(shifted, reward_loss(rewards, rewards.flip(0)), atol=1e-6, rtol=0)
    assert (reward_loss(rewards + 5, rewards + 5, center_coefficient=0.1) > math.log(2)).all()


def test_last_token_index_handles_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 0]


@pytest.mark.parametrize("qk_norm", [False, True])
def test_score_at_last_real_token_ignores_right_padding(qk_norm):
    model = reward_model(use_qk_norm=qk_norm)
    torch.manual_seed(1)
    lengths = [9, 4, 12]
    rows = [torch.randint(3, VOCAB, (n,)) for n in lengths]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).rewards
        alone = torch.cat([model(row[None]).rewards for row in rows])
        # the head reads the hidden state at position n-1, nothing after it
        unpadded_hidden, _ = model.model(rows[1][None])
        by_hand = unpadded_hidden[0, -1].float() @ model.score.weight[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[1], by_hand, atol=1e-5, rtol=0)


def sequence_classifier(config: TinyMindConfig):
    """transformers' *ForSequenceClassification our config describes, num_labels 1, pad id 0."""
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                  num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                  head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
                  rms_norm_eps=config.rms_norm_eps, rope_parameters=dict(config.rope_parameters),
                  attention_bias=False, num_labels=1, pad_token_id=0)
    if config.use_qk_norm:
        return Qwen3ForSequenceClassification(Qwen3Config(**common))
    return LlamaForSequenceClassification(LlamaConfig(mlp_bias=False, **common))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_score_equals_transformers_sequence_classification_with_copied_weights(qk_norm):
    """Our state dict loads into Llama/Qwen3ForSequenceClassification with no key mapping (lm_head aside, which
    a classifier has not), and both give the same score for right- and left-padded rows."""
    ours = reward_model(use_qk_norm=qk_norm)
    ref = sequence_classifier(ours.config).eval()
    state = {k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in key for key in missing), missing
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (4, 11))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    mask[3, 2:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits[:, 0]
        got = ours(ids, attention_mask=mask).rewards
    assert got.shape == (4,)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_checkpoint_keys_are_the_language_models_plus_the_head():
    torch.manual_seed(0)
    language_model = TinyMindForCausalLM(tiny_config())
    lm_keys = set(language_model.state_dict())
    model = RewardModel(language_model)
    assert set(model.state_dict()) == lm_keys | {"score.weight"}
    assert model.score.weight.shape == (1, 64) and model.score.bias is None
    assert model.score.weight.std().item() == pytest.approx(1 / math.sqrt(65), rel=0.3)
    # tied: the LM head is the embedding and trains with it; untied: frozen, the reward never uses it
    assert model.lm_head.weight.requires_grad
    untied = RewardModel(TinyMindForCausalLM(tiny_config(tie_word_embeddings=False)))
    assert not untied.lm_head.weight.requires_grad and untied.model.embed_tokens.weight.requires_grad
    lm_flops = language_model.flops_per_token(128)
    assert model.flops_per_token(128) == lm_flops - 6 * (VOCAB * 64 - 64)


def test_pair_rewards_splits_a_chosen_then_rejected_batch_and_the_loss_trains_the_trunk():
    model = reward_model().train()
    torch.manual_seed(3)
    batch = {"input_ids": torch.randint(3, VOCAB, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    chosen, rejected, aux = pair_rewards(model, batch)
    all_rewards = model(batch["input_ids"], attention_mask=batch["attention_mask"]).rewards
    torch.testing.assert_close(torch.cat([chosen, rejected]), all_rewards, atol=0, rtol=0)
    assert aux is None and chosen.dtype == torch.float32
    reward_loss(chosen, rejected).mean().backward()
    assert model.score.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
