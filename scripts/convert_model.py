"""Export a TinyMind checkpoint to a transformers directory, or import such a directory back to a .pth.

    python -m scripts.convert_model --load_from out/full_sft_512.pth --out_dir export/tinymind-26m
    python -m scripts.convert_model --load_from out/full_sft_512.pth --lora_name lora_medical --out_dir export/med
    python -m scripts.convert_model --load_from out/full_sft_512.pth --lora_name lora_medical \
        --out_dir export/tinymind-26m --peft_dir export/med-adapter       # base + PEFT adapter pointing at it
    python -m scripts.convert_model --load_from out/full_sft_512_mla.pth --out_dir export/tinymind-mla  # DeepseekV3
    python -m scripts.convert_model --load_from export/tinymind-26m --to_pth out/full_sft_512.pth        # back

Dense checkpoints become plain Llama (or Qwen3, when q/k RMSNorm is on): our state-dict names are already theirs,
so the weights are copied as they are and `AutoModelForCausalLM.from_pretrained(dir)` loads the directory with
transformers' own classes, no trust_remote_code, with the same logits. Everything built on transformers' Llama
then works: vLLM, llama.cpp's convert_hf_to_gguf.py, Ollama, PEFT, lm-evaluation-harness.
MLA checkpoints, dense or with a sigmoid-scored MoE, become DeepseekV3 (see `deepseek_v3_blockers` for what does
not fit it). The rest (a MoE under grouped-query attention, a softmax router) has no transformers class: those
directories carry our model code (config.py, model.py, ... from model/) and an `auto_map` in config.json: load them
with `from_pretrained(dir, trust_remote_code=True)`.

The directory holds config.json, model.safetensors, generation_config.json (token ids only: plain greedy unless the
caller asks for sampling) and the tokenizer with its chat template, written so that transformers 4.x (4.57 is what
llama.cpp's converter and many vLLM / lm-eval installs pin) and 5.x read the same model. After writing, the export
is loaded back and its logits are compared with ours (and a short greedy generation): the script fails if they
differ.
"""
import argparse
import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import STAGE_KEY, BadCheckpoint, load_state_into, read_json, recorded_stage, save_weights
from model.config import TinyMindConfig
from model.device import DTYPES
from model.inference import (EXPORT_ADVICE, load_model_for_inference, load_transformers_dir, lora_file_for,
                             read_safetensors)
from model.model import TinyMindForCausalLM
from model.training.cli import exit_on_user_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL_CODE_DIR = os.path.join(ROOT, "model")
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)  # the pattern transformers follows too

# transformers 5 writes tokenizer_class "TokenizersBackend", which 4.x does not have; 5.x maps this name onto that.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
DEEPSEEK_NORM_EPS = 1e-6  # DeepseekV3's q_a_layernorm and kv_a_layernorm use this eps whatever the config says


# ================================================================================================== export


def legacy_rope_fields(rope_parameters: dict) -> dict:
    """rope_theta and rope_scaling, which transformers < 5 reads instead of rope_parameters: without them 4.x falls
    back to rope_theta 10000 and silently computes another model."""
    scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return {"rope_theta": rope_parameters["rope_theta"], "rope_scaling": scaling}


def transformers_config_for(config: TinyMindConfig):
    """The LlamaConfig (or Qwen3Config with q/k norm) describing the same network as a dense TinyMindConfig."""
    from transformers import LlamaConfig, Qwen3Config
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                  num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                  head_dim=config.head_dim, hidden_act=config.hidden_act,
                  max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
                  rope_parameters=dict(config.rope_parameters), tie_word_embeddings=config.tie_word_embeddings,
                  attention_bias=False, attention_dropout=0.0, initializer_range=config.initializer_range,
                  bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                  pad_token_id=config.pad_token_id)
    if config.use_qk_norm:
        return Qwen3Config(use_sliding_window=False, architectures=["Qwen3ForCausalLM"], **common)
    return LlamaConfig(mlp_bias=False, architectures=["LlamaForCausalLM"], **common)


def deepseek_v3_blockers(config: TinyMindConfig) -> list[str]:
    """Why transformers' DeepseekV3 would compute something else than this MoE/MLA config (empty: it computes the
    same). Its attention is MLA only, its router scores with a sigmoid, and it ranks expert groups by the sum of
    their two best biased scores, where TinyMind without the aux-free bias ranks them by the best score alone."""
    blockers = []
    if not config.use_mla:
        blockers.append("grouped-query attention (DeepseekV3 has MLA only)")
    elif config.rms_norm_eps != DEEPSEEK_NORM_EPS:
        blockers.append(f"rms_norm_eps={config.rms_norm_eps} (DeepseekV3's latent RMSNorms fix it at 1e-6)")
    if config.use_moe:
        if config.scoring_func != "sigmoid":
            blockers.append(f"scoring_func={config.scoring_func} (DeepseekV3 routes with sigmoid scores)")
        if config.n_group > 1 and (config.moe_balance != "aux_free" or config.num_experts // config.n_group < 2):
            blockers.append("group-limited routing without the aux-free bias or with one expert per group "
                            "(DeepseekV3 ranks groups by their two best biased scores)")
        if not config.n_shared_experts:
            blockers.append("no shared expert (DeepseekV3 always has one)")
    return blockers


def deepseek_v3_config_for(config: TinyMindConfig):
    """The DeepseekV3Config of an MLA TinyMindConfig (see deepseek_v3_blockers). rope_interleave: see
    rope_rows_to_interleaved."""
    from transformers import DeepseekV3Config
    moe = config.use_moe
    return DeepseekV3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, q_lora_rank=config.q_lora_rank or None,
        kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
        # dense MLA: every layer is one of the "first k dense" ones, and the MoE fields are unused
        first_k_dense_replace=config.first_k_dense_replace if moe else config.num_hidden_layers,
        n_routed_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
        n_shared_experts=config.n_shared_experts, moe_intermediate_size=config.moe_intermediate_size,
        n_group=config.n_group, topk_group=config.topk_group, norm_topk_prob=config.norm_topk_prob,
        routed_scaling_factor=config.routed_scaling_factor, num_nextn_predict_layers=0, rope_interleave=True,
        hidden_act="silu", max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_parameters=dict(config.rope_parameters),
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=False, attention_dropout=0.0,
        initializer_range=config.initializer_range, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, architectures=["DeepseekV3ForCausalLM"])


ROPE_ROWS = re.compile(r"self_attn\.(q_proj|q_b_proj|kv_a_proj_with_mqa)(\.lora_B)?\.weight$")


def rope_rows_to_interleaved(key: str, tensor: torch.Tensor, config: TinyMindConfig, inverse: bool = False):
    """MLA rotates its rope slice in Llama's half-split layout (pairs i, i + d/2); DeepSeek's checkpoints pair
    adjacent channels (2i, 2i + 1), which is transformers' rope_interleave default and what other DeepSeek loaders
    expect. Reordering the output rows that produce the rope slice of q and of the shared key makes the interleaved
    rotation compute exactly ours. Other tensors are returned as they are."""
    match = ROPE_ROWS.search(key)
    if not match:
        return tensor
    d = config.qk_rope_head_dim
    order = (2, d // 2) if not inverse else (d // 2, 2)  # rows (half, i) -> (i, half), or back

    def reorder(rows):
        return rows.unflatten(0, order).transpose(0, 1).flatten(0, 1)

    if match.group(1) == "kv_a_proj_with_mqa":  # [kv_lora_rank latent rows; d rope rows]
        latent, rope = tensor.split([config.kv_lora_rank, d])
        return torch.cat([latent, reorder(rope)])
    heads = tensor.unflatten(0, (config.num_attention_heads, config.qk_nope_head_dim + d))  # per head [nope; rope]
    nope, rope = heads.split([config.qk_nope_head_dim, d], dim=1)
    return torch.cat([nope, torch.stack([reorder(r) for r in rope])], dim=1).flatten(0, 1)


def deepseek_v3_tensors(state: dict, config: TinyMindConfig) -> dict:
    """Our state dict in DeepSeek's checkpoint names: one gate/up/down_proj per expert (what 4.x builds, and what
    5.x fuses on load), the rope rows interleaved, the router bias zero unless the aux-free rule uses it."""
    out = {}
    for key, value in state.items():
        if key.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, d]: gate rows, then up rows
            prefix = key[:-len("gate_up_proj")]
            for e, (gate, up) in enumerate(zip(*value.chunk(2, dim=1))):
                out[f"{prefix}{e}.gate_proj.weight"], out[f"{prefix}{e}.up_proj.weight"] = gate, up
        elif key.endswith("mlp.experts.down_proj"):  # [E, d, I]
            prefix = key[:-len("down_proj")]
            out.update({f"{prefix}{e}.down_proj.weight": down for e, down in enumerate(value)})
        elif key.endswith("e_score_correction_bias") and config.moe_balance != "aux_free":
            out[key] = torch.zeros_like(value)  # TinyMind ignores the bias then; DeepseekV3 always adds it
        elif key.endswith("e_score_correction_bias") and config.n_group > 1:
            # transformers 4.x fills the dropped groups with 0 rather than -inf, so a kept expert whose biased score
            # is negative would lose to them. One shift of every bias changes no choice (groups and experts are
            # ranked by sums of equally many biased scores) and makes every biased score positive (sigmoid's are).
            out[key] = value - value.min().clamp(max=0)
        else:
            out[key] = rope_rows_to_interleaved(key, value, config)
    return {k: v.contiguous() for k, v in out.items()}


def tinymind_tensors_from_deepseek_v3(state: dict, config: TinyMindConfig, interleaved: bool) -> dict:
    """The inverse of deepseek_v3_tensors: experts stacked again, rope rows back in the half-split layout."""
    experts = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    out, stacks = {}, {}
    for key, value in state.items():
        match = experts.match(key)
        if match:
            stacks.setdefault(match.group(1), {})[(int(match.group(2)), match.group(3))] = value
        else:
            out[key] = rope_rows_to_interleaved(key, value, config, inverse=True) if interleaved else value
    for prefix, parts in stacks.items():
        count = 1 + max(e for e, _ in parts)
        try:
            out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[e, "gate_proj"], parts[e, "up_proj"]])
                                                         for e in range(count)])
            out[f"{prefix}.down_proj"] = torch.stack([parts[e, "down_proj"] for e in range(count)])
        except KeyError as missing:
            raise BadCheckpoint(f"expert weight {prefix}.{missing.args[0][0]}.{missing.args[0][1]} is missing: "
                                f"{EXPORT_ADVICE}") from None
    return out


def tensors_to_save(model, dtype: torch.dtype) -> dict:
    """The state dict with the weights cast and the buffers kept fp32 (the MoE routing bias is made of updates far
    smaller than bf16's resolution), and a tied LM head left out: it is the embedding matrix itself, safetensors
    refuses to store one tensor under two names, and `tie_word_embeddings` makes every loader re-tie it."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("expert_load")}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    weights = dict(model.named_parameters())
    return {k: (v.to(dtype) if k in weights and v.is_floating_point() else v).contiguous() for k, v in state.items()}


def model_code_files(entry_points=("model.py", "config.py")) -> list[str]:
    """model/*.py files reachable from the entry points through relative imports (what trust_remote_code loads)."""
    todo, found = list(entry_points), []
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = os.path.join(MODEL_CODE_DIR, name)
        if not os.path.exists(path):
            raise SystemExit(f"model code file {path} is imported by the model but missing")
        found.append(name)
        with open(path, encoding="utf-8") as f:
            todo += [f"{module}.py" for module in RELATIVE_IMPORT.findall(f.read())]
    return sorted(found)


def update_json(path: str, update) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    update(data)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def write_config(hf_config, out_dir: str, dtype_name: str, stage: str | None = None) -> None:
    """config.json readable by transformers 4.x and 5.x: both RoPE spellings, and `torch_dtype` beside `dtype`
    (4.x before 4.56, and vLLM's "auto" dtype on them, read only the former). `stage`: the checkpoint's recorded
    stage, kept so that serving the export picks chat or continuation mode as for the checkpoint."""
    hf_config.dtype = dtype_name
    hf_config.save_pretrained(out_dir)

    def add_legacy_fields(data):
        if "rope_parameters" in data:
            data.update(legacy_rope_fields(data["rope_parameters"]))
        data["torch_dtype"] = dtype_name
        data.pop(STAGE_KEY, None)
        if stage:
            data[STAGE_KEY] = stage
    update_json(os.path.join(out_dir, "config.json"), add_legacy_fields)


def write_tokenizer(tokenizer, out_dir: str) -> None:
    """The tokenizer as transformers 5 saves it, with a class name 4.x knows too, the chat template also inside
    tokenizer_config.json (where tools that predate chat_template.jinja look), and without the loading arguments
    5.x records there."""
    tokenizer.save_pretrained(out_dir)
    template_file = os.path.join(out_dir, "chat_template.jinja")

    def make_portable(data):
        data["tokenizer_class"] = TOKENIZER_CLASS
        for key in ("is_local", "local_files_only"):
            data.pop(key, None)
        if "chat_template" not in data and os.path.exists(template_file):
            with open(template_file, encoding="utf-8") as f:
                data["chat_template"] = f.read()
    update_json(os.path.join(out_dir, "tokenizer_config.json"), make_portable)


def neutral_generation_config(tokenizer, config: TinyMindConfig):
    """Token ids only, so `generate(do_sample=False)`, `pipeline` and every runtime that reads the file decode
    plainly; TinyMind's chat sampling (temperature, top_p, repetition penalty) belongs to the chat tools."""
    from transformers import GenerationConfig

    def token_id(name):
        value = getattr(tokenizer, name, None)
        return getattr(config, name) if value is None else value
    return GenerationConfig(bos_token_id=token_id("bos_token_id"), eos_token_id=[token_id("eos_token_id")],
                            pad_token_id=token_id("pad_token_id"))


def pick_arch(config: TinyMindConfig, arch: str) -> str:
    """auto: llama (Llama/Qwen3) when dense, deepseek_v3 when it computes the same, else tinymind (our code)."""
    custom = config.use_moe or config.use_mla
    if arch == "auto":
        if not custom:
            return "llama"
        return "tinymind" if deepseek_v3_blockers(config) else "deepseek_v3"
    if arch == "llama" and custom:
        raise SystemExit("MoE/MLA checkpoints have no Llama/Qwen3 form: use --arch auto, deepseek_v3 or tinymind")
    if arch == "deepseek_v3":
        blockers = deepseek_v3_blockers(config) or ([] if custom else ["no MLA (a dense model exports as llama)"])
        if blockers:
            raise SystemExit(f"DeepseekV3 would compute another model: {'; '.join(blockers)}. Use --arch auto "
                             "(tinymind: our code, trust_remote_code)")
    return arch


def export(model: TinyMindForCausalLM, tokenizer, out_dir: str, dtype: torch.dtype = torch.float32,
           arch: str = "auto") -> str:
    """Write the transformers directory. arch: auto, llama, deepseek_v3, tinymind (see pick_arch).
    Returns the architecture written."""
    config = model.config
    arch = pick_arch(config, arch)
    os.makedirs(out_dir, exist_ok=True)
    tensors = tensors_to_save(model, dtype)
    if arch == "llama":
        hf_config = transformers_config_for(config)
    elif arch == "deepseek_v3":
        hf_config = deepseek_v3_config_for(config)
        tensors = deepseek_v3_tensors(tensors, config)
    else:
        hf_config = TinyMindConfig.from_dict({k: v for k, v in config.to_dict().items()
                                              if k not in ("architectures", "auto_map", "transformers_version",
                                                           "tokenizer_path", "tokenizer_digest")})  # it has its own
        hf_config.architectures = ["TinyMindForCausalLM"]
        hf_config.auto_map = {"AutoConfig": "config.TinyMindConfig",
                              "AutoModelForCausalLM": "model.TinyMindForCausalLM"}
        for name in model_code_files():
            shutil.copyfile(os.path.join(MODEL_CODE_DIR, name), os.path.join(out_dir, name))
    write_config(hf_config, out_dir, str(dtype).replace("torch.", ""), recorded_stage(config))
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    neutral_generation_config(tokenizer, config).save_pretrained(out_dir)
    write_tokenizer(tokenizer, out_dir)
    return arch


def export_peft_adapter(adapted: TinyMindForCausalLM, peft_dir: str, base_dir: str, arch: str,
                        base_name: str | None = None) -> str:
    """Write the LoRA adapter of `adapted` in PEFT's format for the base exported to `base_dir` (the same model
    without the adapter). adapter_config.json names that directory (absolute, as PEFT resolves it from the working
    directory), or `base_name` (a hub id, when publishing both), so AutoPeftModelForCausalLM finds the base by
    itself. (llama.cpp's convert_lora_to_gguf.py looks the name up as a hub id only: give it --base DIR.)
    Returns the base name written."""
    from model.lora import export_peft
    base_name = base_name or os.path.abspath(base_dir)
    export_peft(adapted, peft_dir, base_model_name_or_path=base_name)
    if arch == "deepseek_v3":  # the base's rope rows were reordered: the adapter's output rows must follow
        path = os.path.join(peft_dir, "adapter_model.safetensors")
        tensors = {k: rope_rows_to_interleaved(k, v, adapted.config).contiguous() for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
    return base_name


@torch.no_grad()
def compare_with_export(model: TinyMindForCausalLM, out_dir: str, trust_remote_code: bool, steps: int = 8) -> dict:
    """Load the export with transformers and compare logits (a padded batch) and greedy generations with ours."""
    from transformers import AutoModelForCausalLM
    if trust_remote_code:
        # With `model` imported, transformers would prefer our registered classes over the directory's code;
        # load the directory's own copy explicitly, since that is what other machines will run.
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        with open(os.path.join(out_dir, "config.json")) as f:
            class_ref = json.load(f)["auto_map"]["AutoModelForCausalLM"]
        exported = get_class_from_dynamic_module(class_ref, out_dir).from_pretrained(out_dir, dtype=torch.float32)
    else:
        exported = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    exported.eval()
    return compare_models(model, exported, steps)


@torch.no_grad()
def compare_models(model: TinyMindForCausalLM, exported, steps: int = 8) -> dict:
    model = model.float().eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding, as batched generation uses
    ours, theirs = model(ids, attention_mask=mask).logits, exported(ids, attention_mask=mask).logits
    max_diff = (ours - theirs)[mask.bool()].abs().max().item()
    # The export's own generation_config.json decides how it decodes: it must be plain greedy.
    same_generation = torch.equal(
        model.generate(ids[:1], do_sample=False, max_new_tokens=steps, eos_token_id=None, pad_token_id=0),
        exported.generate(ids[:1], max_new_tokens=steps, eos_token_id=None))
    return {"class": type(exported).__name__, "max_logit_diff": max_diff, "same_greedy_generation": same_generation}


def compare_with_peft(merged: TinyMindForCausalLM, peft_dir: str, trust_remote_code: bool) -> dict:
    """Load the adapter the way its users will, base found through adapter_config.json, and compare with ours."""
    from peft import AutoPeftModelForCausalLM
    exported = AutoPeftModelForCausalLM.from_pretrained(peft_dir, dtype=torch.float32,
                                                        trust_remote_code=trust_remote_code).eval()
    return compare_models(merged, exported)


# ================================================================================================== import


def tinymind_config_from_transformers(hf_config) -> TinyMindConfig:
    """The TinyMindConfig of a Llama/Qwen3 config, refusing the features TinyMind does not have."""
    unsupported = [name for name in ("attention_bias", "mlp_bias") if getattr(hf_config, name, False)]
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf_config.hidden_act}")
    if getattr(hf_config, "use_sliding_window", False):
        unsupported.append("use_sliding_window")
    if unsupported:
        raise SystemExit(f"this {hf_config.model_type} model uses {', '.join(unsupported)}, which TinyMind lacks")
    eos = hf_config.eos_token_id
    return TinyMindConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size, num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads, num_key_value_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None), max_position_embeddings=hf_config.max_position_embeddings,
        rms_norm_eps=hf_config.rms_norm_eps, rope_parameters=dict(hf_config.rope_parameters),
        use_qk_norm=hf_config.model_type == "qwen3", tie_word_embeddings=hf_config.tie_word_embeddings,
        bos_token_id=hf_config.bos_token_id if hf_config.bos_token_id is not None else 1,
        eos_token_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0)


def tinymind_config_from_deepseek_v3(hf_config) -> TinyMindConfig:
    """The TinyMindConfig of a DeepseekV3 config (MLA, dense layers then sigmoid-routed MoE ones), refusing what
    TinyMind computes differently. The routing bias is kept in use: moe_balance aux_free."""
    unsupported = [f"{name}={getattr(hf_config, name, None)}" for name, fits in (
        ("attention_bias", not hf_config.attention_bias), ("hidden_act", hf_config.hidden_act == "silu"),
        ("rms_norm_eps", hf_config.rms_norm_eps == DEEPSEEK_NORM_EPS), ("n_shared_experts", hf_config.n_shared_experts),
        ("num_nextn_predict_layers", not getattr(hf_config, "num_nextn_predict_layers", 0))) if not fits]
    if unsupported:
        raise SystemExit(f"this deepseek_v3 model uses {', '.join(unsupported)}, which TinyMind lacks")
    moe = hf_config.first_k_dense_replace < hf_config.num_hidden_layers
    eos = hf_config.eos_token_id
    return TinyMindConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size, num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads, max_position_embeddings=hf_config.max_position_embeddings,
        rms_norm_eps=hf_config.rms_norm_eps, rope_parameters=dict(hf_config.rope_parameters),
        tie_word_embeddings=hf_config.tie_word_embeddings, use_mla=True, q_lora_rank=hf_config.q_lora_rank or 0,
        kv_lora_rank=hf_config.kv_lora_rank, qk_nope_head_dim=hf_config.qk_nope_head_dim,
        qk_rope_head_dim=hf_config.qk_rope_head_dim, v_head_dim=hf_config.v_head_dim, use_moe=moe,
        num_experts=hf_config.n_routed_experts, num_experts_per_tok=hf_config.num_experts_per_tok,
        n_shared_experts=hf_config.n_shared_experts, moe_intermediate_size=hf_config.moe_intermediate_size,
        scoring_func="sigmoid", norm_topk_prob=hf_config.norm_topk_prob, moe_balance="aux_free",
        routed_scaling_factor=hf_config.routed_scaling_factor,
        first_k_dense_replace=hf_config.first_k_dense_replace if moe else 0, n_group=hf_config.n_group or 1,
        topk_group=hf_config.topk_group or 1,
        bos_token_id=hf_config.bos_token_id if hf_config.bos_token_id is not None else 1,
        eos_token_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0)


def import_directory(directory: str, out_path: str) -> TinyMindForCausalLM:
    """A Llama/Qwen3/DeepseekV3/TinyMind transformers directory -> <out_path>.pth + its config JSON (fp32)."""
    from transformers import AutoConfig
    config_file = os.path.join(directory, "config.json")
    raw = read_json(config_file, EXPORT_ADVICE)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type == "tinymind":
        model = load_transformers_dir(directory)
    elif model_type in ("llama", "qwen3", "deepseek_v3"):
        try:
            hf_config = AutoConfig.from_pretrained(directory)
            config = (tinymind_config_from_deepseek_v3 if model_type == "deepseek_v3"
                      else tinymind_config_from_transformers)(hf_config)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise BadCheckpoint(f"{config_file} is not a usable {model_type} config ({type(error).__name__}: "
                                f"{error}): {EXPORT_ADVICE}") from None
        state = {k: v.float() if v.is_floating_point() else v for k, v in read_safetensors(directory).items()
                 if not k.endswith("rotary_emb.inv_freq")}  # older exports saved this buffer
        if model_type == "deepseek_v3":
            state = tinymind_tensors_from_deepseek_v3(state, config, interleaved=hf_config.rope_interleave)
        if config.tie_word_embeddings and "model.embed_tokens.weight" in state:  # left out of the file, re-tied on
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])  # load (else: named as missing)
        model = TinyMindForCausalLM(config)
        load_state_into(model, state, directory)
    else:
        raise SystemExit(f"{directory}: model_type {model_type!r} cannot be imported "
                         "(llama, qwen3, deepseek_v3 or tinymind)")
    save_weights(model, out_path, stage=raw.get(STAGE_KEY))  # a round trip keeps the stage
    return model


# ====================================================================================================== CLI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load_from", required=True,
                        help="export: a .pth checkpoint (config JSON beside it) or a stage name in --save_dir; "
                             "import (--to_pth): a transformers directory")
    parser.add_argument("--out_dir", default=None, help="export: the transformers directory to write")
    parser.add_argument("--to_pth", default=None,
                        help="import instead: write the --load_from directory to this .pth (+ config JSON)")
    parser.add_argument("--save_dir", default="out", help="where stage names and --lora_name are looked up")
    parser.add_argument("--lora_name", default=None,
                        help="a LoRA adapter: merged into the exported weights, or with --peft_dir written apart")
    parser.add_argument("--peft_dir", default=None,
                        help="with --lora_name: write the adapter here in PEFT's format and the base model, without "
                             "it, to --out_dir; adapter_config.json names --out_dir as its base")
    parser.add_argument("--peft_base", default=None,
                        help="the base_model_name_or_path written for --peft_dir (default: --out_dir's absolute "
                             "path; give the hub id when you publish the two)")
    parser.add_argument("--tokenizer_path", default=None,
                        help="tokenizer directory copied into the export (default: the repository's model/)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the exported weights (float32 is exact; bfloat16 halves the size)")
    parser.add_argument("--arch", default="auto", choices=["auto", "llama", "deepseek_v3", "tinymind"],
                        help="auto: Llama/Qwen3 for dense models, DeepseekV3 for MLA ones it can express, else our "
                             "own code (trust_remote_code)")
    parser.add_argument("--verify", type=int, default=1, choices=[0, 1],
                        help="1: load the export back and compare its logits and greedy output with ours")
    args = parser.parse_args(argv)
    if (args.out_dir is None) == (args.to_pth is None):
        parser.error("give exactly one of --out_dir (export) or --to_pth (import)")
    if (args.peft_dir or args.peft_base) and not (args.lora_name and args.out_dir):
        parser.error("--peft_dir/--peft_base export a --lora_name adapter beside the --out_dir base")
    if args.peft_base and not args.peft_dir:
        parser.error("--peft_base names the base in --peft_dir's adapter_config.json: give --peft_dir too")
    return args


def check(report: dict, dtype: str, what: str) -> None:
    tolerance = 1e-4 if dtype == "float32" else 0.5
    print(f"check: {what} {report['class']} logits differ by at most {report['max_logit_diff']:.2e}, greedy "
          f"generation {'identical' if report['same_greedy_generation'] else 'DIFFERENT'}")
    if report["max_logit_diff"] > tolerance or (dtype == "float32" and not report["same_greedy_generation"]):
        raise SystemExit(f"the {what} does not reproduce the checkpoint (tolerance {tolerance}); please report")


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.to_pth:
        if not os.path.isdir(args.load_from):
            raise SystemExit(f"--to_pth imports a transformers directory; {args.load_from} is not a directory")
        model = import_directory(args.load_from, args.to_pth)
        print(f"{args.load_from} -> {args.to_pth} (+ {os.path.basename(args.to_pth)[:-4]}.json); "
              f"{model.num_params() / 1e6:.2f}M parameters")
        return
    # With --peft_dir the base is exported as it is and the adapter goes apart; otherwise it is merged in.
    loaded = load_model_for_inference(load_from=args.load_from, weight=None, save_dir=args.save_dir,
                                      lora_name=None if args.peft_dir else args.lora_name,
                                      tokenizer_path=args.tokenizer_path, device="cpu", dtype="float32")
    if not isinstance(loaded.model, TinyMindForCausalLM):
        raise SystemExit(f"{args.load_from} is already a transformers directory; use --to_pth to import it")
    model = loaded.model
    arch = export(model, loaded.tokenizer, args.out_dir, DTYPES[args.dtype], args.arch)
    kind = {"llama": "Llama/Qwen3, native transformers", "deepseek_v3": "DeepseekV3, native transformers",
            "tinymind": "TinyMind code, load with trust_remote_code=True"}[arch]
    print(f"wrote {args.out_dir}/ ({kind}, {args.dtype})")
    if args.verify:
        check(compare_with_export(model, args.out_dir, trust_remote_code=arch == "tinymind"), args.dtype, "export")
    if args.peft_dir:
        from model.lora import load_lora, remove_lora
        load_lora(model, lora_file_for(args.lora_name, args.save_dir, model.config))
        base = export_peft_adapter(model, args.peft_dir, args.out_dir, arch, args.peft_base)
        print(f"wrote {args.peft_dir}/ (PEFT LoRA adapter; base_model_name_or_path {base})")
        if args.verify and not args.peft_base:  # a hub id may not be reachable from here
            merged = remove_lora(model, merge=True)
            check(compare_with_peft(merged, args.peft_dir, arch == "tinymind"), args.dtype, "PEFT adapter")


if __name__ == "__main__":
    main()
