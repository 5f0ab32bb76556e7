"""A Bradley-Terry reward model: our language model's trunk with a scalar head read at each sequence's last real
token, and the pairwise loss that trains it (what train_reward.py uses; GRPO's --reward_model reads the result).

    reward r(x, y) = w . h_last          h_last: the final hidden state (after the last RMSNorm) at the last real token
    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin) [+ c * (r_chosen + r_rejected)^2]

This is exactly what transformers' `*ForSequenceClassification` with num_labels=1 computes (a bias-free linear
`score` over the last non-padding position's hidden state) and what TRL's `RewardTrainer` minimises. The saved file is
a TinyMind checkpoint plus one tensor, "score.weight" [1, hidden], which `CheckpointRewardScorer` (rewards.py) reads.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model import TinyMindForCausalLM


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] position of each row's last real token: the rightmost 1 of the mask, so right and left padding both work
    (transformers takes the rightmost non-pad token the same way)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(dim=-1)


def score_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """[B] fp32 scores: `head` applied to the hidden state [B, T, H] at each row's last real token. In fp32 even
    under autocast: the loss only sees differences of rewards, which bf16 (3 significant digits) would round."""
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return F.linear(last.float(), head.weight.float(),
                        None if head.bias is None else head.bias.float()).squeeze(-1)


@dataclass
class RewardOutput:
    rewards: torch.Tensor  # [B] fp32, one score per sequence
    aux_loss: torch.Tensor | None = None  # MoE balancing loss (None for a dense model)


class RewardModel(nn.Module):
    """A TinyMindForCausalLM's trunk (`model`) plus `score`, nn.Linear(hidden, 1, bias=False).

    The language model's own modules are reused, not copied, so the state dict is the causal LM's keys plus
    "score.weight": the format CheckpointRewardScorer loads. The LM head stays (it is the embedding matrix when
    tied, and kept so the file is still a complete TinyMind checkpoint); an untied one is frozen, since the reward
    never uses it. No bias, as in transformers' *ForSequenceClassification: the pairwise loss sees only differences
    of rewards, so a bias would get no gradient from it.

    Head init: N(0, 1/sqrt(hidden + 1)), the reward head of OpenAI's lm-human-preferences (Ziegler et al. 2019),
    kept by TRL's value heads. RMSNorm makes h_last's coordinates O(1), so rewards start O(1) and differ between
    sequences: the held-out accuracy before training is that of a random linear probe (about 0.5), and the trunk
    gets a gradient from the first step. A zero head would start every pair tied (accuracy 0 under a strict >) and
    give the trunk no gradient until the head has moved."""

    def __init__(self, language_model: TinyMindForCausalLM, head_std: float | None = None):
        super().__init__()
        self.config = language_model.config
        self.model = language_model.model
        self.lm_head = language_model.lm_head
        if self.lm_head.weight is not self.model.embed_tokens.weight:
            self.lm_head.requires_grad_(False)
        hidden = self.config.hidden_size
        self.score = nn.Linear(hidden, 1, bias=False, device=self.lm_head.weight.device)
        nn.init.normal_(self.score.weight, std=1 / math.sqrt(hidden + 1) if head_std is None else head_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> RewardOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden, _ = self.model(input_ids, attention_mask=attention_mask)
        aux_loss = None
        if self.config.use_moe:
            from ..moe import collect_moe_aux_loss
            aux_loss = collect_moe_aux_loss(self)
        return RewardOutput(score_last_token(hidden, attention_mask, self.score), aux_loss)

    # What the Trainer reads of a model, as TinyMindForCausalLM has it.
    def num_params(self, active: bool = False) -> int:
        return TinyMindForCausalLM.num_params(self, active)

    def flops_per_token(self, seq_len: int) -> float:
        """The language model's count less its vocabulary projection (6 x vocab x hidden), which a reward model
        never computes (its own head, hidden x 1, is in num_params)."""
        cfg = self.config
        return TinyMindForCausalLM.flops_per_token(self, seq_len) - 6 * cfg.vocab_size * cfg.hidden_size


def pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(chosen rewards [B], rejected rewards [B], MoE aux loss) of a [chosen; rejected] batch (collate_pairs)."""
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    chosen, rejected = out.rewards.chunk(2)
    return chosen, rejected, out.aux_loss


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_coefficient: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley-Terry loss [B]; its mean is TRL RewardTrainer.compute_loss's loss:

        -log sigmoid(r_chosen - r_rejected - margin) + center_coefficient * (r_chosen + r_rejected)^2

    Bradley-Terry: P(chosen preferred) = sigmoid(r_c - r_r), and this is its negative log-likelihood. `margin` [B]
    (TRL's optional "margin" column, Touvron et al. 2023): the chosen answer must win by at least that much before
    the loss stops pushing. The centering term (Eisenstein et al. 2023, arXiv 2312.09244, Eq. 2; TRL's
    center_rewards_coefficient, recommended 0.01) pulls the mean reward to 0, which the loss alone leaves free.
    At r_c == r_r and no margin the loss is ln 2."""
    difference = chosen.float() - rejected.float()
    if margin is not None:
        difference = difference - margin.float()
    loss = -F.logsigmoid(difference)
    if center_coefficient:
        loss = loss + center_coefficient * (chosen.float() + rejected.float()) ** 2
    return loss
