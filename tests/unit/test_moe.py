"""DeepSeekMoE layer: router and layer against transformers' DeepseekV3 (sigmoid, bias, groups), the sorted dispatch
against a per-token loop, the loss-free bias rule (sign, size, convergence, eval, DDP) and the balancing losses."""
import copy
import socket
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from model import moe
from model.config import TinyMindConfig
from model.model import active_params_of
from model.moe import MoEFeedForward, collect_moe_aux_loss, count_active_params, moe_load_stats, update_moe_biases

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def moe_config(**overrides) -> TinyMindConfig:
    settings = dict(hidden_size=32, use_moe=True, num_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                    moe_intermediate_size=24, scoring_func="sigmoid", moe_balance="aux_free", seq_aux_alpha=0.0)
    settings.update(overrides)
    return TinyMindConfig(**settings)


def build(seed=0, bias_std=0.0, **overrides) -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = MoEFeedForward(moe_config(**overrides))
    with torch.no_grad():
        layer.gate.weight.normal_(0, 0.3)
        layer.e_score_correction_bias.normal_(0, bias_std)
    return layer


def hf_twin(layer: MoEFeedForward) -> DeepseekV3MoE:
    cfg = layer.config
    hf_config = DeepseekV3Config(hidden_size=cfg.hidden_size, n_routed_experts=cfg.num_experts,
                                 num_experts_per_tok=cfg.num_experts_per_tok, n_shared_experts=cfg.n_shared_experts,
                                 moe_intermediate_size=cfg.moe_intermediate_size, n_group=cfg.n_group,
                                 topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                                 routed_scaling_factor=cfg.routed_scaling_factor)
    hf_config._experts_implementation = "eager"
    ref = DeepseekV3MoE(hf_config).eval()
    ref.load_state_dict(layer.state_dict(), strict=True)  # same names and [E, 2I, d] / [E, d, I] layouts
    return ref


HF_CASES = [dict(), dict(n_group=4, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5),
            dict(num_experts=16, n_group=4, topk_group=1, norm_topk_prob=False)]


@pytest.mark.parametrize("overrides", HF_CASES)
def test_router_matches_transformers(overrides):
    layer = build(bias_std=0.05, **overrides)
    ref = hf_twin(layer)
    x = torch.randn(64, 32)
    _, indices, weights = layer.gate(x)
    _, ref_weights, ref_indices = ref.gate(x)
    # HF uses topk(sorted=False): compare the chosen sets, and each expert's weight.
    indices, order = indices.sort(dim=-1)
    ref_indices, ref_order = ref_indices.sort(dim=-1)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order), atol=1e-6, rtol=0)


@pytest.mark.parametrize("overrides", HF_CASES)
def test_layer_matches_transformers_deepseek_v3_moe(overrides):
    layer = build(bias_std=0.05, **overrides).eval()
    ref = hf_twin(layer)
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=0)


def reference_layer(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The formulas in model/moe.py's docstring, one token at a time, with nothing shared with the module's code."""
    cfg, experts = layer.config, layer.experts
    inter = cfg.moe_intermediate_size
    outputs = []
    for u in x.reshape(-1, x.shape[-1]):
        logits = layer.gate.weight @ u
        s = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
        choice = (s + layer.e_score_correction_bias if cfg.moe_balance == "aux_free" else s).tolist()
        allowed = range(cfg.num_experts)
        if cfg.n_group > 1:
            size = cfg.num_experts // cfg.n_group
            groups = [sorted(choice[g * size:(g + 1) * size], reverse=True) for g in range(cfg.n_group)]
            rank = [sum(g[:2]) if cfg.moe_balance == "aux_free" else g[0] for g in groups]
            best = sorted(range(cfg.n_group), key=lambda g: -rank[g])[:cfg.topk_group]
            allowed = [e for e in allowed if e // size in best]
        chosen = sorted(allowed, key=lambda e: -choice[e])[:cfg.num_experts_per_tok]
        g = s[chosen]
        if cfg.norm_topk_prob:
            g = g / g.sum()
        g = g * cfg.routed_scaling_factor
        y = layer.shared_experts(u) if layer.shared_experts is not None else torch.zeros_like(u)
        for weight, e in zip(g, chosen):
            hidden = experts.gate_up_proj[e] @ u
            y = y + weight * (experts.down_proj[e] @ (F.silu(hidden[:inter]) * hidden[inter:]))
        outputs.append(y)
    return torch.stack(outputs).view_as(x)


@pytest.mark.parametrize("overrides", [dict(), dict(scoring_func="softmax", moe_balance="aux_loss"),
                                       dict(n_group=4, topk_group=2, num_experts_per_tok=3, n_shared_experts=2),
                                       dict(scoring_func="softmax", n_group=2, topk_group=1, moe_balance="none",
                                            norm_topk_prob=False, n_shared_experts=0)])
def test_sorted_dispatch_equals_per_token_loop_outputs_and_gradients(overrides):
    layer = build(bias_std=0.05, **overrides).eval()
    reference = copy.deepcopy(layer)
    x = torch.randn(2, 13, 32)
    ours, expected = layer(x), reference_layer(reference, x)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    probe = torch.randn_like(ours)
    (ours * probe).sum().backward()
    (expected * probe).sum().backward()
    for (name, param), ref_param in zip(layer.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param.grad, ref_param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_grouped_mm_dispatch_equals_loop():
    layer = build().eval()
    x = torch.randn(4, 10, 32)
    with torch.no_grad():
        expected = layer(x)
        layer.experts.impl = "grouped_mm"
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_routing_is_fp32_under_bf16_autocast():
    layer = build(bias_std=0.05).eval()
    x = torch.randn(64, 32)
    _, indices, weights = layer.gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16_indices, bf16_weights = layer.gate(x)
        out = layer(x[None])
    assert torch.equal(bf16_indices, indices) and bf16_weights.dtype == torch.float32
    torch.testing.assert_close(bf16_weights, weights)
    torch.testing.assert_close(out.float(), layer(x[None]), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_bias_changes_which_experts_but_not_their_weights(norm_topk_prob):
    layer = build(norm_topk_prob=norm_topk_prob, routed_scaling_factor=1.0)
    x = torch.randn(256, 32)
    scores, plain_indices, _ = layer.gate(x)
    with torch.no_grad():
        layer.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    biased_scores, indices, weights = layer.gate(x)
    assert not torch.equal(indices.sort(-1).values, plain_indices.sort(-1).values)  # selection moved...
    torch.testing.assert_close(biased_scores, scores, atol=0, rtol=0)
    chosen = scores.gather(1, indices)  # ...but each chosen expert still counts with its unbiased score
    expected = chosen / chosen.sum(-1, keepdim=True) if norm_topk_prob else chosen
    torch.testing.assert_close(weights, expected, atol=1e-7, rtol=1e-6)
    # a large enough bias forces an expert into every token's top-k, still weighted by its own score
    with torch.no_grad():
        layer.e_score_correction_bias.zero_()[5] = 10.0
    _, indices, weights = layer.gate(x)
    assert (indices == 5).any(-1).all()
    if not norm_topk_prob:
        torch.testing.assert_close(weights[indices == 5], scores[:, 5], atol=0, rtol=0)


def test_overloaded_expert_bias_moves_by_exactly_gamma():
    layer = build(bias_update_speed=1e-3)
    with torch.no_grad():
        layer.e_score_correction_bias.copy_(torch.randn(8) * 0.01)
        layer.expert_load.copy_(torch.tensor([30, 10, 10, 10, 2, 10, 10, 8]))  # mean 11.25
    before = layer.e_score_correction_bias.clone()
    stats = update_moe_biases(layer)
    step = torch.tensor([-1, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float32) * 1e-3
    assert torch.equal(layer.e_score_correction_bias, before + step)
    assert stats["moe/max_mean_load"] == pytest.approx(30 / 11.25)
    assert layer.expert_load.sum() == 0  # counters reset
    # an exactly average expert keeps its bias (sign(0) = 0); gamma can be overridden (V3 sets it to 0 late on)
    layer.expert_load.copy_(torch.tensor([4, 4, 2, 6, 4, 4, 4, 4]))
    before = layer.e_score_correction_bias.clone()
    update_moe_biases(layer, gamma=0.5)
    assert torch.equal(layer.e_score_correction_bias - before, torch.tensor([0, 0, .5, -.5, 0, 0, 0, 0]))


def skewed_stream_max_mean_load(steps: int, gamma: float = 1e-3) -> list[float]:
    """A fixed random gate whose expert 0 leans toward the inputs' mean direction u, so most tokens want it (initial
    max/mean load about 3). Returns the max/mean ratio seen at each update of a training-mode layer whose only
    balancing is the bias rule (no optimizer: the gate weights never move)."""
    layer = build(seed=1, n_shared_experts=0, moe_intermediate_size=4, bias_update_speed=gamma).train()
    generator = torch.Generator().manual_seed(2)
    u = torch.randn(32, generator=generator)
    u /= u.norm()
    with torch.no_grad():
        layer.gate.weight.normal_(0, 0.1, generator=generator)
        layer.gate.weight[0] += 0.3 * u
    ratios = []
    for _ in range(steps):
        x = torch.randn(4, 1024, 32, generator=generator) + 2 * u  # 8192 routing slots: sampling noise ~3%
        with torch.no_grad():
            layer(x)
        ratios.append(update_moe_biases(layer)["moe/max_mean_load"])
    return ratios


def test_bias_rule_balances_a_skewed_gate():
    ratios = skewed_stream_max_mean_load(250)
    assert ratios[0] > 2.5  # heavily skewed to start with
    assert min(ratios[:200]) < 1.1 and max(ratios[-20:]) < 1.15  # measured: first below 1.1 at update 133


def test_bias_rule_with_the_wrong_sign_does_not_balance(monkeypatch):
    correct = moe.balance_direction
    monkeypatch.setattr(moe, "balance_direction", lambda loads: -correct(loads))
    ratios = skewed_stream_max_mean_load(100)
    assert min(ratios) > 2.0 and ratios[-1] >= ratios[0]


def test_counters_only_in_training_and_bias_is_a_saved_fp32_buffer():
    layer = build().eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        layer(x)
    assert layer.expert_load.sum() == 0 and layer.aux_loss is None
    layer.train()
    layer(x)
    assert layer.expert_load.sum() == 2 * 5 * 2
    assert all(p is not layer.e_score_correction_bias for p in layer.parameters())
    state = layer.state_dict()
    assert "gate.e_score_correction_bias" in state and not any("expert_load" in key for key in state)
    layer.to(torch.bfloat16)  # gamma-sized steps would vanish on a bf16 bias
    assert layer.e_score_correction_bias.dtype == torch.float32 and layer.gate.weight.dtype == torch.bfloat16
    stats = moe_load_stats(layer)
    assert stats["moe/max_mean_load"] >= 1.0 and layer.expert_load.sum() == 20  # logging does not reset


def test_switch_aux_loss_value_and_gradient():
    alpha = 0.01
    layer = build(scoring_func="softmax", moe_balance="aux_loss", aux_loss_alpha=alpha).train()
    x = torch.randn(3, 16, 32)
    layer(x)
    scores = (x.reshape(-1, 32) @ layer.gate.weight.T).softmax(-1)
    _, indices, _ = layer.gate(x.reshape(-1, 32))
    f = torch.stack([(indices == e).sum() for e in range(8)]).float() / (48 * 2)
    expected = alpha * 8 * (f * scores.mean(0)).sum()
    torch.testing.assert_close(layer.aux_loss, expected)
    layer.aux_loss.backward()
    assert layer.gate.weight.grad.abs().sum() > 0  # P_i carries the gradient to the gate
    with torch.no_grad():
        layer.gate.weight.zero_()  # uniform scores: the loss is exactly alpha whatever the routing
    layer(x)
    assert layer.aux_loss.item() == pytest.approx(alpha, rel=1e-6)


def test_sequence_wise_aux_loss_for_aux_free():
    alpha = 1e-4
    layer = build(seq_aux_alpha=alpha).train()
    x = torch.randn(3, 16, 32)
    layer(x)
    expected = 0.0
    for seq in x:
        s = (seq @ layer.gate.weight.T).sigmoid()
        _, indices, _ = layer.gate(seq)
        f = torch.stack([(indices == e).sum() for e in range(8)]).float() * 8 / (2 * 16)
        expected += alpha * (f * (s / s.sum(-1, keepdim=True)).mean(0)).sum() / 3
    torch.testing.assert_close(layer.aux_loss, expected)
    container = nn.ModuleList([layer, build(seq_aux_alpha=alpha).train()])
    container[1](x)
    torch.testing.assert_close(collect_moe_aux_loss(container), layer.aux_loss + container[1].aux_loss)
    container.eval()
    with torch.no_grad():
        container[0](x), container[1](x)
    assert collect_moe_aux_loss(container) is None


# ---- padding: loads and balancing losses count real tokens only --------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(seq_aux_alpha=1e-3), dict(scoring_func="softmax", moe_balance="aux_loss")])
def test_layer_counts_real_tokens_only(overrides):
    """With a token mask, padding adds nothing to the loads or the losses: the layer counts as if it had seen the
    real tokens alone (Mixtral's load_balancing_loss_func drops padding the same way)."""
    layer = build(**overrides).train()
    lengths = [5, 11, 8]
    x = torch.randn(3, 11, 32)
    real = torch.arange(11)[None] < torch.tensor(lengths)[:, None]
    layer(x, real)
    padded_load, padded_aux = layer.expert_load.clone(), layer.aux_loss
    layer.expert_load.zero_()
    if layer.config.moe_balance == "aux_loss":  # the Switch loss pools the batch's tokens: all real ones in one row
        layer(x[real][None])
        expected_aux = layer.aux_loss
    else:  # the sequence-wise loss is a mean over sequences: each real sequence alone
        per_sequence = []
        for seq, n in zip(x, lengths):
            layer(seq[None, :n])
            per_sequence.append(layer.aux_loss)
        expected_aux = torch.stack(per_sequence).mean()
    assert padded_load.sum() == sum(lengths) * 2 and torch.equal(padded_load, layer.expert_load)
    torch.testing.assert_close(padded_aux, expected_aux, atol=1e-7, rtol=1e-5)


def moe_model(**overrides):
    """A real TinyMind MoE (one dense layer, then MoE) with a spread-out router, in training mode."""
    from model import TinyMindForCausalLM
    torch.manual_seed(0)
    model = TinyMindForCausalLM(moe_config(vocab_size=97, num_hidden_layers=3, num_attention_heads=4,
                                           num_key_value_heads=2, first_k_dense_replace=1, **overrides))
    with torch.no_grad():
        for _, layer in moe.moe_layers(model):
            layer.gate.weight.normal_(0, 0.3)
    return model.train()


def counted(model, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer expert loads [L, E] and aux losses [L] of one training forward, from zeroed counters."""
    layers = [layer for _, layer in moe.moe_layers(model)]
    for layer in layers:
        layer.expert_load.zero_()
    with torch.no_grad():
        model(*args, **kwargs)
    loads = torch.stack([layer.expert_load.clone() for layer in layers])
    return loads, torch.stack([layer.aux_loss for layer in layers])


@pytest.mark.parametrize("balance", [dict(seq_aux_alpha=1e-3), dict(scoring_func="softmax", moe_balance="aux_loss")])
def test_padded_and_packed_batches_count_what_their_sequences_count_alone(balance):
    """The model passes each MoE layer which positions are real: a 2D padding mask's ones (right or left padding),
    or every position of a packed row (4D block mask + position ids). Padding positions all share one hidden
    state and would all pick the same experts; here they must not count at all."""
    from model.data.packing import packed_collate
    model = moe_model(**balance)
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(1, 97, (n,), generator=generator) for n in (5, 11, 8)]
    alone = [counted(model, seq[None]) for seq in sequences]
    loads_alone = sum(load for load, _ in alone)
    packed = packed_collate([{"input_ids": torch.cat(sequences), "labels": torch.cat(sequences),
                              "position_ids": torch.cat([torch.arange(len(s)) for s in sequences]),
                              "segment_ids": torch.cat([torch.full((len(s),), k) for k, s in enumerate(sequences)])}])
    packed_loads, packed_aux = counted(model, packed["input_ids"], attention_mask=packed["attention_mask"],
                                       position_ids=packed["position_ids"])
    assert torch.equal(packed_loads, loads_alone)  # a packed row: every position is a real token
    for side in ("right", "left"):
        ids, mask = torch.zeros(3, 11, dtype=torch.long), torch.zeros(3, 11, dtype=torch.long)
        for row, seq in enumerate(sequences):
            span = slice(0, len(seq)) if side == "right" else slice(11 - len(seq), 11)
            ids[row, span], mask[row, span] = seq, 1
        loads, aux = counted(model, ids, attention_mask=mask)
        assert torch.equal(loads, loads_alone), side
        stats = moe_load_stats(model)  # the logged statistic reads the same counters
        for (label, _), row in zip(moe.moe_layers(model), loads_alone):
            assert stats[f"moe/layer{label}/max_mean_load"] == pytest.approx((row.max() / row.float().mean()).item())
        # Switch loss: over the batch's tokens, as in the packed row; sequence-wise loss: the mean over sequences.
        expected = packed_aux if model.config.moe_balance == "aux_loss" else \
            torch.stack([aux_one for _, aux_one in alone]).mean(dim=0)
        torch.testing.assert_close(aux, expected, atol=1e-7, rtol=1e-5, msg=side)


def test_count_active_params():
    layers = nn.ModuleList([build(), build(), nn.Linear(32, 32, bias=False)])
    total = sum(p.numel() for p in layers.parameters())
    expert = 3 * 32 * 24
    assert count_active_params(layers) == total - 2 * (8 - 2) * expert
    from model import TinyMindForCausalLM  # the config path builds the model on the meta device
    config = moe_config(vocab_size=97, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        first_k_dense_replace=1)
    model = TinyMindForCausalLM(config)
    assert active_params_of(config) == count_active_params(model)
    assert count_active_params(model) == sum(p.numel() for p in model.parameters()) - 2 * (8 - 2) * expert


# ---- DDP: biases stay identical because the loads are summed over ranks before the update --------------------------

def rank_batch(rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(2, 64, 32, generator=generator) + 0.7 * rank  # ranks see differently distributed data


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    layer = build(bias_update_speed=0.01, seq_aux_alpha=1e-4).train()
    model = nn.parallel.DistributedDataParallel(layer)  # default broadcast_buffers=True
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # phase one: weights fixed, so a replay is exact
    for step in range(6):
        if step == 4:
            phase_one = layer.e_score_correction_bias.clone()
            optimizer.param_groups[0]["lr"] = 0.1  # phase two: real training steps
        for micro in range(2):  # gradient accumulation without no_sync(): DDP syncs buffers before each forward
            out = model(rank_batch(rank, 2 * step + micro))
            (out.pow(2).mean() + collect_moe_aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
        update_moe_biases(model)
    torch.save({"phase_one": phase_one, "bias": layer.e_score_correction_bias, "state": layer.state_dict()},
               f"{out_dir}/rank{rank}.pt")
    # then leave as model.training.runtime.cleanup does: gloo's teardown can deadlock otherwise (hung once here)
    del model
    dist.barrier()
    time.sleep(0.5)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch + transformers: ~10 s on an idle machine
def test_ddp_biases_identical_across_ranks(tmp_path):
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert torch.equal(results[0]["bias"], results[1]["bias"]) and results[0]["bias"].abs().sum() > 0
    for key, value in results[0]["state"].items():
        torch.testing.assert_close(value, results[1]["state"][key], atol=0, rtol=0, msg=key)
    # The update used the global load of all micro-batches on all ranks: one process replaying every batch ends
    # with the same biases, while a rank updating from its own load alone would not.
    replay, local = build(bias_update_speed=0.01).train(), build(bias_update_speed=0.01).train()
    with torch.no_grad():
        for step in range(4):
            for micro in range(2):
                replay(rank_batch(0, 2 * step + micro)), replay(rank_batch(1, 2 * step + micro))
                local(rank_batch(0, 2 * step + micro))
            update_moe_biases(replay), update_moe_biases(local)
    assert torch.equal(results[0]["phase_one"], replay.e_score_correction_bias)
    assert not torch.equal(results[0]["phase_one"], local.e_score_correction_bias)
