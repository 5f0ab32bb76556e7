"""The arithmetic of PPO-RLHF (Ziegler et al. 2019, arXiv 1909.08593; InstructGPT, Ouyang et al. 2022), one short
function per formula, as TRL's PPOTrainer computes them (trl/experimental/ppo/ppo_trainer.py; the tests in
tests/unit/test_ppo_losses.py compare each with TRL's expressions on fixed tensors).

Shapes: every per-token tensor is [N, T] over the completion tokens of N rollouts; `mask` is 1 on the completion's
real tokens (up to and including its first <|im_end|>, see rollouts.completion_mask_from_ids) and 0 after.
Position t of `values` is V(s_t), the value of the state BEFORE completion token t is generated, so
V_{t+1} is the value after it; past the last real token the episode is over and V = 0.

One rollout's quantities, in the order train_ppo.py computes them:
    r_t  = -kl_coef * KL_t  (+ the reward model's score at the last real token)   kl_penalty_rewards
    A_t  = GAE(gamma, lambda) over r and V;  R_t = A_t + V_t  (the value target)   gae
    A_t <- (A_t - mean A) / std A  over the real tokens of the batch               masked_whiten
then, for every mini-batch of every PPO epoch:
    L_pi = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))              ppo_policy_loss
    L_V  = 0.5 mean_t max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2) ppo_value_loss
    loss = L_pi + vf_coef * L_V
"""
from __future__ import annotations

import torch

from .losses import k3_kl

__all__ = ["masked_mean", "masked_var", "masked_whiten", "kl_estimate", "kl_penalty_rewards", "gae",
           "ppo_policy_loss", "ppo_value_loss"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, normaliser=None) -> torch.Tensor:
    """sum(mask * x) / sum(mask); `normaliser` replaces sum(mask) (a whole step's token count, so that micro-batches
    of one mini-batch weigh every token the same, as grpo_loss's num_items_in_batch)."""
    mask = mask.to(values.dtype)
    denominator = mask.sum() if normaliser is None else torch.as_tensor(normaliser).to(values)
    return (values * mask).sum() / denominator.clamp(min=1e-8)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries, with Bessel's correction n / (n - 1) as TRL's masked_var."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError("masked_var: fewer than 2 unmasked values (the unbiased variance needs 2 or more)")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries (TRL's masked_whiten: unbiased variance, eps 1e-8).
    shift_mean False adds the mean back (only the scale changes). Masked-out entries come back as 0, which is what
    TRL does right after each call (masked_fill)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(whitened.dtype)


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of tokens sampled from pi (Schulman 2020,
    "Approximating KL divergence"), with log r = log pi_ref - log pi:
        k1 = -log r = log pi - log pi_ref      unbiased, can be negative per token (TRL's default)
        k3 = (r - 1) - log r  >= 0             unbiased, lower variance (losses.k3_kl)"""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        return k3_kl(logps, ref_logps)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1 or k3")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[N] index of each row's last real token (mask is a prefix of ones: completion_mask_from_ids)."""
    return (mask.long().sum(dim=1) - 1).clamp(min=0)


def kl_penalty_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                       kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of RLHF (Ziegler et al. 2019 eq. 2; InstructGPT eq. 2; TRL "4. compute rewards"):
        r_t = -kl_coef * KL_t + [t == last real token] * score
    The sequence-level reward-model score lands on the LAST REAL TOKEN (the <|im_end|>, or the final token of a
    reply cut off at the length limit). TRL adds it one position later, on the first padding slot (sequence_lengths
    + 1, see trl issue #3750 and PR #5338); with gamma = 1 that moves lambda^1 of it into the last token's
    advantage instead of all of it. Returns (rewards [N, T], the per-token KL [N, T]), both 0 where mask is 0."""
    mask = mask.to(logps.dtype)
    kl = kl_estimate(logps, ref_logps, estimator) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438, eq. 16), right to left:
        delta_t = r_t + gamma * V_{t+1} - V_t          (V = 0 past the last real token: the episode ended)
        A_t     = delta_t + gamma * lam * A_{t+1}      i.e. A_t = sum_k (gamma lam)^k delta_{t+k}
        R_t     = A_t + V_t                            (the value target, "returns")
    gamma = lam = 1 gives A_t + V_t = the reward-to-go sum_{k>=t} r_k; lam = 0 gives the one-step TD error.
    Returns (advantages, returns), both [N, T] and 0 where mask is 0."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    return advantages * mask, (advantages + values) * mask


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    cliprange: float = 0.2, normaliser=None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7), as a loss to minimise:
        rho_t = exp(log pi_theta - log pi_old)
        L = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))     (TRL: pg_loss_max, masked_mean)
    Metrics (detached): clipfrac = share of tokens where the clipped term is the larger (TRL's pg_clipfrac, those
    get no gradient), approxkl = 0.5 mean (log rho)^2, ratio = mean rho."""
    ratio = torch.exp(logps - old_logps)
    losses = -advantages * ratio
    clipped_losses = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(losses, clipped_losses), mask, normaliser)
    with torch.no_grad():
        metrics = {"pg_clipfrac": masked_mean((clipped_losses > losses).float(), mask),
                   "approxkl": 0.5 * masked_mean((logps - old_logps) ** 2, mask),
                   "ratio": masked_mean(ratio, mask)}
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   cliprange_value: float = 0.2, normaliser=None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (PPO2 baselines; TRL's vf_loss):
        V_clip = clip(V, V_old - c, V_old + c)
        L_V = 0.5 * mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)
    The max makes the clipped value a pessimistic bound: the critic cannot move more than c from the value it had
    at rollout time in one PPO round. Metric: vf_clipfrac = share of tokens where the clipped term is larger."""
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    losses = (values - returns) ** 2
    clipped_losses = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, clipped_losses), mask, normaliser)
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean((clipped_losses > losses).float(), mask)}
    return loss, metrics
