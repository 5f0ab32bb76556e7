"""DeepSeekMoE feed-forward layer: fine-grained routed experts + always-on shared experts, with auxiliary-loss-free
load balancing (DeepSeek-V3, arXiv 2412.19437 section 2.1.2; DeepSeekMoE arXiv 2401.06066; Loss-Free Balancing
arXiv 2408.15664).

For a token u (hidden d), N_r routed experts with centroids e_i, K_r of them active, gate bias b (a buffer):

    s_i   = softmax_i(u . e_i)  or  sigmoid(u . e_i)                  scores, in fp32
    TopK  = the K_r experts with the largest s_i + b_i               (b only picks; group-limited if n_group > 1)
    g_i   = s_i / sum_{j in TopK} s_j  (norm_topk_prob)  * routed_scaling_factor,   0 outside TopK
    h'    = sum_shared FFN_s(u) + sum_i g_i FFN_i(u)                  (the residual is added by the DecoderLayer)

Balancing (config.moe_balance):
  "aux_free"  after every optimizer step, from the expert loads c_i counted over the whole global batch:
                  b_i <- b_i + gamma * sign(mean_j c_j - c_i)          (`update_moe_biases`, gamma = bias_update_speed)
              so an overloaded expert becomes less attractive; the gradient never sees b. Optionally plus V3's
              complementary sequence-wise loss  seq_aux_alpha * sum_i f_i P_i  computed per sequence (eq. 17-20).
  "aux_loss"  classic Switch/GShard loss over the batch's tokens:  aux_loss_alpha * N_r * sum_i f_i P_i,
              f_i = fraction of the K_r * T routing slots that went to expert i, P_i = mean normalised score.
              Both losses equal alpha when the load is perfectly uniform.
  "none"      no balancing.
The loss (if any) is left in `module.aux_loss` during training; `collect_moe_aux_loss(model)` sums the layers.
Loads and losses count real tokens only: forward takes a token mask (the model derives it from the attention mask)
and padding positions, which all share one hidden state and would all pick the same experts, count nowhere, as in
transformers' Mixtral `load_balancing_loss_func`. A layer whose `bias_frozen` is True keeps its bias (LoRA sets it).

Dispatch: the N * K_r (token, expert) pairs are sorted by expert so each expert runs one matmul on a contiguous
slice; the only host sync is one `.tolist()` of the per-expert counts per layer (no boolean masks, no per-expert
nonzero). Expert weights are stacked 3D parameters in transformers' DeepseekV3 layout (gate_up_proj [E, 2I, d],
down_proj [E, d, I]), so a TinyMind MoE layer's state dict loads into HF `DeepseekV3MoE` unchanged.
"""
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .layers import FeedForward


class TopkRouter(nn.Module):
    """The gate: centroids `weight` [E, d] (a bias-free linear map) and the balancing bias `e_score_correction_bias`
    [E] (a persistent buffer: saved, never given to the optimizer). forward(x [N, d]) -> (scores, indices, weights),
    scores [N, E] fp32, indices/weights [N, K] with weights fp32 from the unbiased scores."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.use_bias = config.moe_balance == "aux_free"
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {self.scoring_func!r}")
        if self.num_experts % self.n_group or self.topk_group > self.n_group:
            raise ValueError("num_experts must be a multiple of n_group, and topk_group <= n_group")
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError("num_experts_per_tok exceeds the experts left by group-limited routing")
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        nn.init.normal_(self.weight, std=config.initializer_range)
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # fp32 even under bf16 autocast: near-ties between experts would otherwise flip on rounding noise.
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.scoring_func == "softmax" else logits.sigmoid()
        choice = scores.detach()
        if self.use_bias:
            choice = choice + self.e_score_correction_bias.float()
        if self.n_group > 1:
            choice = self._mask_groups(choice)
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(-1, indices)  # unbiased: b changes which experts, never how much each one counts
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return scores, indices, weights * self.routed_scaling_factor

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Group-limited routing (DeepSeek-V2/V3): keep the topk_group best of n_group expert groups, -inf the rest.
        A group's score is the sum of its top-2 (biased) scores when the bias is in use, else its max (official
        DeepSeek-V3 `Gate.forward`; HF DeepseekV3TopkRouter always uses top-2, and only runs with the bias)."""
        grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
        if self.use_bias and grouped.shape[-1] >= 2:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        return grouped.masked_fill(group_mask.unsqueeze(-1), float("-inf")).view_as(choice)

    def _apply(self, fn, recurse=True):
        # Keep the bias fp32 through model.to(bfloat16): gamma = 1e-3 steps would round away on a bf16 bias.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != bias.dtype:
            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device)
        return self


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights: expert e is  down_proj[e] @ (silu(g) * u),  [g; u] = gate_up_proj[e] @ x.
    forward(x [N, d], indices [N, K], weights [N, K]) -> sum_k weights[:, k] * FFN_{indices[:, k]}(x), [N, d]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, init_std: float = 0.02):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=init_std)
        nn.init.normal_(self.down_proj, std=init_std)
        # "loop": one matmul per expert on its slice; works on every device and dtype.
        # "grouped_mm": torch's grouped GEMM, no host sync at all. Within 10% of "loop" on CPU (fp32 and bf16);
        # on CUDA it needs a recent GPU and bf16 (not tested here). A capacity-padded bmm was slower than both.
        self.impl = "loop"

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = indices.shape
        flat = indices.flatten()
        order = flat.argsort(stable=True)  # routing slots grouped by expert id
        token = order // top_k  # the token each sorted slot belongs to
        counts = torch.bincount(flat, minlength=self.num_experts)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        # Cast once here rather than per expert slice inside autocast: fewer, larger copies.
        x_sorted = x.to(dtype).index_select(0, token)
        gate_up_proj, down_proj = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        if self.impl == "grouped_mm":
            offsets = counts.cumsum(0).to(torch.int32)
            gate, up = F.grouped_mm(x_sorted, gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
            y_sorted = F.grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offsets)
        else:
            y_sorted = self._loop(x_sorted, counts.tolist(), gate_up_proj, down_proj)  # the layer's one host sync
        # Weight each slot, then sum the K slots of every token; in fp32 (weights are fp32): no low-precision
        # accumulation buffer. index_add_ is a scatter-add whose backward is a cheap gather.
        y_sorted = y_sorted.float() * weights.flatten()[order].unsqueeze(-1)
        out = torch.zeros(num_tokens, x.shape[-1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, token, y_sorted).to(x.dtype)

    @staticmethod
    def _loop(x_sorted: torch.Tensor, counts: list[int], gate_up_proj, down_proj) -> torch.Tensor:
        outputs = []
        # unbind: one view per expert whose backward is a single stack, not E zero-filled [E, ...] gradients.
        for x_e, gate_up, down in zip(x_sorted.split(counts), gate_up_proj.unbind(0), down_proj.unbind(0)):
            if x_e.shape[0] == 0:
                continue
            gate, up = F.linear(x_e, gate_up).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, down))
        return torch.cat(outputs)


def balance_loss(probs: torch.Tensor, indices: torch.Tensor, num_experts: int,
                 real: torch.Tensor | None = None) -> torch.Tensor:
    """N_r * sum_i f_i P_i per sequence, averaged over the sequences (the leading dim). probs [S, T, E] normalised
    scores, indices [S, T, K], real [S, T] bool, True for real tokens (None: all are). Over the T_s real tokens of
    sequence s: f_i = share of their K * T_s slots routed to i (not differentiable), P_i = their mean probs[..., i].
    A sequence without real tokens is left out of the average."""
    seqs, tokens, top_k = indices.shape
    if real is None:
        real = torch.ones(seqs, tokens, dtype=torch.bool, device=probs.device)
    weight = real.to(probs.dtype)  # 1 real, 0 padding
    num_real = weight.sum(dim=1, keepdim=True)  # [S, 1]
    counts = torch.zeros(seqs, num_experts, device=probs.device).scatter_add_(
        1, indices.reshape(seqs, -1), weight.repeat_interleave(top_k, dim=1))  # slots are token-major: [t0k0, t0k1..]
    f = counts / (num_real * top_k).clamp(min=1)
    p = (probs * weight.unsqueeze(-1)).sum(dim=1) / num_real.clamp(min=1)
    per_sequence = num_experts * (f * p).sum(dim=-1)
    return per_sequence.sum() / (num_real > 0).sum().clamp(min=1)


class MoEFeedForward(nn.Module):
    """DeepSeekMoE layer. forward(x [B, T, d], token_mask [B, T] bool or None) -> [B, T, d] (the residual is added by
    the caller). token_mask marks the real tokens (None: every position is one); it changes no output, only what the
    balancing counts.

    Training-only side effects (never in eval/generate): `expert_load` (int64 [E], not saved) accumulates per-expert
    routing counts of real tokens until `update_moe_biases` consumes them, and `aux_loss` holds the scaled balancing
    loss of the last forward (None when there is none). Under activation checkpointing the recomputed forward counts
    again; doubling every count changes neither the sign rule nor the max/mean ratio.
    `bias_frozen` (default False): True makes `update_moe_biases` leave this layer's bias alone (set by apply_lora:
    a LoRA run trains the adapters only, and the adapter file does not hold the bias)."""

    def __init__(self, config):
        super().__init__()
        if config.moe_balance not in ("aux_free", "aux_loss", "none"):
            raise ValueError(f"moe_balance must be 'aux_free', 'aux_loss' or 'none', got {config.moe_balance!r}")
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.gate = TopkRouter(config)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                               config.initializer_range)
        self.shared_experts = None
        if config.n_shared_experts:
            shared_width = config.moe_intermediate_size * config.n_shared_experts
            self.shared_experts = FeedForward(config.hidden_size, shared_width)
        self.dropout = nn.Dropout(config.dropout)
        # Routing counts since the last bias update. A plain tensor, not a buffer: DDP re-broadcasts rank 0's buffers
        # before forwards, which would overwrite the other ranks' counts during gradient accumulation.
        self.expert_load = torch.zeros(config.num_experts, dtype=torch.long)
        self.aux_loss: torch.Tensor | None = None
        self.bias_frozen = False

    @property
    def e_score_correction_bias(self) -> torch.Tensor:
        return self.gate.e_score_correction_bias

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq_len, hidden = x.shape
        flat = x.reshape(-1, hidden)
        # Padding positions are routed and computed like the rest (their outputs are never used); skipping them
        # would cost a host sync to size the smaller batch. They are only left out of the counts below.
        scores, indices, weights = self.gate(flat)
        out = self.experts(flat, indices, weights).view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        self.aux_loss = None
        if self.training:
            with torch.no_grad():
                if token_mask is None:
                    counts = torch.bincount(indices.flatten(), minlength=self.num_experts)
                else:  # add 1 per routing slot of a real token, 0 for padding: no host sync, unlike indices[mask]
                    real_slots = token_mask.reshape(-1, 1).expand_as(indices).flatten().long()
                    counts = torch.zeros(self.num_experts, dtype=torch.long, device=indices.device)
                    counts.index_add_(0, indices.flatten(), real_slots)
                if self.expert_load.device != counts.device:  # not a buffer, so .to(device) does not move it
                    self.expert_load = self.expert_load.to(counts.device)
                self.expert_load += counts
            self.aux_loss = self._balance_loss(scores, indices, batch, seq_len, token_mask)
        return self.dropout(out)

    def _balance_loss(self, scores, indices, batch, seq_len, token_mask):
        cfg = self.config
        if cfg.moe_balance == "aux_loss" and cfg.aux_loss_alpha > 0:
            alpha, seqs = cfg.aux_loss_alpha, 1  # Switch/GShard: all tokens of the batch together
        elif cfg.moe_balance == "aux_free" and cfg.seq_aux_alpha > 0:
            alpha, seqs = cfg.seq_aux_alpha, batch  # DeepSeek-V3 complementary loss: per sequence, then averaged
        else:
            return None
        probs = scores / scores.sum(dim=-1, keepdim=True)  # sigmoid scores do not sum to 1 (V3 eq. 20)
        real = None if token_mask is None else token_mask.reshape(seqs, -1)
        return alpha * balance_loss(probs.view(seqs, -1, self.num_experts), indices.view(seqs, -1, self.top_k),
                                    self.num_experts, real)


# ---- training-loop helpers ---------------------------------------------------------------------------------------

def moe_layers(model: nn.Module) -> list[tuple[str, MoEFeedForward]]:
    """(label, layer) for every MoE layer; the label is the decoder layer index when the name has `layers.<i>`."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            match = re.search(r"layers\.(\d+)", name)
            found.append((match.group(1) if match else name or str(len(found)), module))
    return found


def _load_ratio(load: torch.Tensor) -> float:
    mean = load.float().mean()
    return (load.max() / mean).item() if mean > 0 else float("nan")


def balance_direction(loads: torch.Tensor) -> torch.Tensor:
    """sign(mean_j c_j - c_i) per layer row of loads [L, E]: +1 raises an underloaded expert's bias, -1 lowers an
    overloaded one (DeepSeek-V3 eq. 16 and the text below it)."""
    return torch.sign(loads.mean(dim=-1, keepdim=True) - loads)


@torch.no_grad()
def update_moe_biases(model: nn.Module, gamma: float | None = None) -> dict:
    """Call once per optimizer step, on every rank (it is a collective under torch.distributed).

    Sums each MoE layer's `expert_load` over ranks (one all-reduce for all layers), applies the loss-free balancing
    rule b_i += gamma * sign(mean_j c_j - c_i) to layers with moe_balance == "aux_free" whose bias is not frozen
    (`bias_frozen`, set by apply_lora; gamma defaults to config.bias_update_speed; sign(0) = 0 leaves a perfectly
    average expert alone), and resets the counters. Frozen layers' loads are still counted and reported.
    Identical global loads on every rank keep the biases identical without broadcasting them.
    Returns {"moe/max_mean_load": worst max/mean load ratio, "moe/layer<i>/max_mean_load": per layer}."""
    layers = moe_layers(model)
    if not layers:
        return {}
    device = layers[0][1].gate.weight.device  # NCCL needs the counts on the GPU even before the first forward
    loads = torch.stack([layer.expert_load.to(device) for _, layer in layers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads, op=dist.ReduceOp.SUM)
    loads = loads.double()
    directions = balance_direction(loads)
    ratios = (loads.amax(dim=1) / loads.mean(dim=1)).tolist()
    totals = loads.sum(dim=1).tolist()  # one host sync for all layers
    stats = {}
    for (label, layer), direction, ratio, total in zip(layers, directions, ratios, totals):
        layer.expert_load.zero_()
        if total == 0:  # no training forward since the last update
            continue
        stats[f"moe/layer{label}/max_mean_load"] = ratio
        if layer.config.moe_balance == "aux_free" and not layer.bias_frozen:
            step = layer.config.bias_update_speed if gamma is None else gamma
            bias = layer.gate.e_score_correction_bias
            bias.add_(step * direction.to(bias.dtype))
    if stats:
        stats["moe/max_mean_load"] = max(stats.values())
    return stats


@torch.no_grad()
def moe_load_stats(model: nn.Module) -> dict:
    """This rank's loads since the last update, for logging, without resetting: max/mean ratio per layer, the worst
    one, and the largest |bias|."""
    stats = {}
    for label, layer in moe_layers(model):
        if layer.expert_load.sum() > 0:
            stats[f"moe/layer{label}/max_mean_load"] = _load_ratio(layer.expert_load)
        stats[f"moe/layer{label}/bias_abs_max"] = layer.e_score_correction_bias.abs().max().item()
    ratios = [v for k, v in stats.items() if k.endswith("max_mean_load")]
    if ratios:
        stats["moe/max_mean_load"] = max(ratios)
    return stats


def collect_moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the MoE layers' balancing losses from the last forward (already scaled by alpha); None if none."""
    losses = [layer.aux_loss for _, layer in moe_layers(model) if layer.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def count_active_params(model: nn.Module) -> int:
    """Parameters used per token: total - sum over MoE layers of (num_experts - k) * params of one routed expert.
    (model.active_params_of counts them for a config.)"""
    total = sum(p.numel() for p in model.parameters())
    for _, layer in moe_layers(model):
        per_expert = (layer.experts.gate_up_proj.numel() + layer.experts.down_proj.numel()) // layer.num_experts
        total -= (layer.num_experts - layer.top_k) * per_expert
    return total
