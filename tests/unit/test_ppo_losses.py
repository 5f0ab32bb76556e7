"""model/training/ppo.py against TRL's PPOTrainer and against the invariants PPO's formulas must satisfy.

TRL 1.16 (installed) no longer ships the PPO trainer; it lives in the TRL repository at
trl/experimental/ppo/ppo_trainer.py, which exposes masked_mean / masked_var / masked_whiten as module functions and
computes rewards, GAE and the two losses inline in PPOTrainer.train(). Both are transcribed below from commit
f2cd57710ae345ea6428ae95363267fcf38a3dc8 (file and line numbers given), and
`test_trl_source_still_has_transcribed_lines` re-reads that file whenever an installed TRL has it. Fixed fp32 (and
fp64) tensors; values and gradients compared at 1e-6.
"""
import importlib.util
import os

import pytest
import torch

from model.training.losses import k3_kl
from model.training.ppo import (gae, kl_estimate, kl_penalty_rewards, masked_mean, masked_var, masked_whiten,
                                ppo_policy_loss, ppo_value_loss)

ATOL = 1e-6


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def prefix_mask(lengths, width):
    """1 on the first `length` tokens of each row (a completion mask: real tokens up to and including <|im_end|>)."""
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()


# ---------------------------------------------------------------------------------------------------------------
# TRL, transcribed: trl/experimental/ppo/ppo_trainer.py at f2cd57710ae345ea6428ae95363267fcf38a3dc8
# ---------------------------------------------------------------------------------------------------------------
TRL_FILE = "experimental/ppo/ppo_trainer.py"
TRL_LINES = [
    "return (values * mask).sum() / mask.sum()",  # L242 masked_mean
    "bessel_correction = mask_sum / (mask_sum - 1)",  # L259 masked_var
    "whitened = (values - mean) * torch.rsqrt(var + 1e-8)",  # L267 masked_whiten
    "kl = -logr if args.kl_estimator == \"k1\" else (logr.exp() - 1) - logr  # Else statement is k3",  # L774
    "non_score_reward = -args.kl_coef * kl",  # L775
    "actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)",  # L778
    "delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]",  # L792
    "lastgaelam = delta + args.gamma * args.lam * lastgaelam",  # L793
    "vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask_p1[micro_batch_inds])",  # L837
    "pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)",  # L844
    "pg_loss = masked_mean(pg_loss_max, ~padding_mask[micro_batch_inds])",  # L846
]


def test_trl_source_still_has_transcribed_lines():
    spec = importlib.util.find_spec("trl")  # locates the package without importing it
    path = os.path.join(os.path.dirname(spec.origin), TRL_FILE) if spec else None
    if path is None or not os.path.exists(path):
        pytest.skip(f"the installed trl has no {TRL_FILE} (TRL 1.16 dropped it from the wheel)")
    source = open(path, encoding="utf-8").read()
    for line in TRL_LINES:
        assert line in source, f"TRL changed: {line!r} not found in trl/{TRL_FILE}; re-check the transcription"


def trl_masked_mean(values, mask):  # L237-242
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask, unbiased=True):  # L245-261
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def trl_masked_whiten(values, mask, shift_mean=True):  # L264-270
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_rewards(logprobs, ref_logprobs, scores, sequence_lengths, kl_coef, kl_estimator):  # L771-779
    """`sequence_lengths` is TRL's: the index of the last real token (first pad index - 1). Padding positions
    hold INVALID_LOGPROB in both log-prob tensors (L765-766), so their KL is 0."""
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    sequence_lengths_p1 = sequence_lengths + 1
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    return rewards, kl


def trl_gae(rewards, values, gamma, lam, padding_mask):  # L786-798
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = trl_masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return advantages, returns


def trl_policy_loss(new_logprobs, mb_logprobs, mb_advantage, padding_mask, cliprange):  # L840-849
    logprobs_diff = new_logprobs - mb_logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = trl_masked_mean(pg_loss_max, ~padding_mask)
    pg_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    return pg_loss, pg_clipfrac


def trl_value_loss(vpred, mb_values, mb_return, padding_mask_p1, cliprange_value):  # L829-840
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * trl_masked_mean(vf_loss_max, ~padding_mask_p1)
    vf_clipfrac = trl_masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    return vf_loss, vf_clipfrac


# ---------------------------------------------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_trl(shift_mean):
    values = torch.randn(5, 9, generator=gen(0)) * 3 + 1.5
    mask = prefix_mask([9, 4, 1, 7, 2], 9)
    ours = masked_whiten(values, mask, shift_mean=shift_mean)
    theirs = torch.masked_fill(trl_masked_whiten(values, mask.bool(), shift_mean=shift_mean), ~mask.bool(), 0)
    close(ours, theirs)
    close(masked_var(values, mask), trl_masked_var(values, mask.bool()))
    close(masked_mean(values, mask), trl_masked_mean(values, mask.bool()))
    if shift_mean:  # over the real tokens: mean 0, unbiased std 1
        kept = ours[mask.bool()]
        close(kept.mean(), torch.tensor(0.0))
        close(kept.std(), torch.tensor(1.0), atol=1e-5)


def test_masked_var_needs_two_values():
    with pytest.raises(ValueError, match="fewer than 2"):
        masked_var(torch.ones(1, 3), prefix_mask([1], 3))


# ---------------------------------------------------------------------------------------------------------------
# KL estimators and the per-token rewards
# ---------------------------------------------------------------------------------------------------------------

def test_k1_and_k3_match_trl_and_are_unbiased_for_kl():
    logps = torch.log_softmax(torch.randn(4, 6, generator=gen(1)), dim=-1)
    ref = torch.log_softmax(torch.randn(4, 6, generator=gen(2)), dim=-1)
    logr = ref - logps
    close(kl_estimate(logps, ref, "k1"), -logr)
    close(kl_estimate(logps, ref, "k3"), (logr.exp() - 1) - logr)
    close(kl_estimate(logps, ref, "k3"), k3_kl(logps, ref))
    assert (kl_estimate(logps, ref, "k3") >= 0).all()
    with pytest.raises(ValueError):
        kl_estimate(logps, ref, "k2")
    # Over tokens sampled from pi, both average to KL(pi || pi_ref) (k1 exactly in expectation, k3 too).
    p, q = torch.log_softmax(torch.tensor([1.0, 0.2, -0.5, 0.3]), 0), torch.log_softmax(torch.tensor([0.1, 0.9, 0.0,
                                                                                                       -1.0]), 0)
    exact = (p.exp() * (p - q)).sum()
    tokens = torch.multinomial(p.exp(), 400_000, replacement=True, generator=gen(3))
    for estimator in ("k1", "k3"):
        assert kl_estimate(p[tokens], q[tokens], estimator).mean() == pytest.approx(exact.item(), abs=5e-3)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_rewards_match_trl_with_the_score_on_the_last_real_token(estimator):
    """Same per-token KL rewards as TRL. The score: TRL adds it at sequence_length + 1 (the first pad slot, trl
    issue #3750) when that is inside the tensor, at the last token otherwise; we add it at the last real token. So
    rows that fill the whole width (truncated replies) agree exactly, and the others agree once TRL's score is
    moved one position left."""
    width, lengths = 7, [7, 3, 5, 1]
    mask = prefix_mask(lengths, width)
    logps = torch.randn(4, width, generator=gen(4)) - 2
    ref = torch.randn(4, width, generator=gen(5)) - 2
    scores = torch.tensor([1.5, -0.7, 0.3, 2.0])
    ours, kl = kl_penalty_rewards(logps, ref, scores, mask, kl_coef=0.05, estimator=estimator)
    padding = ~mask.bool()
    invalid = 1.0  # TRL's INVALID_LOGPROB on padding (L765-766)
    theirs, trl_kl = trl_rewards(logps.masked_fill(padding, invalid), ref.masked_fill(padding, invalid), scores,
                                 torch.tensor(lengths) - 1, 0.05, estimator)
    close(kl, trl_kl)
    close(ours[0], theirs[0])  # full-width row: the same position
    for row, length in enumerate(lengths[1:], start=1):
        moved = theirs[row].clone()
        moved[length] -= scores[row]
        moved[length - 1] += scores[row]
        close(ours[row], moved)
    assert (ours[padding] == 0).all()
    # the score is the only non-KL reward, and sums back per row
    close((ours + 0.05 * kl).sum(dim=1), scores)


# ---------------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------------

def reference_gae(rewards, values, lengths, gamma, lam):
    """A_t = sum_{k >= 0} (gamma lam)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t, V = 0 after the last real
    token: the definition (Schulman et al. 2016 eq. 16), one row and one token at a time."""
    advantages = torch.zeros_like(values)
    for i, n in enumerate(lengths):
        for t in range(n):
            total = 0.0
            for k in range(n - t):
                s = t + k
                next_value = values[i, s + 1] if s + 1 < n else 0.0
                delta = rewards[i, s] + gamma * next_value - values[i, s]
                total += (gamma * lam) ** k * delta
            advantages[i, t] = total
    return advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_definition_and_trl(gamma, lam):
    width, lengths = 8, [8, 5, 1, 3]
    mask = prefix_mask(lengths, width)
    rewards = torch.randn(4, width, generator=gen(6), dtype=torch.float64) * mask
    values = torch.randn(4, width, generator=gen(7), dtype=torch.float64) * mask
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    close(advantages, reference_gae(rewards, values, lengths, gamma, lam))
    close(returns, (advantages + values) * mask)
    # TRL's loop, fed the same masked rewards and values, gives the same advantages and returns on real tokens,
    # and the same whitened advantages.
    trl_advantages, trl_returns = trl_gae(rewards, values, gamma, lam, ~mask.bool())
    close(returns, trl_returns * mask)
    close(masked_whiten(advantages, mask), trl_advantages)


def test_gae_with_gamma_and_lambda_one_gives_reward_to_go_and_lambda_zero_the_td_error():
    width, lengths = 6, [6, 4, 2]
    mask = prefix_mask(lengths, width)
    rewards = torch.randn(3, width, generator=gen(8), dtype=torch.float64) * mask
    values = torch.randn(3, width, generator=gen(9), dtype=torch.float64) * mask
    _, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    reward_to_go = rewards.flip(1).cumsum(1).flip(1) * mask
    close(returns, reward_to_go)  # whatever the values: they cancel out
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros(3, 1, dtype=values.dtype)], dim=1) * mask
    close(advantages, (rewards + next_values - values) * mask)
    # a score-only reward and a perfect critic (V_t = the score it will get) leave nothing to learn
    scores = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    score_rewards, _ = kl_penalty_rewards(torch.zeros(3, width, dtype=torch.float64),
                                          torch.zeros(3, width, dtype=torch.float64), scores, mask, 0.05)
    advantages, returns = gae(score_rewards, scores[:, None] * mask, mask, gamma=1.0, lam=0.95)
    close(advantages, torch.zeros_like(advantages))
    close(returns, scores[:, None] * mask)


# ---------------------------------------------------------------------------------------------------------------
# The clipped losses
# ---------------------------------------------------------------------------------------------------------------

def test_policy_loss_and_its_gradient_match_trl():
    width, lengths = 6, [6, 2, 4, 5]
    mask = prefix_mask(lengths, width)
    old = torch.randn(4, width, generator=gen(10)) - 1.5
    advantages = masked_whiten(torch.randn(4, width, generator=gen(11)), mask)
    base = old + 0.4 * torch.randn(4, width, generator=gen(12))  # ratios from ~0.5 to ~2: both clip sides active
    ours_logps, trl_logps = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss, metrics = ppo_policy_loss(ours_logps, old, advantages, mask, cliprange=0.2)
    theirs, clipfrac = trl_policy_loss(trl_logps, old, advantages, ~mask.bool(), 0.2)
    close(loss, theirs)
    close(metrics["pg_clipfrac"], clipfrac)
    assert 0.1 < metrics["pg_clipfrac"] < 0.9
    loss.backward()
    theirs.backward()
    close(ours_logps.grad, trl_logps.grad)
    assert (ours_logps.grad[~mask.bool()] == 0).all()


def test_value_loss_and_its_gradient_match_trl():
    width, lengths = 6, [6, 3, 1, 4]
    mask = prefix_mask(lengths, width)
    old_values = torch.randn(4, width, generator=gen(13)) * mask
    returns = torch.randn(4, width, generator=gen(14)) * mask
    base = old_values + 0.5 * torch.randn(4, width, generator=gen(15))
    ours_v, trl_v = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss, metrics = ppo_value_loss(ours_v, old_values, returns, mask, cliprange_value=0.2)
    theirs, clipfrac = trl_value_loss(trl_v, old_values, returns, ~mask.bool(), 0.2)
    close(loss, theirs)
    close(metrics["vf_clipfrac"], clipfrac)
    assert 0.1 < metrics["vf_clipfrac"] < 0.9
    loss.backward()
    theirs.backward()
    close(ours_v.grad, trl_v.grad)


def test_ratio_one_and_zero_advantage_give_zero_policy_gradient():
    mask = prefix_mask([5, 3], 5)
    logps = (torch.randn(2, 5, generator=gen(16)) - 1).requires_grad_()
    loss, metrics = ppo_policy_loss(logps, logps.detach(), torch.zeros(2, 5), mask)
    loss.backward()
    assert loss.item() == 0.0 and (logps.grad == 0).all()
    assert metrics["ratio"].item() == pytest.approx(1.0) and metrics["approxkl"].item() == 0.0
    # ratio 1, nonzero advantage: the plain policy gradient -A * grad log pi / tokens, nothing clipped
    logps.grad = None
    advantages = torch.randn(2, 5, generator=gen(17))
    loss, metrics = ppo_policy_loss(logps, logps.detach(), advantages, mask)
    loss.backward()
    close(logps.grad, -advantages * mask / mask.sum())
    assert metrics["pg_clipfrac"].item() == 0.0


def test_clipped_tokens_get_no_gradient():
    """rho > 1 + eps with A > 0, or rho < 1 - eps with A < 0: the clipped term is the max and is constant."""
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]])).requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    loss, metrics = ppo_policy_loss(logps, old, advantages, torch.ones(1, 4), cliprange=0.2)
    loss.backward()
    assert logps.grad[0, 0] == 0 and logps.grad[0, 1] == 0  # clipped
    assert logps.grad[0, 2] != 0 and logps.grad[0, 3] != 0  # the unclipped side is the pessimistic one
    assert metrics["pg_clipfrac"].item() == 0.5


def test_value_loss_is_zero_at_the_returns_and_clipping_bounds_the_move():
    mask = prefix_mask([4, 2], 4)
    returns = torch.randn(2, 4, generator=gen(18)) * mask
    values = returns.clone().requires_grad_()
    loss, _ = ppo_value_loss(values, returns, returns, mask)
    loss.backward()
    assert loss.item() == 0.0 and (values.grad == 0).all()
    # old value 0, target 1, new value 0.5: the clipped value (0.2) is further from the target, so it counts
    loss, metrics = ppo_value_loss(torch.tensor([[0.5]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]),
                                   torch.ones(1, 1), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.8 ** 2) and metrics["vf_clipfrac"].item() == 1.0


def test_a_normaliser_splits_a_mini_batch_into_micro_batches_without_changing_it():
    """Micro-batch losses divided by (mini-batch tokens / micro-batches), summed over micro-batches and divided by
    their number (what the engine and accumulation do), equal the whole mini-batch's token mean."""
    mask = prefix_mask([6, 1, 3, 5], 6)
    logps, old = torch.randn(4, 6, generator=gen(19)), torch.randn(4, 6, generator=gen(20))
    advantages = torch.randn(4, 6, generator=gen(21))
    whole, _ = ppo_policy_loss(logps, old, advantages, mask)
    normaliser = mask.sum() / 2
    halves = [ppo_policy_loss(logps[s], old[s], advantages[s], mask[s], normaliser=normaliser)[0]
              for s in (slice(0, 2), slice(2, 4))]
    close(sum(halves) / 2, whole)
