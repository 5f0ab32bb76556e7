"""LoRA: low-rank adapters for any model built from nn.Linear layers, in plain PyTorch.

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes a pretrained weight W [out, in] and learns a low-rank update:

    y = W x + s * B A dropout(x),      A: [r, in], B: [out, r],   s = alpha / r   (rsLoRA: s = alpha / sqrt(r))

A starts as kaiming_uniform_(a=sqrt(5)) (what nn.Linear uses, and PEFT's default init), B starts at zero, so the
adapted model is exactly the base model at step 0 and only the r * (in + out) numbers of A and B are trained.
After training, W' = W + s * B A can be folded ("merged") into the weight, so inference costs nothing extra.

The layout and names follow Hugging Face PEFT (`src/peft/tuners/lora/layer.py`): each adapted layer keeps the
original module as `base_layer` and the adapter as `lora_A` / `lora_B` nn.Linear layers, so our module paths map
one to one onto PEFT's checkpoint keys (see `export_peft`).

On a TinyMind MoE model the default targets adapt the attention projections, the dense FFN layers (the first
`first_k_dense_replace` layers) and each MoE layer's shared experts: those are nn.Linear. The routed experts are not
adapted: their weights are stacked 3D parameters (`mlp.experts.gate_up_proj` [E, 2I, d], `mlp.experts.down_proj`
[E, d, I]), not nn.Linear modules, and the router (`mlp.gate`) is not one either; both stay frozen. So do the
routers' aux-free balancing biases: apply_lora sets `bias_frozen` on every MoE layer, and `update_moe_biases` (which
the Trainer calls after every step) then leaves them as they are, so base + adapter is exactly the trained model
(the adapter file holds only A and B).

Typical use:

    model = apply_lora(model, r=8, alpha=16)        # wraps q/k/v/o/gate/up/down projections, freezes the rest
    ...train (only lora_A / lora_B have requires_grad)...
    save_lora(model, "out/lora.pt")                 # adapter tensors + settings only (a few MB)
    model = remove_lora(model, merge=True)          # plain model with W + sBA, ready for a full checkpoint
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence

import torch
from torch import nn

from .files import atomic_torch_save
from .moe import MoEFeedForward

__all__ = [
    "DEFAULT_TARGETS", "MLA_TARGETS", "LoRALinear", "apply_lora", "lora_layers", "lora_state_dict",
    "lora_config_dict", "lora_param_groups", "save_lora", "load_lora", "merge_lora", "unmerge_lora", "remove_lora",
    "export_peft",
]

# Dense attention + SwiGLU MLP projections (Llama/Qwen names). A TinyMind MoE layer's shared experts reuse the MLP
# names (`...mlp.shared_experts.gate_proj`) and are covered; its routed experts are stacked 3D parameters, not
# nn.Linear, and get no adapter (see the module doc). In models whose experts are separate Linear layers
# (`...experts.3.gate_proj`) the same suffixes match them. A router named `...mlp.gate` never matches `gate_proj`:
# matching is per dotted component, not a raw string suffix.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Multi-head latent attention (DeepSeek-V2/V3) projection names, for `target_modules=DEFAULT_TARGETS + MLA_TARGETS`.
MLA_TARGETS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


class LoRALinear(nn.Module):
    """An nn.Linear plus a trainable low-rank update: y = base(x) + scale * lora_B(lora_A(dropout(x))).

    The base layer is frozen. `merge()` adds scale * B @ A into the base weight (and `forward` then skips the
    adapter); `unmerge()` subtracts it again, so the two are inverses up to floating-point rounding.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = int(r), float(alpha), bool(use_rslora)
        # rsLoRA (Kalajdzievski 2023, arXiv 2312.03732): alpha / sqrt(r) keeps the update's scale stable as r grows.
        self.scale = self.alpha / math.sqrt(self.r) if use_rslora else self.alpha / self.r
        self.dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapter weights live on the base weight's device and dtype, as PEFT does, so .to()/.half() stay coherent.
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, **factory)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, **factory)
        self.reset_lora_parameters()
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.merged = False

    def reset_lora_parameters(self) -> None:
        """A ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's own init), B = 0: the product BA, hence the update, is 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, the [out, in] update this adapter adds to W (computed in fp32 for merge accuracy)."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return delta * self.scale

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight W + sBA (differentiable w.r.t. A and B). Code that reads `proj.weight` directly,
        e.g. MLA's absorbed-matrix decode path that reads kv_b_proj.weight, then sees the adapted weight."""
        if self.merged:
            return self.base_layer.weight
        return self.base_layer.weight + self.delta_weight().to(self.base_layer.weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scale * B A. Forward then runs only the base layer (same output, no adapter cost)."""
        if self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scale * B A: undoes `merge` (exact up to rounding), so training can continue on the adapter."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        # Under autocast the adapter matmuls run in the autocast dtype anyway; outside it, cast the input to the
        # adapter's dtype (it may differ from an fp32 activation when the model was cast to bf16).
        x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))
        return result + (update * self.scale).to(result.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"scale={self.scale:.4g}, dropout={self.dropout_p}, merged={self.merged}")


def _matches(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's target_modules rule, so an exported adapter_config.json selects the same layers in PEFT:
    - a single string is a regular expression that must match the WHOLE dotted module name (re.fullmatch),
      e.g. r".*layers\\.(0|1)\\..*(q_proj|v_proj)";
    - a list/tuple holds names matched against whole dotted components at the end of the module name: "q_proj"
      matches "model.layers.0.self_attn.q_proj" but not "...q_a_proj"; "self_attn.q_proj" also works.
    """
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> LoRALinear for every adapted layer in the model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _count(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())  # parameters() de-duplicates tied weights
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules: str | Sequence[str] = DEFAULT_TARGETS, use_rslora: bool = False,
               verbose: bool = True) -> nn.Module:
    """Wrap every nn.Linear whose module name matches `target_modules` in a LoRALinear, in place, and freeze every
    parameter that is not a LoRA A/B matrix, and every MoE router bias (`bias_frozen`). Returns the model.

    target_modules follows PEFT (see `_matches`): a tuple/list of dotted-name suffixes, or one regex string matched
    against the full module name. Add `MLA_TARGETS` for latent-attention models. On a MoE model the defaults reach
    the shared experts but not the routed ones (stacked 3D parameters, not nn.Linear; see the module doc). Raises if
    nothing matches (a typo would otherwise train nothing) or if a target's weight is tied to another parameter
    (merging would silently change that parameter too).
    """
    if lora_layers(model):
        raise RuntimeError("apply_lora: the model already has LoRA layers (call remove_lora first)")
    if not isinstance(target_modules, str):
        target_modules = tuple(target_modules)
    # Parameter object -> every name it is reachable under; more than one name means a tied weight.
    names_of: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(pname)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and _matches(name, target_modules)]
    if not targets:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"apply_lora: no nn.Linear matches target_modules={target_modules!r}; "
                         f"the model's Linear layer names are {linear_names}")
    for name, m in targets:
        tied = names_of[id(m.weight)]
        if len(tied) > 1:
            raise ValueError(f"apply_lora: {name}.weight is tied to {tied}; LoRA on a tied weight is not supported")

    # Remember trainability so remove_lora can give back the model as it was.
    model._lora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    # The aux-free router bias is a buffer that update_moe_biases moves after every optimizer step, outside the
    # optimizer. The adapter file does not hold it, so it must stay the base's or base + adapter != trained model.
    moe_layers = {n: m for n, m in model.named_modules() if isinstance(m, MoEFeedForward)}
    model._lora_bias_frozen = {n: m.bias_frozen for n, m in moe_layers.items()}
    for m in moe_layers.values():
        m.bias_frozen = True
    for name, m in targets:
        _set_submodule(model, name, LoRALinear(m, r, alpha, dropout, use_rslora))
    model._lora_config = dict(r=int(r), alpha=float(alpha), dropout=float(dropout),
                              targets=target_modules if isinstance(target_modules, str) else list(target_modules),
                              use_rslora=bool(use_rslora))
    if verbose:
        trainable, total = _count(model)
        print(f"LoRA r={r} alpha={alpha} on {len(targets)} layers: trainable {trainable:,} / total {total:,} params "
              f"({100 * trainable / total:.3f}%)")
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: {"<module path>.lora_A.weight": [r, in], "<module path>.lora_B.weight": [out, r]}."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def lora_param_groups(model: nn.Module, loraplus_lr_ratio: float = 1.0) -> list[dict]:
    """The trainable adapter parameters as optimizer groups: A matrices at the scheduled lr, B matrices at
    `loraplus_lr_ratio` times it (LoRA+, Hayou et al. 2024: B starts at zero and A at random, and one shared lr
    leaves B learning too slowly; PEFT's create_loraplus_optimizer). `lr_scale` is read by
    model.training.engine.make_optimizer."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for name, p in trainable if ".lora_B." not in name]},
            {"params": [p for name, p in trainable if ".lora_B." in name], "lr_scale": loraplus_lr_ratio}]


def lora_config_dict(model: nn.Module) -> dict:
    """The settings apply_lora was called with: {r, alpha, dropout, targets, use_rslora}."""
    config = getattr(model, "_lora_config", None)
    if config is None:
        raise RuntimeError("lora_config_dict: the model has no LoRA layers (call apply_lora first)")
    return dict(config)


def save_lora(model: nn.Module, path: str | os.PathLike) -> None:
    """Write {"lora": adapter tensors, "config": lora_config_dict} with torch.save, atomically: a crash mid-write
    leaves the previous file intact and no temp file behind (model/files.py)."""
    # A and B are the same whether or not the layers are merged, so saving is valid in either state.
    payload = {"lora": {k: v.detach().cpu().clone() for k, v in lora_state_dict(model).items()},
               "config": lora_config_dict(model)}
    atomic_torch_save(payload, os.fspath(path))


def load_lora(model: nn.Module, path_or_dict: str | os.PathLike | dict, verbose: bool = False) -> nn.Module:
    """Load an adapter written by save_lora. If the model has no LoRA layers yet, apply_lora is called with the
    stored settings first. Keys must match exactly (strict), and r/alpha/use_rslora must agree with the model's.
    From a file, every way it can fail (damaged, not an adapter, an adapter of another model) is a BadCheckpoint
    that names the file."""
    if isinstance(path_or_dict, dict):
        return _load_lora_payload(model, path_or_dict, verbose)
    # Reading weight files safely lives with the other weight files; imported here, so the network modules
    # themselves do not depend on the data side (where BadCheckpoint's base class is).
    from .checkpoint import BadCheckpoint, read_torch_file
    path = os.fspath(path_or_dict)
    payload = read_torch_file(path, advice="delete it and retrain the adapter")
    try:
        return _load_lora_payload(model, payload, verbose)
    except (ValueError, KeyError, TypeError) as error:
        reason = str(error.args[0] if error.args else type(error).__name__).removeprefix("load_lora: ")
        raise BadCheckpoint(f"{path} is not a LoRA adapter for this model: {reason}") from None


def _load_lora_payload(model: nn.Module, payload, verbose: bool) -> nn.Module:
    if not isinstance(payload, dict) or "lora" not in payload or "config" not in payload:
        raise ValueError("load_lora: expected a dict with 'lora' (tensors) and 'config' keys, as save_lora writes")
    config, tensors = payload["config"], payload["lora"]
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError("load_lora: 'lora' must map names to tensors")
    settings = ("r", "alpha", "dropout", "targets", "use_rslora")
    if not isinstance(config, dict) or not all(k in config for k in settings):
        raise ValueError(f"load_lora: 'config' must hold the adapter's settings {settings}")
    targets = config["targets"] if isinstance(config["targets"], str) else tuple(config["targets"])
    if not lora_layers(model):
        apply_lora(model, r=config["r"], alpha=config["alpha"], dropout=config["dropout"], target_modules=targets,
                   use_rslora=config["use_rslora"], verbose=verbose)
    current = lora_config_dict(model)
    for key in ("r", "alpha", "use_rslora"):
        if current[key] != config[key]:
            raise ValueError(f"load_lora: model has LoRA {key}={current[key]!r}, the file has {config[key]!r}")
    if any(m.merged for m in lora_layers(model).values()):
        raise RuntimeError("load_lora: unmerge_lora(model) first; loading A/B into merged layers would be wrong")
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise KeyError(f"load_lora: adapter keys do not match the model. Missing {len(missing)} "
                       f"(e.g. {missing[:3]}), unexpected {len(unexpected)} (e.g. {unexpected[:3]})")
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise ValueError(f"load_lora: {k} has shape {tuple(v.shape)} in the file, {tuple(own[k].shape)} in model")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)  # state_dict() tensors share storage with the parameters
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += sBA); forward output is unchanged up to rounding."""
    for m in lora_layers(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora (W -= sBA)."""
    for m in lora_layers(model).values():
        m.unmerge()
    return model


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by its plain nn.Linear again, in place, and restore the parameters' original
    requires_grad and the MoE layers' `bias_frozen`. merge=True keeps the adapter's effect (W + sBA), which is what
    a merged full checkpoint needs; merge=False throws the adapter away and restores the base weights."""
    for name, m in lora_layers(model).items():
        m.merge() if merge else m.unmerge()
        _set_submodule(model, name, m.base_layer)
    for n, p in model.named_parameters():
        p.requires_grad_(getattr(model, "_lora_requires_grad", {}).get(n, True))
    for n, frozen in getattr(model, "_lora_bias_frozen", {}).items():
        model.get_submodule(n).bias_frozen = frozen
    for attr in ("_lora_config", "_lora_requires_grad", "_lora_bias_frozen"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def export_peft(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write the adapter in Hugging Face PEFT's on-disk format, loadable with
    `PeftModel.from_pretrained(hf_model, out_dir)` when `hf_model` has the same module paths as `model`:

    - adapter_model.safetensors: "base_model.model.<module path>.lora_A.weight" / "...lora_B.weight"
      (PEFT drops the adapter name "default" from saved keys);
    - adapter_config.json: peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout, target_modules
      (same matching rule as ours), bias "none", use_rslora.
    """
    from safetensors.torch import save_file  # a transformers dependency; only needed here

    config = lora_config_dict(model)
    tensors = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config["r"], "lora_alpha": config["alpha"], "lora_dropout": config["dropout"],
        "target_modules": config["targets"], "bias": "none", "use_rslora": config["use_rslora"],
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "use_dora": False,
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(peft_config, f, indent=2)
