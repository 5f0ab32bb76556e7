"""Export a TinyMind checkpoint to a transformers directory, or import such a directory back to a .pth.

    python -m scripts.convert_model --load_from out/full_sft_512.pth --out_dir export/tinymind-26m
    python -m scripts.convert_model --load_from out/full_sft_512.pth --lora_name lora_medical --out_dir export/med
    python -m scripts.convert_model --load_from out/full_sft_640_moe.pth --out_dir export/tinymind-moe  # own code
    python -m scripts.convert_model --load_from export/tinymind-26m --to_pth out/full_sft_512.pth        # back

Dense checkpoints become plain Llama (or Qwen3, when q/k RMSNorm is on): our state-dict names are already theirs,
so the weights are copied as they are and `AutoModelForCausalLM.from_pretrained(dir)` loads the directory with
transformers' own classes, no trust_remote_code, with the same logits. Everything built on transformers' Llama
then works: vLLM, llama.cpp's convert_hf_to_gguf.py, Ollama, PEFT, lm-evaluation-harness.
MoE and MLA have no transformers class, so those directories carry our model code (config.py, model.py, ... from
model/) and an `auto_map` in config.json: load them with `from_pretrained(dir, trust_remote_code=True)`.

The directory holds config.json, model.safetensors, generation_config.json (TinyMind's chat sampling defaults) and
the tokenizer with its chat template. After writing, the export is loaded back and its logits are compared with
ours (and a short greedy generation): the script fails if they differ.
"""
import argparse
import json
import os
import re
import shutil

import torch
from safetensors.torch import save_file

from model.checkpoint import BadCheckpoint, load_state_into, read_json, save_weights
from model.config import TinyMindConfig
from model.device import DTYPES
from model.inference import (EXPORT_ADVICE, default_generation_config, load_model_for_inference,
                             load_transformers_dir, read_safetensors)
from model.model import TinyMindForCausalLM
from model.training.cli import exit_on_user_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODEL_CODE_DIR = os.path.join(ROOT, "model")
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)  # the pattern transformers follows too


# ================================================================================================== export


def transformers_config_for(config: TinyMindConfig):
    """The LlamaConfig (or Qwen3Config with q/k norm) describing the same network as a dense TinyMindConfig."""
    from transformers import LlamaConfig, Qwen3Config
    eos = config.eos_token_id
    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                  num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                  head_dim=config.head_dim, hidden_act=config.hidden_act,
                  max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
                  rope_parameters=dict(config.rope_parameters), tie_word_embeddings=config.tie_word_embeddings,
                  attention_bias=False, attention_dropout=0.0, initializer_range=config.initializer_range,
                  bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=config.pad_token_id)
    if config.use_qk_norm:
        return Qwen3Config(use_sliding_window=False, architectures=["Qwen3ForCausalLM"], **common)
    return LlamaConfig(mlp_bias=False, architectures=["LlamaForCausalLM"], **common)


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


def export(model: TinyMindForCausalLM, tokenizer, out_dir: str, dtype: torch.dtype = torch.float32,
           arch: str = "auto") -> str:
    """Write the transformers directory. arch: auto (llama/qwen3 when dense, else tinymind), llama, tinymind.
    Returns the architecture written."""
    config = model.config
    custom = config.use_moe or config.use_mla
    if arch == "auto":
        arch = "tinymind" if custom else "llama"
    if arch == "llama" and custom:
        raise SystemExit("MoE/MLA checkpoints have no transformers-native class: use --arch tinymind (the default)")
    os.makedirs(out_dir, exist_ok=True)
    dtype_name = str(dtype).replace("torch.", "")
    if arch == "llama":
        hf_config = transformers_config_for(config)
    else:
        hf_config = TinyMindConfig.from_dict({k: v for k, v in config.to_dict().items()
                                              if k not in ("architectures", "auto_map", "transformers_version",
                                                           "tokenizer_path", "tokenizer_digest")})  # it has its own
        hf_config.architectures = ["TinyMindForCausalLM"]
        hf_config.auto_map = {"AutoConfig": "config.TinyMindConfig",
                              "AutoModelForCausalLM": "model.TinyMindForCausalLM"}
        for name in model_code_files():
            shutil.copyfile(os.path.join(MODEL_CODE_DIR, name), os.path.join(out_dir, name))
    hf_config.dtype = dtype_name
    hf_config.save_pretrained(out_dir)
    save_file(tensors_to_save(model, dtype), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    default_generation_config(tokenizer).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return arch


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
    model = model.float().eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding, as batched generation uses
    ours, theirs = model(ids, attention_mask=mask).logits, exported(ids, attention_mask=mask).logits
    max_diff = (ours - theirs)[mask.bool()].abs().max().item()
    # Explicit greedy settings: the export's generation_config.json would otherwise make generate() sample.
    greedy = dict(do_sample=False, max_new_tokens=steps, pad_token_id=0, eos_token_id=None, repetition_penalty=1.0,
                  temperature=None, top_p=None, top_k=None)
    same_generation = torch.equal(model.generate(ids[:1], **greedy), exported.generate(ids[:1], **greedy))
    return {"class": type(exported).__name__, "max_logit_diff": max_diff, "same_greedy_generation": same_generation}


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


def import_directory(directory: str, out_path: str) -> TinyMindForCausalLM:
    """A Llama/Qwen3/TinyMind transformers directory -> <out_path>.pth + its config JSON (fp32)."""
    from transformers import AutoConfig
    config_file = os.path.join(directory, "config.json")
    raw = read_json(config_file, EXPORT_ADVICE)
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type == "tinymind":
        model = load_transformers_dir(directory)
    elif model_type in ("llama", "qwen3"):
        try:
            config = tinymind_config_from_transformers(AutoConfig.from_pretrained(directory))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise BadCheckpoint(f"{config_file} is not a usable {model_type} config ({type(error).__name__}: "
                                f"{error}): {EXPORT_ADVICE}") from None
        state = {k: v.float() if v.is_floating_point() else v for k, v in read_safetensors(directory).items()
                 if not k.endswith("rotary_emb.inv_freq")}  # older exports saved this buffer
        if config.tie_word_embeddings and "model.embed_tokens.weight" in state:  # left out of the file, re-tied on
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])  # load (else: named as missing)
        model = TinyMindForCausalLM(config)
        load_state_into(model, state, directory)
    else:
        raise SystemExit(f"{directory}: model_type {model_type!r} cannot be imported (llama, qwen3 or tinymind)")
    save_weights(model, out_path)
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
    parser.add_argument("--lora_name", default=None, help="merge this LoRA adapter into the weights before export")
    parser.add_argument("--tokenizer_path", default=None,
                        help="tokenizer directory copied into the export (default: the repository's model/)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the exported weights (float32 is exact; bfloat16 halves the size)")
    parser.add_argument("--arch", default="auto", choices=["auto", "llama", "tinymind"],
                        help="auto: Llama/Qwen3 for dense models, our own code (trust_remote_code) for MoE/MLA")
    parser.add_argument("--verify", type=int, default=1, choices=[0, 1],
                        help="1: load the export back and compare its logits and greedy output with ours")
    args = parser.parse_args(argv)
    if (args.out_dir is None) == (args.to_pth is None):
        parser.error("give exactly one of --out_dir (export) or --to_pth (import)")
    return args


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
    loaded = load_model_for_inference(load_from=args.load_from, weight=None, save_dir=args.save_dir,
                                      lora_name=args.lora_name, tokenizer_path=args.tokenizer_path,
                                      device="cpu", dtype="float32")
    if not isinstance(loaded.model, TinyMindForCausalLM):
        raise SystemExit(f"{args.load_from} is already a transformers directory; use --to_pth to import it")
    arch = export(loaded.model, loaded.tokenizer, args.out_dir, DTYPES[args.dtype], args.arch)
    kind = "Llama/Qwen3, native transformers" if arch == "llama" else "TinyMind code, load with trust_remote_code=True"
    print(f"wrote {args.out_dir}/ ({kind}, {args.dtype})")
    if args.verify:
        report = compare_with_export(loaded.model, args.out_dir, trust_remote_code=arch == "tinymind")
        tolerance = 1e-4 if args.dtype == "float32" else 0.5
        print(f"check: {report['class']} logits differ by at most {report['max_logit_diff']:.2e}, greedy generation "
              f"{'identical' if report['same_greedy_generation'] else 'DIFFERENT'}")
        if report["max_logit_diff"] > tolerance or (args.dtype == "float32" and not report["same_greedy_generation"]):
            raise SystemExit(f"the export does not reproduce the checkpoint (tolerance {tolerance}); please report")


if __name__ == "__main__":
    main()
