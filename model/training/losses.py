"""Losses shared by the post-training scripts (SFT, DPO, GRPO, distillation), written to be read next to the papers.

Conventions used throughout:
- logits are [B, T, V]; log-probabilities are computed in fp32 whatever the logits' dtype (bf16 log-softmax
  over a large vocabulary loses too much precision for ratios like exp(logp - old_logp)).
- "masked" positions hold labels == -100 (ignore_index) or completion_mask == 0 and contribute nothing.
- Sequence log-probabilities are SUMS over completion tokens, never means (DPO's log pi(y|x) is a sum; averaging
  silently changes the objective; see references.md section 4).

Reference implementations these were checked against (tests/unit/test_losses.py): TRL 1.16 `trainer/dpo_trainer.py`
(`_compute_loss`), `trainer/grpo_trainer.py` (`_compute_loss`, reward normalisation), and
`experimental/gkd/gkd_trainer.py` (`generalized_jsd_loss`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "token_logprobs", "sequence_logprobs", "dpo_loss", "group_advantages", "k3_kl", "grpo_loss", "kd_loss",
    "generalized_jsd", "distillation_loss",
]


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities of given tokens
# ----------------------------------------------------------------------------------------------------------------

def _row_chunks(logits: torch.Tensor, chunk_size: int):
    """Yield (row index slice, [n, V] view) over all B*T positions without copying the logits.

    logits[:, :-1] (the usual shifted slice) cannot be flattened to [B*T, V] without a copy, so in that case we
    walk each batch row separately; each yielded block is then a view.
    """
    B, T, V = logits.shape
    try:
        flat = logits.view(B * T, V)
        for s in range(0, B * T, chunk_size):
            yield slice(s, min(s + chunk_size, B * T)), flat[s:s + chunk_size]
    except RuntimeError:  # not viewable as [B*T, V]
        for b in range(B):
            for s in range(0, T, chunk_size):
                e = min(s + chunk_size, T)
                yield slice(b * T + s, b * T + e), logits[b, s:e]


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(z / temperature)[target] computed chunk by chunk, with a hand-written backward.

    Forward keeps only the per-position logsumexp ([B*T] floats); backward recomputes softmax per chunk:
        d logp / d z_v = (1[v == target] - softmax(z / temperature)_v) / temperature.
    So neither pass ever holds a full [B, T, V] fp32 log-softmax, which is what would dominate memory for a
    large vocabulary (autograd through log_softmax + gather would save it).
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk_size, temperature):
        B, T, V = logits.shape
        # at least fp32 (bf16/fp16 are upcast); fp64 stays fp64 so torch.autograd.gradcheck can test this function
        dtype = torch.promote_types(logits.dtype, torch.float32)
        flat_targets = targets.reshape(B * T)
        lse = torch.empty(B * T, dtype=dtype, device=logits.device)
        out = torch.empty(B * T, dtype=dtype, device=logits.device)
        for rows, block in _row_chunks(logits, chunk_size):
            z = block.to(dtype) / temperature
            lse[rows] = torch.logsumexp(z, dim=-1)
            out[rows] = z.gather(-1, flat_targets[rows, None]).squeeze(-1) - lse[rows]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out.view(B, T)

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        B, T, V = logits.shape
        g = grad_out.reshape(B * T).to(lse.dtype)
        flat_targets = targets.reshape(B * T)
        grad = torch.empty((B, T, V), dtype=logits.dtype, device=logits.device)
        grad_flat = grad.view(B * T, V)
        for rows, block in _row_chunks(logits, ctx.chunk_size):
            probs = torch.exp(block.to(lse.dtype) / ctx.temperature - lse[rows, None])
            block_grad = probs.mul_(-g[rows, None])
            block_grad.scatter_add_(-1, flat_targets[rows, None], g[rows, None])
            grad_flat[rows] = (block_grad / ctx.temperature).to(logits.dtype)
        return grad, None, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
                   temperature: float = 1.0) -> torch.Tensor:
    """log p(targets[b, t] | logits[b, t]) for every position: [B, T, V] x [B, T] -> [B, T] (fp32, or fp64 input).

        logp = z_target / tau - logsumexp(z / tau)

    equal to log_softmax(logits / tau).gather(targets) but computed `chunk_size` positions at a time in fp32, so
    memory stays O(chunk_size * V) instead of O(B * T * V) (see _TokenLogprobs). Differentiable w.r.t. logits.
    `temperature` tau is the sampling temperature: GRPO's importance ratios must use the same distribution the
    completions were sampled from (TRL divides logits by the generation temperature).

    Targets < 0 (e.g. ignore_index -100) give 0 and receive no gradient; callers mask them anyway.
    Positions are aligned: targets[:, t] is scored by logits[:, t] (shift before calling, or use
    sequence_logprobs which shifts for you).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"token_logprobs expects logits [B, T, V] and targets [B, T], got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    ignored = targets < 0
    safe_targets = targets.masked_fill(ignored, 0).long()
    out = _TokenLogprobs.apply(logits, safe_targets, int(chunk_size), float(temperature))
    # where (not multiply) so an ignored position cannot leak NaN/inf and its gradient is exactly zero
    return torch.where(ignored, torch.zeros_like(out), out)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                      chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion-token log-probs per sequence, and the number of those tokens.

        log pi(y | x) = sum_{t : labels[t] != ignore_index} log p(labels[t] | tokens < t)

    The shift happens here: logits[:, :-1] predicts labels[:, 1:], so pass the model's logits and labels with the
    same layout as input_ids (prompt and padding set to ignore_index). Returns (logps [B] fp32, n_tokens [B] long).
    """
    shift_labels = labels[:, 1:]
    mask = shift_labels != ignore_index
    per_token = token_logprobs(logits[:, :-1], shift_labels.masked_fill(~mask, -1), chunk_size)
    return per_token.sum(-1), mask.sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# Next-token cross-entropy: pretraining, SFT, LoRA, reasoning SFT and distillation's hard-label term
# ----------------------------------------------------------------------------------------------------------------

def next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy [B, T-1] where position t predicts token t+1 (0 where the label is -100, i.e.
    prompt or padding), and the mask of the positions trained on. Computed in fp32 whatever the autocast dtype."""
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                             reduction="none").view_as(targets)
    return losses, targets != -100


def target_positions(logits: torch.Tensor, labels: torch.Tensor):
    """Shift (position t predicts token t+1), then keep only the positions that are trained on: [N, V] logits and
    [N] labels, plus the [B, T-1] mask that selected them. [N, V] is several times smaller than [B, T, V], which
    matters for the fp32 copies the distillation losses make."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != -100
    return logits[valid], labels[valid], valid


def weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t w_t * CE_t / sum_t w_t over [N, V] logits and [N] labels. weights None: the plain mean."""
    return weighted_mean(F.cross_entropy(logits.float(), labels, reduction="none"), weights)


def weighted_mean(per_token: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t w_t * x_t / sum_t w_t (weights None: the plain mean), for several weightings of one per-token CE."""
    weights = torch.ones_like(per_token) if weights is None else weights.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1e-8)


def with_aux_loss(loss: torch.Tensor, aux_loss: torch.Tensor | None, metrics: dict) -> tuple[torch.Tensor, dict]:
    """(loss + the MoE balancing loss, metrics with both parts logged); unchanged for dense models."""
    if aux_loss is None:
        return loss, metrics
    metrics.update(lm_loss=loss.detach(), aux_loss=aux_loss.detach())
    return loss + aux_loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------------------

def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization losses (Rafailov et al. 2023, arXiv 2305.18290), per pair.

    Inputs are SUMMED completion log-probs [B] (sequence_logprobs). With the log-ratio margin
        Delta = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)]
    loss_type:
      "sigmoid": -log sigma(beta Delta). With label_smoothing eps > 0 this is conservative DPO (cDPO, Mitchell
                 2023): -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta) (TRL 0.x "sigmoid"; TRL 1.x
                 dropped the eps term from "sigmoid", so eps = 0 reproduces TRL 1.x exactly).
      "robust":  [-(1 - eps) log sigma(beta Delta) + eps log sigma(-beta Delta)] / (1 - 2 eps)  (Chowdhury et al.
                 2024, arXiv 2403.00409; unbiased under label-flip rate eps in [0, 0.5)).
      "hinge":   relu(1 - beta Delta)  (SLiC, Zhao et al. 2023).
      "ipo":     (Delta_avg - 1 / (2 beta))^2 with per-token averaged log-ratios
                 Delta_avg = ratio_w / |y_w| - ratio_l / |y_l|  (Azar et al. 2023, arXiv 2310.12036; the length
                 normalisation is TRL's, confirmed with the IPO authors), so chosen/rejected_lengths are required.
    Returns (losses [B], chosen_rewards [B], rejected_rewards [B]); rewards are the implicit rewards
    beta (log pi - log pi_ref), detached, for logging. Take losses.mean() for the batch loss (TRL does).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    elif loss_type == "robust":
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {eps}")
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("IPO averages log-ratios per token: pass chosen_lengths and rejected_lengths")
        avg_delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        losses = (avg_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected sigmoid, robust, hinge or ipo")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ----------------------------------------------------------------------------------------------------------------
# GRPO and variants
# ----------------------------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """Group-relative advantages (GRPO, DeepSeekMath arXiv 2402.03300 section 4.1.2), one per completion.

    rewards [N] holds N / G groups of G = num_generations completions of the same prompt, group-contiguous
    (prompt 0's G samples first). A_i = r_i - mean(group of i), then divided by (std + 1e-4) where std is
      "group": the group's unbiased (Bessel) std (TRL default), "batch": the std of all N rewards (more robust
      when groups are small), "none": no division (Dr. GRPO, arXiv 2503.20783, which argues std scaling biases
      towards too-easy/too-hard questions).
    A group whose rewards are all equal carries no learning signal; its advantages are set to exactly 0 (a
    floating-point mean of equal numbers can differ from them in the last bit, which the 1e-4 would amplify).
    """
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be [N] with N divisible by num_generations={num_generations}, "
                         f"got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, num_generations)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(grouped[:, :1])
        advantages = advantages / (std + 1e-4)
    elif scale_rewards == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros_like(rewards[0])
        advantages = advantages / (std + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return advantages.masked_fill(all_equal, 0.0).view(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate k3 (Schulman 2020, "Approximating KL divergence"):
        D = exp(ref - logp) - (ref - logp) - 1  >= 0  (since e^x >= 1 + x), unbiased for samples from pi."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = x.expand_as(mask) if x.shape != mask.shape else x
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, completion_mask: torch.Tensor, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "dapo", max_completion_length: int | None = None,
              num_items_in_batch: float | torch.Tensor | None = None,
              delta: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss of GRPO and its variants, as TRL's GRPOTrainer._compute_loss defines them.

    Inputs, all [B, T] over completion tokens (B completions, not prompts): logps = log pi_theta (with grad, from
    logits / sampling temperature), old_logps = log pi_old at sampling time (None -> logps.detach(), i.e. one
    update per generation, ratio 1), ref_logps = log pi_ref (needed when beta != 0; used for the "kl" metric
    whenever given), completion_mask (1 up to and including the first EOS). advantages: [B] or [B, T].

    Per token, with rho = exp(logps - old_logps):
      grpo/bnpo/dr_grpo/dapo (PPO clip, DeepSeekMath eq. 3):
          l = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)      eps_high None -> eps_low
          delta (INTELLECT-2 two-sided clipping, arXiv 2505.07291): rho is also capped at delta in the first term.
      cispo (MiniMax-M1, arXiv 2506.13585; TRL's definition):
          l = -sg(min(rho, eps_max)) A logps      sg = stop-gradient; eps_max = epsilon_high
          The importance weight is clipped and detached instead of the update, so every token keeps a gradient
          (REINFORCE-style grad A * grad logps weighted by the clipped ratio). eps_max is an ABSOLUTE cap on rho
          (ScaleRL, arXiv 2510.13786, recommends 5.0); if epsilon_high is None we use 5.0 rather than TRL's
          fallback to epsilon (0.2), which would shrink every weight to <= 0.2.
      plus beta * k3 KL to pi_ref when beta != 0.
    Aggregation (loss_type), m = completion_mask:
      grpo:    mean_i( sum_t m l / |o_i| )           (per-sequence mean; length-biased, see Dr. GRPO)
      bnpo:    sum m l / sum m                        (local token mean)
      dr_grpo: sum m l / (B * max_completion_length)  (constant normaliser)
      dapo, cispo: sum m l / num_items_in_batch       (token mean over the whole optimizer step)
    num_items_in_batch (dapo/cispo): active tokens in ALL micro-batches of this optimizer step on ALL ranks,
    divided by the number of ranks (DDP averages gradients across ranks; gradient accumulation sums micro-batch
    losses), which gives sum over every token / total tokens. None -> this call's sum m (single micro-batch).
    grpo/bnpo/dr_grpo are per-micro-batch means: divide by the accumulation steps yourself, as TRL does.

    Returns (loss, metrics); metrics are detached local masked means: "kl" (if ref_logps given), "ratio_mean",
    "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean" (clip losses) or "cispo_clip_ratio",
    and "num_tokens" (sum m) so callers can reduce them across ranks as weighted means.
    """
    mask = completion_mask.to(logps.dtype)
    if old_logps is None:
        old_logps = logps.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    metrics: dict[str, torch.Tensor] = {}

    if loss_type == "cispo":
        eps_max = 5.0 if epsilon_high is None else epsilon_high
        per_token_loss = -torch.clamp(ratio, max=eps_max).detach() * advantages * logps
        metrics["cispo_clip_ratio"] = _masked_mean(((ratio > eps_max) & (advantages > 0)).float(), mask).detach()
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        eps_high = epsilon_low if epsilon_high is None else epsilon_high
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + eps_high)
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token_loss = -torch.min(unclipped * advantages, clipped * advantages)
        # A token is "clipped" when the clip branch is active and its gradient is therefore zero.
        low = ((ratio < 1 - epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + eps_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"] = _masked_mean(low, mask).detach()
        metrics["clip_ratio/high_mean"] = _masked_mean(high, mask).detach()
        metrics["clip_ratio/region_mean"] = _masked_mean(torch.maximum(low, high), mask).detach()
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected grpo, bnpo, dr_grpo, dapo or cispo")

    if ref_logps is not None:
        per_token_kl = k3_kl(logps, ref_logps)
        metrics["kl"] = _masked_mean(per_token_kl, mask).detach()
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * per_token_kl
    elif beta != 0.0:
        raise ValueError("grpo_loss: beta != 0 needs ref_logps")

    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("dr_grpo normalises by B * max_completion_length: pass max_completion_length")
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    else:  # dapo, cispo
        normaliser = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss = (per_token_loss * mask).sum() / normaliser.to(per_token_loss).clamp(min=1.0)
    metrics["ratio_mean"] = _masked_mean(ratio, mask).detach()
    metrics["num_tokens"] = mask.sum().detach()
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------------
# Distillation
# ----------------------------------------------------------------------------------------------------------------

def _check_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"distillation needs the same vocabulary: student has {student_logits.shape[-1]} logits, "
                         f"teacher {teacher_logits.shape[-1]} (use the same tokenizer, or slice padded vocab rows)")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")


def _valid_mask(logits: torch.Tensor, labels: torch.Tensor | None, mask: torch.Tensor | None,
                ignore_index: int) -> torch.Tensor:
    if mask is not None:
        return mask.bool()
    if labels is not None:
        return labels != ignore_index
    return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)


def _reduce_tokens(per_token: torch.Tensor, valid: torch.Tensor, reduction: str,
                   num_items_in_batch: float | torch.Tensor | None) -> torch.Tensor:
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if reduction != "batchmean":
        raise ValueError(f"reduction must be 'batchmean', 'sum' or 'none', got {reduction!r}")
    if num_items_in_batch is None:
        return total / valid.sum().to(total).clamp(min=1.0)
    # a step's token count divided by ranks x accumulation may be below 1; it is never 0
    return total / torch.as_tensor(num_items_in_batch).to(total)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
            mask: torch.Tensor | None = None, temperature: float = 1.0, direction: str = "forward",
            ignore_index: int = -100, num_items_in_batch: float | torch.Tensor | None = None) -> torch.Tensor:
    """Hinton et al. 2015 (arXiv 1503.02531) soft-target loss, averaged over valid TOKENS:

        T^2 * mean_{valid t} KL(p_t || q_t)    with p = softmax(teacher / T), q = softmax(student / T)

    direction "forward" = KL(teacher || student) (mass-covering, the classic KD), "reverse" = KL(student || teacher)
    (mode-seeking, MiniLLM arXiv 2306.08543). The T^2 keeps gradient magnitudes comparable across temperatures
    (the soft-target gradients scale as 1/T^2). Valid tokens: `mask` (True = keep) if given, else
    labels != ignore_index, else all. Positions are aligned (labels[t] belongs to logits[t]); pass logits[:, :-1] and
    labels[:, 1:] for next-token models. Teacher logits should come from torch.no_grad(). Works on [..., V].
    num_items_in_batch overrides the token count (for gradient accumulation, as in grpo_loss).
    """
    _check_vocab(student_logits, teacher_logits)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if direction == "forward":
        per_token = (t.exp() * (t - s)).sum(-1)
    elif direction == "reverse":
        per_token = (s.exp() * (s - t)).sum(-1)
    else:
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    valid = _valid_mask(student_logits, labels, mask, ignore_index)
    return temperature ** 2 * _reduce_tokens(per_token, valid, "batchmean", num_items_in_batch)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                    beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                    ignore_index: int = -100, num_items_in_batch: float | torch.Tensor | None = None) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, arXiv 2306.13649, eq. 1), with TRL's
    `GKDTrainer.generalized_jsd_loss` semantics. With p_s = softmax(student / T), p_t = softmax(teacher / T):

        beta = 0: KL(p_t || p_s)            (forward KL)
        beta = 1: KL(p_s || p_t)            (reverse KL)
        else:     M = (1 - beta) p_s + beta p_t,   JSD = beta KL(p_t || M) + (1 - beta) KL(p_s || M)

    (the endpoints are special-cased: the mixture formula itself tends to 0, not to a KL, as beta -> 0 or 1).
    Unlike kd_loss there is NO T^2 factor: TRL's function only divides the logits by T (and GKDTrainer calls it
    with the default T = 1). Reduction over tokens with labels != ignore_index: "batchmean" = sum / #valid tokens,
    "sum", or "none" (per-token divergence, 0 at masked positions). With labels None every position is valid and
    batchmean divides by the number of positions (TRL would divide by the batch size there). Aligned positions,
    as in kd_loss.
    """
    _check_vocab(student_logits, teacher_logits)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        per_token = (t.exp() * (t - s)).sum(-1)
    elif beta == 1:
        per_token = (s.exp() * (s - t)).sum(-1)
    else:
        # log M via logsumexp of the two weighted log-probs: stable even where one probability underflows.
        beta_t = torch.tensor(beta, dtype=s.dtype, device=s.device)
        log_m = torch.logsumexp(torch.stack([s + torch.log1p(-beta_t), t + torch.log(beta_t)]), dim=0)
        kl_teacher = (t.exp() * (t - log_m)).sum(-1)
        kl_student = (s.exp() * (s - log_m)).sum(-1)
        per_token = beta * kl_teacher + (1 - beta) * kl_student
    valid = _valid_mask(student_logits, labels, None, ignore_index)
    return _reduce_tokens(per_token, valid, reduction, num_items_in_batch)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float = 0.5, temperature: float = 1.0, direction: str = "forward",
                      ignore_index: int = -100, return_parts: bool = False,
                      num_items_in_batch: float | torch.Tensor | None = None):
    """Hinton KD objective: alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(teacher || student at T).

    CE is the ordinary next-token cross-entropy at temperature 1 against the hard labels; both terms are means over
    the same valid tokens (labels != ignore_index). Aligned positions, as in kd_loss (shift before calling).
    return_parts=True returns (loss, ce, kd) for logging. num_items_in_batch: divide both sums by this instead of
    this batch's valid-token count (the token count of a whole optimizer step, as in kd_loss).
    """
    _check_vocab(student_logits, teacher_logits)
    V = student_logits.shape[-1]
    # sum / count rather than reduction="mean", so a batch with no valid token gives 0 instead of NaN
    ce_sum = F.cross_entropy(student_logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=ignore_index,
                             reduction="sum")
    count = (labels != ignore_index).sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    ce = ce_sum / count
    kd = kd_loss(student_logits, teacher_logits, labels=labels, temperature=temperature, direction=direction,
                 ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)
    loss = alpha * ce + (1 - alpha) * kd
    return (loss, ce, kd) if return_parts else loss
