"""LoRA (model/lora.py) against its definition and against Hugging Face PEFT (the oracle, used only here).

PEFT is imported inside the tests that need it (about 5 s once), so the rest of the file stays fast.
"""
import copy
import json
import math
import os

import pytest
import torch
from torch import nn

from model.lora import (DEFAULT_TARGETS, MLA_TARGETS, LoRALinear, apply_lora, export_peft, load_lora, lora_config_dict,
                        lora_layers, lora_state_dict, merge_lora, remove_lora, save_lora, unmerge_lora)


def tiny_llama(seed: int = 0):
    """A random 2-layer transformers Llama (no downloads): a real model with q/k/v/o/gate/up/down projections."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def randomize_lora(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """B starts at zero (the update is 0); give A and B random values so the adapter actually does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * std)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(123))


class ToyBlock(nn.Module):
    """Module names of our other architectures: MLA projections, a router, a ModuleList of per-expert Linear layers
    (other MoE codebases; TinyMind's routed experts are stacked 3D parameters, see the TinyMind MoE tests below),
    and a near-miss name."""

    def __init__(self):
        super().__init__()
        self.q_a_proj, self.q_b_proj = nn.Linear(8, 4), nn.Linear(4, 8)
        self.kv_a_proj_with_mqa, self.kv_b_proj = nn.Linear(8, 6), nn.Linear(6, 8)
        self.o_proj = nn.Linear(8, 8)
        self.gate = nn.Linear(8, 3, bias=False)  # MoE router: must NOT match "gate_proj"
        self.experts = nn.ModuleList(nn.ModuleDict(dict(gate_proj=nn.Linear(8, 5), up_proj=nn.Linear(8, 5),
                                                        down_proj=nn.Linear(5, 8))) for _ in range(2))
        self.my_q_proj_norm = nn.LayerNorm(8)  # not a Linear: never wrapped


def test_init_is_exactly_the_base_model():
    base = tiny_llama()
    reference = logits_of(base, IDS)
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    assert len(lora_layers(model)) == 2 * 7  # 7 projections per layer
    assert torch.equal(logits_of(model, IDS), reference)  # B = 0, so the update is exactly zero


def test_only_lora_parameters_train_and_base_is_bitwise_unchanged():
    model = apply_lora(tiny_llama(), r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in trainable and ".lora_B." in n:
            assert not torch.equal(p, before[n]), n  # B gets a gradient through A at step 1 (A gets none: B = 0)
        if n not in trainable:
            assert torch.equal(p, before[n]), n
            assert p.grad is None, n


def test_merge_unmerge_and_weight_property():
    model = apply_lora(tiny_llama(), r=4, alpha=8)
    randomize_lora(model)
    base_weights = {n: m.base_layer.weight.detach().clone() for n, m in lora_layers(model).items()}
    unmerged = logits_of(model, IDS)
    layer = next(iter(lora_layers(model).values()))
    x = torch.randn(3, layer.in_features)
    # .weight is the effective weight W + sBA, for code that reads the matrix directly (MLA absorption)
    torch.testing.assert_close(nn.functional.linear(x, layer.weight), layer(x), atol=1e-6, rtol=0)
    merge_lora(model)
    assert all(m.merged for m in lora_layers(model).values())
    torch.testing.assert_close(logits_of(model, IDS), unmerged, atol=1e-6, rtol=0)
    torch.testing.assert_close(nn.functional.linear(x, layer.weight), layer(x), atol=1e-6, rtol=0)
    unmerge_lora(model)
    for n, m in lora_layers(model).items():
        torch.testing.assert_close(m.base_layer.weight, base_weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits_of(model, IDS), unmerged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_alpha_scales_the_update_linearly(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    x = torch.randn(5, 16)
    layers = [LoRALinear(copy.deepcopy(base), r=4, alpha=a, use_rslora=use_rslora) for a in (8, 16)]
    for m in layers:  # same A and B in both
        m.load_state_dict(layers[0].state_dict())
        nn.init.normal_(m.lora_B.weight, generator=torch.Generator().manual_seed(3))
    delta1, delta2 = (m(x) - base(x) for m in layers)
    torch.testing.assert_close(delta2, 2 * delta1, atol=1e-6, rtol=0)
    assert layers[0].scale == (8 / math.sqrt(4) if use_rslora else 8 / 4)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_lora_linear(use_rslora):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    ours = LoRALinear(copy.deepcopy(base), r=4, alpha=8, use_rslora=use_rslora)
    nn.init.normal_(ours.lora_B.weight, generator=torch.Generator().manual_seed(3))
    peft_layer = PeftLinear(copy.deepcopy(base), "default", LoraConfig(r=4, lora_alpha=8, use_rslora=use_rslora),
                            r=4, lora_alpha=8)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    assert peft_layer.scaling["default"] == ours.scale
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(ours(x), peft_layer(x), atol=1e-6, rtol=0)
    ours.merge()
    peft_layer.merge()
    torch.testing.assert_close(ours.base_layer.weight, peft_layer.base_layer.weight, atol=1e-6, rtol=0)


def test_dropout_in_training_matches_peft_given_the_same_random_state():
    """The demo trains with --lora_dropout 0.1: the output and the adapter's gradients are PEFT's when both layers
    draw their mask from the same generator state; in eval mode dropout is off."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    ours = LoRALinear(copy.deepcopy(base), r=4, alpha=8, dropout=0.1)
    nn.init.normal_(ours.lora_B.weight, generator=torch.Generator().manual_seed(3))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1)
    peft_layer = PeftLinear(copy.deepcopy(base), "default", config, r=4, lora_alpha=8, lora_dropout=0.1)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(3, 7, 16)
    outputs = []
    for layer in (ours, peft_layer):
        layer.train()
        torch.manual_seed(5)
        y = layer(x)
        y.square().sum().backward()
        outputs.append(y)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=0)
    assert not torch.allclose(outputs[0], base(x) + ours.scale * ours.lora_B(ours.lora_A(x)))  # dropout did drop
    torch.testing.assert_close(ours.lora_A.weight.grad, peft_layer.lora_A["default"].weight.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.lora_B.weight.grad, peft_layer.lora_B["default"].weight.grad, atol=1e-5, rtol=0)
    ours.eval()
    peft_layer.eval()
    torch.testing.assert_close(ours(x), peft_layer(x), atol=1e-6, rtol=0)


def test_export_peft_loads_in_peft_and_reproduces_our_logits(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the test must never touch the network
    from peft import PeftModel

    base = tiny_llama()
    ours = apply_lora(copy.deepcopy(base), r=4, alpha=12, use_rslora=True)
    randomize_lora(ours)
    export_peft(ours, tmp_path, base_model_name_or_path="tiny-random-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 12, True)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    n_peft = sum(1 for n, _ in peft_model.named_parameters() if ".lora_A." in n)
    assert n_peft == len(lora_layers(ours))
    reference = logits_of(base, IDS)
    ours_logits = logits_of(ours, IDS)
    assert (ours_logits - reference).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(logits_of(peft_model, IDS), ours_logits, atol=1e-6, rtol=0)


def test_loraplus_steps_match_peft_create_loraplus_optimizer(tmp_path, monkeypatch):
    """Three AdamW steps with our LoRA+ groups (make_optimizer + the schedule's set_learning_rate) move every A and
    B exactly as PEFT's create_loraplus_optimizer does from the same adapter and the same losses."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from peft import PeftModel
    from peft.optimizers import create_loraplus_optimizer

    from model.lora import lora_param_groups
    from model.training.engine import make_optimizer, set_learning_rate

    base = tiny_llama()
    ours = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    randomize_lora(ours)
    export_peft(ours, tmp_path, base_model_name_or_path="tiny-random-llama")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    lr, ratio = 1e-2, 8.0
    optimizer = make_optimizer(ours, lora_param_groups(ours, ratio), lr, 0.0, torch.device("cpu"))
    set_learning_rate(optimizer, lr)
    reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                          betas=(0.9, 0.95), eps=1e-8)
    assert sorted(g["lr"] for g in optimizer.param_groups if g["params"]) == [lr, lr * ratio]
    for model, opt in ((ours, optimizer), (theirs, reference)):
        for _ in range(3):
            opt.zero_grad()
            model(input_ids=IDS).logits.pow(2).mean().backward()
            opt.step()
    peft_tensors = {name.replace("base_model.model.", "").replace(".default", ""): p
                    for name, p in theirs.named_parameters() if ".lora_" in name}
    moved = lora_state_dict(ours)
    assert moved.keys() == peft_tensors.keys()
    for name, tensor in moved.items():  # steps of up to lr x ratio = 0.08; fused vs plain AdamW round apart
        torch.testing.assert_close(tensor, peft_tensors[name].detach(), atol=2e-5, rtol=0)
    b_moved = [m.lora_B.weight for m in lora_layers(ours).values()]
    plain = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    randomize_lora(plain)
    plain_opt = make_optimizer(plain, lora_param_groups(plain, 1.0), lr, 0.0, torch.device("cpu"))
    for _ in range(3):
        plain_opt.zero_grad()
        plain(input_ids=IDS).logits.pow(2).mean().backward()
        plain_opt.step()
    b_plain = [m.lora_B.weight for m in lora_layers(plain).values()]
    start = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    randomize_lora(start)
    b_start = [m.lora_B.weight for m in lora_layers(start).values()]
    # the ratio really is applied: B moved further than at ratio 1
    assert sum((b - s).norm() for b, s in zip(b_moved, b_start)) > 2 * sum((b - s).norm()
                                                                          for b, s in zip(b_plain, b_start))


def test_save_load_round_trip_holds_only_adapter_tensors(tmp_path):
    model = apply_lora(tiny_llama(), r=4, alpha=8, dropout=0.1)
    randomize_lora(model)
    expected = logits_of(model.eval(), IDS)
    path = tmp_path / "sub" / "adapter.pt"
    save_lora(model, path)
    assert not [f for f in os.listdir(path.parent) if f != "adapter.pt"]  # no temporary file left behind
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"lora", "config"}
    assert set(payload["lora"]) == set(lora_state_dict(model))
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in payload["lora"])
    assert payload["config"] == dict(r=4, alpha=8.0, dropout=0.1, targets=list(DEFAULT_TARGETS), use_rslora=False)

    fresh = tiny_llama()  # same seed: same base weights; load_lora applies LoRA with the stored settings
    load_lora(fresh, path)
    assert lora_config_dict(fresh) == payload["config"]
    torch.testing.assert_close(logits_of(fresh.eval(), IDS), expected, atol=0, rtol=0)

    with pytest.raises(ValueError, match="r=8"):  # an adapter of a different rank is refused clearly
        load_lora(apply_lora(tiny_llama(), r=8, alpha=8, verbose=False), path)
    bad = {"lora": dict(payload["lora"]), "config": payload["config"]}
    bad["lora"]["model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    with pytest.raises(KeyError, match="unexpected 1"):
        load_lora(tiny_llama(), bad)


def test_remove_lora_gives_plain_model():
    base = tiny_llama()
    original_keys = set(base.state_dict())
    model = apply_lora(copy.deepcopy(base), r=4, alpha=8)
    randomize_lora(model)
    adapted = logits_of(model, IDS)
    merged = remove_lora(copy.deepcopy(model), merge=True)
    assert not lora_layers(merged) and set(merged.state_dict()) == original_keys
    assert all(p.requires_grad for p in merged.parameters())  # trainability restored as it was
    torch.testing.assert_close(logits_of(merged, IDS), adapted, atol=1e-6, rtol=0)
    dropped = remove_lora(model, merge=False)
    assert torch.equal(logits_of(dropped, IDS), logits_of(base, IDS))  # never merged: base weights untouched


def test_target_matching_mla_moe_and_errors(capsys):
    toy = apply_lora(ToyBlock(), r=2, alpha=4, target_modules=DEFAULT_TARGETS + MLA_TARGETS)
    wrapped = set(lora_layers(toy))
    assert wrapped == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"} | {
        f"experts.{i}.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    assert "trainable" in capsys.readouterr().out
    assert not any(p.requires_grad for n, p in toy.named_parameters() if "lora_" not in n)

    # a regex string must match the whole module name (PEFT's rule): only expert 1's projections here
    toy = apply_lora(ToyBlock(), r=2, alpha=4, target_modules=r"experts\.1\..*_proj", verbose=False)
    assert set(lora_layers(toy)) == {"experts.1.gate_proj", "experts.1.up_proj", "experts.1.down_proj"}

    # "q_proj" is a whole-component suffix: it does not pick up q_a_proj / q_b_proj, and a typo is an error
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        apply_lora(ToyBlock(), target_modules=("q_proj", "k_proj"), verbose=False)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.embed.weight

    with pytest.raises(ValueError, match="tied"):
        apply_lora(Tied(), target_modules=("lm_head",), verbose=False)


# ---- a real TinyMind MoE ------------------------------------------------------------------------------------------

def tiny_moe(seed: int = 0):
    """A random TinyMind MoE: layer 0 dense (first_k_dense_replace=1), layer 1 MoE with a shared expert."""
    from model import TinyMindConfig, TinyMindForCausalLM

    torch.manual_seed(seed)
    config = TinyMindConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=48, use_moe=True, num_experts=4,
                            num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
                            first_k_dense_replace=1, bias_update_speed=0.01)
    return TinyMindForCausalLM(config)


def test_what_the_default_targets_adapt_on_a_tinymind_moe():
    """Attention, the dense FFN layers and the shared experts are nn.Linear and get adapters. The routed experts
    are stacked 3D parameters (experts.gate_up_proj [E, 2I, d], experts.down_proj [E, d, I]) and the router is a
    TopkRouter: neither is an nn.Linear, so both stay frozen without an adapter."""
    model = apply_lora(tiny_moe(), r=2, alpha=4, verbose=False)
    ffn = ("gate_proj", "up_proj", "down_proj")
    assert set(lora_layers(model)) == (
        {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        | {f"model.layers.0.mlp.{p}" for p in ffn}  # the dense layer's SwiGLU
        | {f"model.layers.1.mlp.shared_experts.{p}" for p in ffn})  # the MoE layer's shared expert
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("mlp.experts." in n or "mlp.gate." in n for n in trainable)


def test_lora_freezes_the_moe_router_biases_and_remove_lora_unfreezes_them():
    """A LoRA run trains adapters only: update_moe_biases (which the Trainer calls after every step) must leave the
    base's aux-free biases as they are, or base + adapter would not be the trained model."""
    from model.moe import moe_layers, update_moe_biases

    model = apply_lora(tiny_moe(), r=2, alpha=4, verbose=False).train()
    (_, layer), = moe_layers(model)
    before = layer.e_score_correction_bias.clone()
    model(input_ids=IDS)
    stats = update_moe_biases(model)
    assert torch.equal(layer.e_score_correction_bias, before)
    assert "moe/max_mean_load" in stats and layer.expert_load.sum() == 0  # loads still counted, logged and reset
    remove_lora(model, merge=False)  # the model as it was: its biases follow the loads again
    model(input_ids=IDS)
    update_moe_biases(model)
    assert not torch.equal(layer.e_score_correction_bias, before)
