"""model/training/losses.py against TRL (the reference) and against the invariants each loss must satisfy.

Where TRL's loss is a standalone function we call it (GKDTrainer.generalized_jsd_loss). DPO and GRPO losses live
inside trainer methods that need a model, an accelerator and a dataset, so their formulas are transcribed below
from the installed TRL 1.16 source, with file and line numbers, and `test_trl_source_still_has_transcribed_lines`
fails if an upgraded TRL no longer contains those lines. Everything runs on fixed fp32 tensors; we compare the loss
AND the gradients (fp32, 1e-6).
"""
import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F

from model.training.losses import (distillation_loss, dpo_loss, generalized_jsd, group_advantages, grpo_loss, k3_kl,
                                   kd_loss, sequence_logprobs, token_logprobs)

ATOL = 1e-6


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------
# TRL formulas, transcribed (trl 1.16.0)
# ---------------------------------------------------------------------------------------------------------------
TRL_LINES = {
    # trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss
    "trainer/dpo_trainer.py": [
        "per_sequence_loss = -F.logsigmoid(self.beta * delta_score)",  # L1388 sigmoid
        "per_sequence_loss = torch.relu(1 - self.beta * delta_score)",  # L1391 hinge
        "chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)",  # L1400 ipo
        "per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2",  # L1404 ipo
        "per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * self.label_smoothing)",  # L1431
        "chosen_rewards = self.beta * chosen_logratios.detach()",  # L1582
    ],
    # trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions and _compute_loss
    "trainer/grpo_trainer.py": [
        "advantages = advantages / (std_rewards + 1e-4)",  # L2787
        "torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1",  # L3101
        "clamped_ratios = torch.clamp(coef_1, max=self.epsilon_high).detach()",  # L3110 cispo
        "per_token_loss = -clamped_ratios * advantages * per_token_logps",  # L3111 cispo
        "coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)",  # L3113
        "coef_1 = torch.clamp(coef_1, max=self.args.delta)",  # L3116
        "per_token_loss = -torch.min(per_token_loss1, per_token_loss2)",  # L3120
        "loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()",  # L3154 grpo
        "loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)",  # L3159 bnpo
        "loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * self.max_completion_length)",  # L3164
        "loss = (per_token_loss * mask).sum() / normalizer",  # L3173 dapo/cispo
    ],
}


def test_trl_source_still_has_transcribed_lines():
    spec = importlib.util.find_spec("trl")  # locates the package without importing it
    if spec is None:
        pytest.skip("trl not installed")
    root = os.path.dirname(spec.origin)
    for rel, lines in TRL_LINES.items():
        source = open(os.path.join(root, rel)).read()
        for line in lines:
            assert line in source, f"TRL changed: {line!r} not found in trl/{rel}; re-check the transcription"


def trl_dpo(pc, pr, rc, rr, beta, loss_type, label_smoothing=0.0, chosen_len=None, rejected_len=None):
    """DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py L1350-1431, f_divergence_type='reverse_kl')."""
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    delta_score = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * delta_score)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * delta_score)
    elif loss_type == "ipo":
        ipo_delta = chosen_logratios / chosen_len.clamp(min=1.0) - rejected_logratios / rejected_len.clamp(min=1.0)
        loss = (ipo_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta_score)
        loss = (clean - flipped) / (1 - 2 * label_smoothing)
    elif loss_type == "cdpo":
        # TRL 0.x DPOTrainer.dpo_loss "sigmoid" branch with label_smoothing (Mitchell's cDPO note, eq. 3); TRL 1.x
        # removed the smoothing term from "sigmoid". Same expression in OpenRLHF openrlhf/models/loss.py DPOLoss.
        loss = (-F.logsigmoid(beta * delta_score) * (1 - label_smoothing)
                - F.logsigmoid(-beta * delta_score) * label_smoothing)
    return loss, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def trl_advantages(rewards, G, scale_rewards):
    """GRPOTrainer reward normalisation (trl/trainer/grpo_trainer.py L2763-2787) with trl.trainer.utils.nanstd
    (L1021-1046: Bessel-corrected) written out for NaN-free rewards."""
    grouped = rewards.view(-1, G)
    mean = grouped.mean(dim=1).repeat_interleave(G)

    def nanstd(x, dim=None):
        m = x.mean(dim=dim, keepdim=True)
        n = x.numel() if dim is None else x.shape[dim]
        var = ((x - m) ** 2).mean(dim=dim) * n / (n - 1)
        return var.sqrt()

    std = nanstd(grouped, dim=1).repeat_interleave(G) if scale_rewards != "batch" else nanstd(rewards)
    adv = rewards - mean
    return adv / (std + 1e-4) if scale_rewards != "none" else adv


def trl_grpo(per_token_logps, old, ref, advantages, mask, beta, eps_low, eps_high, loss_type, max_len=None,
             num_items=None, delta=None):
    """GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py L3079-3173), token-level importance sampling, one
    process, no gradient accumulation (so TRL's normaliser for dapo/cispo is num_items_in_batch)."""
    advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - old)
    if beta != 0.0:
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=eps_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    else:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_len)
    return (per_token_loss * mask).sum() / torch.as_tensor(float(num_items)).clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------------------
# token / sequence log-probs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equals_log_softmax_gather(chunk_size, temperature):
    logits = torch.randn(3, 9, 50, generator=gen(0), requires_grad=True)
    targets = torch.randint(0, 50, (3, 9), generator=gen(1))
    weights = torch.rand(3, 8, generator=gen(2))  # a generic upstream gradient
    # the shifted slice is not viewable as [B*T, V]: exercises the per-row path
    ours = token_logprobs(logits[:, :-1], targets[:, 1:], chunk_size=chunk_size, temperature=temperature)
    ref = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(-1, targets[:, 1:, None]).squeeze(-1)
    close(ours, ref)
    g_ours, = torch.autograd.grad((ours * weights).sum(), logits)
    g_ref, = torch.autograd.grad((ref * weights).sum(), logits)
    close(g_ours, g_ref)


def test_token_logprobs_gradcheck_bf16_and_ignored_targets():
    logits = torch.randn(2, 5, 11, dtype=torch.float64, generator=gen(3), requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=gen(4))
    targets[0, 1] = -100
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, targets, chunk_size=3, temperature=0.9), (logits,))
    out = token_logprobs(logits, targets)
    assert out[0, 1] == 0
    grad, = torch.autograd.grad(out.sum(), logits)
    assert torch.all(grad[0, 1] == 0)  # an ignored position receives exactly no gradient
    # bf16 logits are upcast: the result is the fp32 log-prob of the bf16 values
    bf16 = torch.randn(2, 6, 40, generator=gen(5)).bfloat16()
    t = torch.randint(0, 40, (2, 6), generator=gen(6))
    out = token_logprobs(bf16, t)
    assert out.dtype == torch.float32
    close(out, torch.log_softmax(bf16.float(), -1).gather(-1, t[..., None]).squeeze(-1))


def test_sequence_logprobs_sums_completion_tokens():
    logits = torch.randn(2, 7, 20, generator=gen(7))
    labels = torch.randint(0, 20, (2, 7), generator=gen(8))
    labels[0, :3] = -100  # prompt
    labels[1, :2] = -100
    labels[1, 6] = -100  # padding
    logps, n = sequence_logprobs(logits, labels)
    lp = torch.log_softmax(logits[:, :-1], -1)
    expected = [sum(lp[b, t - 1, labels[b, t]] for t in range(1, 7) if labels[b, t] != -100) for b in range(2)]
    close(logps, torch.stack(expected))
    assert n.tolist() == [4, 4]


def test_duplicating_a_completion_doubles_its_logprob():
    """log pi(y|x) is a SUM over tokens: an implementation that averages (MiniMind-style) keeps it unchanged."""
    unigram = torch.randn(30, generator=gen(9))  # position-independent model: every token scored by the same row
    prompt, completion = [3, 4], [7, 1, 9, 2]

    def logp(tokens):
        ids = torch.tensor([prompt + tokens])
        labels = ids.clone()
        labels[:, :len(prompt)] = -100
        return sequence_logprobs(unigram.expand(1, ids.shape[1], 30), labels)

    single, n1 = logp(completion)
    double, n2 = logp(completion + completion)
    close(double, 2 * single)
    assert n2.item() == 2 * n1.item()


# ---------------------------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------------------------

def dpo_inputs():
    pc, pr = (torch.randn(6, generator=gen(s)) * 5 - 30 for s in (10, 11))
    rc, rr = (torch.randn(6, generator=gen(s)) * 5 - 30 for s in (12, 13))
    lengths = torch.tensor([1.0, 4, 9, 17, 3, 25]), torch.tensor([2.0, 4, 1, 30, 8, 6])
    return pc, pr, rc, rr, lengths


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.0),
                                           ("robust", 0.1), ("sigmoid", 0.1)])
def test_dpo_matches_trl(loss_type, eps):
    pc, pr, rc, rr, (lc, lr) = dpo_inputs()
    beta = 0.1 if loss_type != "ipo" else 0.5
    pc1, pr1 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    pc2, pr2 = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    ours = dpo_loss(pc1, pr1, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps, chosen_lengths=lc,
                    rejected_lengths=lr)
    trl_type = "cdpo" if (loss_type == "sigmoid" and eps > 0) else loss_type
    ref = trl_dpo(pc2, pr2, rc, rr, beta, trl_type, eps, lc, lr)
    for a, b in zip(ours, ref):
        close(a, b)
    ours[0].mean().backward()
    ref[0].mean().backward()
    close(pc1.grad, pc2.grad)
    close(pr1.grad, pr2.grad)
    assert pc1.grad.abs().sum() > 0


def test_dpo_is_ln2_with_zero_rewards_when_policy_equals_reference():
    pc, pr, _, _, _ = dpo_inputs()
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, pc.clone(), pr.clone())
    assert torch.all(losses == torch.tensor(math.log(2)))
    assert torch.all(chosen_rewards == 0) and torch.all(rejected_rewards == 0)


def test_dpo_end_to_end_from_logits_matches_trl_pipeline():
    """Logits -> our chunked sequence log-probs -> dpo_loss, against TRL's path (log-softmax, gather, masked sum
    over the shifted completion mask, dpo_trainer.py L1297-1316), including the gradient w.r.t. the logits."""
    B, T, V = 4, 8, 30  # rows 0-1 chosen, 2-3 rejected (TRL's [chosen; rejected] layout)
    ids = torch.randint(0, V, (B, T), generator=gen(14))
    completion_mask = torch.zeros(B, T, dtype=torch.long)
    for b, (start, end) in enumerate([(3, 8), (2, 6), (4, 8), (3, 5)]):
        completion_mask[b, start:end] = 1
    logits = torch.randn(B, T, V, generator=gen(15), requires_grad=True)
    ref_logits = torch.randn(B, T, V, generator=gen(16))

    labels = ids.masked_fill(completion_mask == 0, -100)
    logps, n = sequence_logprobs(logits, labels)
    ref_logps, _ = sequence_logprobs(ref_logits, labels)
    ours, _, _ = dpo_loss(logps[:2], logps[2:], ref_logps[:2], ref_logps[2:])
    g_ours, = torch.autograd.grad(ours.mean(), logits)

    def trl_logps(lg):
        per_token = torch.log_softmax(lg[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (per_token * completion_mask[:, 1:]).sum(1)

    lp, rlp = trl_logps(logits), trl_logps(ref_logits)
    ref_loss, _, _ = trl_dpo(lp[:2], lp[2:], rlp[:2], rlp[2:], 0.1, "sigmoid")
    g_ref, = torch.autograd.grad(ref_loss.mean(), logits)
    close(ours, ref_loss)
    close(g_ours, g_ref)
    assert n.tolist() == completion_mask.sum(1).tolist()


# ---------------------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale_rewards):
    rewards = torch.rand(12, generator=gen(20)) * 3
    close(group_advantages(rewards, 4, scale_rewards), trl_advantages(rewards, 4, scale_rewards))


def test_equal_rewards_give_exactly_zero_advantage():
    # In fp32 the mean of eight 0.1s is not exactly 0.1: a plain r - mean leaves ~7e-9, which the division by
    # (std + 1e-4) would blow up to ~7e-5 of spurious "signal".
    same = torch.full((8,), 0.1)
    assert torch.any(same - same.mean() != 0)  # the naive formula really fails on this input
    rewards = torch.cat([same, torch.rand(8, generator=gen(27)), torch.full((8,), 0.7)])
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, 8, scale)
        assert torch.all(adv[:8] == 0) and torch.all(adv[16:] == 0), scale
        assert torch.all(adv[8:16] != 0)


def test_k3_is_nonnegative_and_zero_at_reference():
    logps = torch.randn(4, 50, generator=gen(21)) * 3
    ref = torch.randn(4, 50, generator=gen(22)) * 3
    assert torch.all(k3_kl(logps, ref) >= 0)
    assert torch.all(k3_kl(logps, logps.clone()) == 0)


def grpo_inputs():
    B, T = 6, 7
    logps = -torch.rand(B, T, generator=gen(23)) * 4
    old = logps + torch.randn(B, T, generator=gen(24)) * 0.3  # ratios spread on both sides of the clip range
    ref = logps + torch.randn(B, T, generator=gen(25)) * 0.5
    adv = group_advantages(torch.rand(B, generator=gen(26)), 3)
    mask = torch.ones(B, T)
    for b, length in enumerate([7, 3, 5, 1, 6, 4]):
        mask[b, length:] = 0
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("loss_type,beta,eps_high,delta", [
    ("grpo", 0.04, None, None), ("bnpo", 0.0, 0.28, None), ("dr_grpo", 0.0, None, None),
    ("dapo", 0.001, 0.28, None), ("dapo", 0.0, None, 1.2), ("cispo", 0.0, 1.1, None), ("cispo", 0.04, 5.0, None)])
def test_grpo_matches_trl(loss_type, beta, eps_high, delta):
    logps, old, ref, adv, mask = grpo_inputs()
    num_items = 40  # e.g. tokens of the whole accumulated batch: deliberately not this micro-batch's 26
    lp1, lp2 = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    ours, metrics = grpo_loss(lp1, old, ref, adv, mask, beta=beta, epsilon_low=0.2, epsilon_high=eps_high,
                              loss_type=loss_type, max_completion_length=10, num_items_in_batch=num_items,
                              delta=delta)
    ref_loss = trl_grpo(lp2, old, ref, adv, mask, beta, 0.2, 0.2 if eps_high is None else eps_high, loss_type,
                        max_len=10, num_items=num_items, delta=delta)
    close(ours, ref_loss)
    ours.backward()
    ref_loss.backward()
    close(lp1.grad, lp2.grad)
    assert lp1.grad.abs().sum() > 0
    assert torch.all(lp1.grad[mask == 0] == 0)  # padding never receives gradient
    close(metrics["kl"], (k3_kl(logps, ref) * mask).sum() / mask.sum())


def test_grpo_on_policy_loss_is_minus_mean_advantage_yet_gradient_is_not_zero():
    logps, _, _, _, mask = grpo_inputs()
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.3, 0.9, 0.2]), 3)
    logps.requires_grad_()
    loss, metrics = grpo_loss(logps, None, None, adv, mask, loss_type="grpo")  # old = logps.detach(): ratio 1
    close(loss, -adv.mean())
    assert abs(loss.item()) < 1e-6  # group-centred advantages average to 0
    loss.backward()
    assert logps.grad.abs().sum() > 1e-3  # ...but the policy gradient A * grad(log pi) does not vanish
    assert metrics["clip_ratio/region_mean"] == 0 and metrics["ratio_mean"] == 1


def test_grpo_clipped_tokens_get_no_gradient():
    logps, _, _, _, mask = grpo_inputs()
    mask = torch.ones_like(mask)
    old = logps.clone()
    old[:, :3] = logps[:, :3] - math.log(1.5)  # ratio 1.5 > 1 + 0.2 on the first three tokens
    adv = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 0.1])  # all positive: the upper clip is active there
    logps.requires_grad_()
    loss, metrics = grpo_loss(logps, old, None, adv, mask, epsilon_low=0.2, loss_type="dapo")
    loss.backward()
    assert torch.all(logps.grad[:, :3] == 0)
    assert torch.all(logps.grad[:, 3:] != 0)
    close(metrics["clip_ratio/high_mean"], torch.tensor(3 / 7))
    assert metrics["clip_ratio/low_mean"] == 0
    # CISPO clips the weight, not the update: the same tokens keep a gradient (weight min(1.5, cap))
    logps.grad = None
    loss, metrics = grpo_loss(logps, old, None, adv, mask, epsilon_high=1.2, loss_type="cispo")
    loss.backward()
    assert torch.all(logps.grad != 0)
    close(logps.grad[:, 0], -1.2 * adv / mask.sum())
    close(metrics["cispo_clip_ratio"], torch.tensor(3 / 7))


def test_grpo_argument_errors():
    logps, old, ref, adv, mask = grpo_inputs()
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, old, ref, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, None, adv, mask, beta=0.1)


# ---------------------------------------------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------------------------------------------

def kd_inputs(B=3, T=6, V=25):
    student = torch.randn(B, T, V, generator=gen(30)) * 2
    teacher = torch.randn(B, T, V, generator=gen(31)) * 2
    labels = torch.randint(0, V, (B, T), generator=gen(32))
    labels[0, :2] = -100
    labels[2, 4:] = -100
    return student, teacher, labels


def test_kd_is_zero_when_student_equals_teacher():
    student, _, labels = kd_inputs()
    for direction in ("forward", "reverse"):
        assert kd_loss(student, student.clone(), labels, temperature=2.0, direction=direction).abs() < 1e-6
    for beta in (0.0, 0.5, 1.0):
        assert generalized_jsd(student, student.clone(), labels, beta=beta).abs() < 1e-6


def test_kd_matches_definition_and_reduces_per_token():
    student, teacher, labels = kd_inputs()
    T = 2.0
    valid = labels != -100
    p_t = F.softmax(teacher / T, -1)
    forward = (p_t * (F.log_softmax(teacher / T, -1) - F.log_softmax(student / T, -1))).sum(-1)
    close(kd_loss(student, teacher, labels, temperature=T), T ** 2 * forward[valid].mean())
    close(kd_loss(student, teacher, mask=valid, temperature=T), T ** 2 * forward[valid].mean())
    # reverse KL is KL(student || teacher): swap the roles
    close(kd_loss(student, teacher, labels, temperature=T, direction="reverse"),
          T ** 2 * generalized_jsd(student, teacher, labels, beta=1.0, temperature=T))
    # per-token averaging: appending an all-padding row, or splitting the batch, leaves the token mean unchanged
    pad_s, pad_t = torch.randn(1, 6, 25, generator=gen(33)), torch.randn(1, 6, 25, generator=gen(34))
    padded = kd_loss(torch.cat([student, pad_s]), torch.cat([teacher, pad_t]),
                     torch.cat([labels, torch.full((1, 6), -100)]), temperature=T)
    close(padded, kd_loss(student, teacher, labels, temperature=T))
    parts = [kd_loss(student[i:i + 1], teacher[i:i + 1], labels[i:i + 1], temperature=T) for i in range(3)]
    counts = valid.sum(1).float()
    close(sum(p * c for p, c in zip(parts, counts)) / counts.sum(), kd_loss(student, teacher, labels, temperature=T))


def test_distillation_loss_is_alpha_ce_plus_kd():
    student, teacher, labels = kd_inputs()
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    loss, ce, kd = distillation_loss(s1, teacher, labels, alpha=0.3, temperature=2.0, return_parts=True)
    ref = 0.3 * F.cross_entropy(s2.reshape(-1, 25), labels.reshape(-1)) + 0.7 * kd_loss(s2, teacher, labels,
                                                                                        temperature=2.0)
    close(loss, ref)
    loss.backward()
    ref.backward()
    close(s1.grad, s2.grad)
    with pytest.raises(ValueError, match="same vocabulary"):
        kd_loss(student, teacher[..., :20], labels)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.9])
def test_generalized_jsd_matches_trl_gkd(beta):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd")
    student, teacher, labels = kd_inputs()
    temperature = 0.9  # GKDConfig's default; TRL divides logits by T and applies no T^2 factor
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    t1, t2 = teacher.clone().requires_grad_(), teacher.clone().requires_grad_()
    ours = generalized_jsd(s1, t1, labels, beta=beta, temperature=temperature)
    ref = gkd.GKDTrainer.generalized_jsd_loss(s2, t2, labels, beta=beta, temperature=temperature)
    close(ours, ref)
    ours.backward()
    ref.backward()
    close(s1.grad, s2.grad)
    close(t1.grad, t2.grad)
    if beta == 0.0:  # and our Hinton KD is the same forward KL, times T^2
        close(kd_loss(student, teacher, labels, temperature=temperature), temperature ** 2 * ref.detach())
