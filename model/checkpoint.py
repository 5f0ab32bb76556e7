"""Weight files: how a stage's checkpoint is named and found, written atomically, loaded strictly, and which
tokenizer it was trained with. Training writes them; chat, serving, export and the next stage read them, so this
module knows nothing about training.

A checkpoint is `<save_dir>/<stage>_<hidden>[_moe][_mla].pth` (a plain fp32 state dict, as MiniMind's) with its
TinyMindConfig as JSON beside it.

A file that cannot be used (truncated by a kill, zero bytes from a full disk, not a checkpoint at all, a config JSON
that is not one) raises BadCheckpoint, whose message names the file and says what is wrong: the stages turn it into
one `error: ...` line. Saves go through a temp file that is removed on any failure; the temps of killed saves are
swept (sweep_stale_temp_files)."""
import copy
import glob
import hashlib
import json
import os
import re
import warnings

import torch

from .config import TinyMindConfig
from .data.jsonl import BadInput
from .files import TEMP_SUFFIX, atomic_torch_save, atomic_write_text, remove_stale_temps


class BadCheckpoint(BadInput):
    """A weight, resume, adapter or config file that cannot be used; the message names the file and what is wrong."""


def tokenizer_digest(tokenizer_path: str) -> str | None:
    path = os.path.join(tokenizer_path, "tokenizer.json")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:16]


def check_same_tokenizer(config: TinyMindConfig | None, tokenizer_path: str | None, source: str):
    """Refuse weights trained with another tokenizer than `tokenizer_path`: both may have 6,400 tokens, but the
    ids would mean other things, and nothing else would notice. Weights saved before this record pass."""
    trained_with = getattr(config, "tokenizer_digest", None) if config is not None else None
    digest = tokenizer_digest(tokenizer_path) if tokenizer_path else None
    if trained_with and digest and trained_with != digest:
        raise SystemExit(f"{source} was trained with the tokenizer in {config.tokenizer_path}/, not the one in "
                         f"{tokenizer_path}/ (pass --tokenizer_path {config.tokenizer_path})")


def record_tokenizer(config: TinyMindConfig, tokenizer_path: str | None, base: TinyMindConfig | None, source: str):
    """Write which tokenizer the weights are trained with into their config (chat, serving and export then default
    to it), after checking that the weights they start from were trained with the same one."""
    if not tokenizer_path:
        return
    check_same_tokenizer(base, tokenizer_path, source)
    config.tokenizer_path, config.tokenizer_digest = tokenizer_path, tokenizer_digest(tokenizer_path)


SHIPPED_TOKENIZER = os.path.dirname(os.path.abspath(__file__))  # model/


def trained_tokenizer_path(config: TinyMindConfig) -> str:
    """The tokenizer directory the weights were trained with, as record_tokenizer wrote it, else the shipped one
    (weights saved before the record, or a recorded directory that is not there from here)."""
    recorded = getattr(config, "tokenizer_path", None)
    return recorded if recorded and os.path.isdir(recorded) else SHIPPED_TOKENIZER


def weight_path(save_dir: str, name: str, config: TinyMindConfig) -> str:
    """MiniMind's naming: <save_dir>/<stage>_<hidden>[_moe].pth (plus _mla for latent attention)."""
    suffix = ("_moe" if config.use_moe else "") + ("_mla" if config.use_mla else "")
    return os.path.join(save_dir, f"{name}_{config.hidden_size}{suffix}.pth")


def resolve_weight(name_or_path: str, save_dir: str, hidden_size: int | None = None,
                   flag: str = "--from_weight") -> str:
    """A .pth path as given, or a stage name looked up in save_dir (out/pretrain_512.pth ...). When the hidden size
    is not given and exactly one file of that stage exists, use it, so `--from_weight pretrain` just works. `flag`:
    the caller's own flag for a path, named in the error a user follows."""
    if name_or_path.endswith(".pth") or os.sep in name_or_path:
        if not os.path.exists(name_or_path):
            raise SystemExit(f"weights not found: {name_or_path}")
        return name_or_path
    pattern = f"{name_or_path}_{hidden_size}*.pth" if hidden_size else f"{name_or_path}_*.pth"
    found = sorted(p for p in glob.glob(os.path.join(save_dir, pattern))
                   if not p.endswith("_resume.pth") and "_resume" not in os.path.basename(p))
    exact = [p for p in found if os.path.basename(p)[len(name_or_path) + 1:].split("_")[0].split(".")[0].isdigit()]
    if len(exact) == 1:
        return exact[0]
    if not exact:
        raise SystemExit(f"no '{name_or_path}' weights in {save_dir}/ (looked for {pattern}); run the stage that "
                         f"produces them first, or pass {flag} PATH.pth")
    raise SystemExit(f"several '{name_or_path}' weights in {save_dir}/: {', '.join(exact)}; "
                     "pass --hidden_size (and --use_moe/--use_mla) or a path to choose")


def config_path_for(weight_file: str) -> str:
    return weight_file[:-len(".pth")] + ".json"


SWEPT_KINDS = (".pth", ".pt", ".json")  # what training writes into a save directory: weights, adapters, configs


def sweep_stale_temp_files(save_dir: str) -> list[str]:
    """Remove the temp files that killed saves (kill -9, out of memory, preemption) left in save_dir and its
    subdirectories one level down (lora/, summaries/): each is as big as a checkpoint, and they would pile up
    run after run. A run calls this at its start, on one rank; a save that is running is never touched.
    Returns the removed paths."""
    candidates = glob.glob(os.path.join(glob.escape(save_dir), "*.tmp*")) + \
        glob.glob(os.path.join(glob.escape(save_dir), "*", "*.tmp*"))
    return remove_stale_temps(sorted(p for p in candidates if TEMP_SUFFIX.search(p)
                                     and TEMP_SUFFIX.split(os.path.basename(p))[0].endswith(SWEPT_KINDS)))


def unwrap(model):
    """The plain TinyMind module under DDP / torch.compile / DeepSpeed wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# Config field naming the stage that trained the weights ("pretrain", "full_sft", ...): chat and serving choose
# chat or plain-continuation mode from it, since a file name can be changed and then says nothing.
STAGE_KEY = "tinymind_stage"


def recorded_stage(config) -> str | None:
    """The stage save_weights recorded in `config` (ours or an exported transformers one), None if unrecorded."""
    stage = getattr(config, STAGE_KEY, None) if config is not None else None
    return stage if isinstance(stage, str) and stage else None


def save_weights(model, path: str, stage: str | None = None):
    """fp32 state dict (MiniMind-style plain .pth) with the model config as JSON beside it. `stage`: the stage
    that produced these weights, recorded as STAGE_KEY in the JSON. Without it the JSON records none, even when
    the config came from weights that had one: a config is inherited from the stage before (SFT starts from
    pretrain's), and passing that stage on would mislabel the new weights."""
    model = unwrap(model)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
             for k, v in model.state_dict().items() if not k.endswith("expert_load")}
    config = copy.copy(model.config)  # the model in memory keeps its config as it was
    if stage:
        setattr(config, STAGE_KEY, stage)
    elif hasattr(config, STAGE_KEY):
        delattr(config, STAGE_KEY)
    atomic_torch_save(state, path)
    atomic_write_text(config.to_json_string(), config_path_for(path))


def read_torch_file(path: str, advice: str = "delete it or retrain"):
    """torch.load(weights_only=True) with an error that names the file and says what is wrong with it. torch's own
    errors do not name the file, and for an object it refuses they suggest weights_only=False: never do that, it
    runs whatever code the file holds. `advice`: what the user can do about a damaged file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    if os.path.isdir(path):
        raise BadCheckpoint(f"{path} is a directory, not a PyTorch checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise BadCheckpoint(f"{path} is empty (0 bytes: a save killed early, or a full disk): {advice}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # random bytes trip it: noise
            return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as error:
        raise BadCheckpoint(f"{path} cannot be read ({error.strerror})") from None
    except Exception as error:  # whatever torch trips over (zip, pickle, EOF, OSError), the file is unusable
        refused = re.search(r"GLOBAL (\S+)", str(error))
        if refused:
            raise BadCheckpoint(f"{path} holds a Python object that is not a tensor ({refused.group(1)}): refused "
                                "unread, since loading it could run code. TinyMind never writes such files; use "
                                "weights from a source you trust") from None
        raise BadCheckpoint(f"{path} is not a complete PyTorch checkpoint (truncated or corrupt; {size:,} bytes): "
                            f"{advice}") from None


def check_state_dict(state, path: str):
    """A weight file must hold {name: tensor}; anything else is refused before it meets a model."""
    if isinstance(state, dict) and {"lora", "config"} <= set(state):
        raise BadCheckpoint(f"{path} is a LoRA adapter, not model weights: pass it as --lora_name, with the weights "
                            "it was trained on as the model")
    if not isinstance(state, dict) or not state or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        kind = f"a {type(state).__name__}" if not isinstance(state, dict) else \
            "an empty dict" if not state else "a dict that is not name -> tensor"
        raise BadCheckpoint(f"{path} is a PyTorch file but not model weights ({kind})")


def read_json(path: str, advice: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        reason = "empty" if os.path.getsize(path) == 0 else f"{type(error).__name__}: {error}"
        raise BadCheckpoint(f"{path} is not valid JSON ({reason}): {advice}") from None


# Sizes a config must hold as positive integers (None: derived from the others); anything else builds no model.
CONFIG_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "head_dim")
CONFIG_ADVICE = "put back the config JSON the training run wrote beside the weights, or retrain"


def config_from_dict(raw, path: str, advice: str = CONFIG_ADVICE) -> TinyMindConfig:
    """A TinyMindConfig from the JSON read from `path`, refused with the file's name when it cannot be one."""
    if not isinstance(raw, dict):
        raise BadCheckpoint(f"{path} is not a model config (a JSON {type(raw).__name__}, not an object): {advice}")
    if raw.get("model_type", "tinymind") != "tinymind":
        raise BadCheckpoint(f"{path} describes a {raw['model_type']!r} model, not a TinyMind one: {advice}")
    for key in CONFIG_SIZES:
        value = raw.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise BadCheckpoint(f"{path}: {key} is {value!r}, not a positive integer: {advice}")
    try:
        return TinyMindConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as error:
        raise BadCheckpoint(f"{path} is not a TinyMind config ({type(error).__name__}: {error}): {advice}") from None


def load_config(path: str) -> TinyMindConfig:
    """The TinyMindConfig saved beside a weight file (config_path_for)."""
    return config_from_dict(read_json(path, CONFIG_ADVICE), path)


def load_weights(path: str) -> tuple[dict, TinyMindConfig | None]:
    """(state dict, the config JSON beside it or None). A resume checkpoint also works as a weight file."""
    state = read_torch_file(path)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    check_state_dict(state, path)
    cfg_file = config_path_for(path)
    return state, load_config(cfg_file) if os.path.exists(cfg_file) else None


RESUME_KEYS = ("model", "optimizer", "scaler", "train_state", "rng")  # what TorchEngine and the Trainer read back


def load_resume_checkpoint(path: str) -> dict:
    """A resume checkpoint as TorchEngine.save_resume wrote it, checked to hold what a resume reads back."""
    advice = "delete it to start the run from scratch (or run without --from_resume 1)"
    ckpt = read_torch_file(path, advice)
    missing = [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise BadCheckpoint(f"{path} is not a resume checkpoint (it has no {', '.join(missing)}): {advice}")
    check_state_dict(ckpt["model"], path)
    return ckpt


def load_state_into(model, state: dict, source: str):
    """Strict load with an error that says which checkpoint does not fit and how."""
    model_keys = {k for k in model.state_dict() if not k.endswith("expert_load")}
    missing, unexpected = model_keys - set(state), set(state) - model_keys
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in model.state_dict().items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not fit this model config:{missing_config_hint(source)}"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {sorted(missing)[:5]}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {sorted(unexpected)[:5]}")
        lines += [f"  shape {m}" for m in mismatched[:5]]
        raise BadCheckpoint("\n".join(lines))
    model.load_state_dict(state, strict=False)


def missing_config_hint(source) -> str:
    """Weights without their config JSON get a model built from the flags (or the default preset), which rarely
    fits: say that the JSON is missing rather than only list the shapes. The config is not guessed from the shapes:
    q_proj [heads x head_dim, hidden] leaves the head count open, and RoPE, norms and MoE settings are not there."""
    if not isinstance(source, str) or not source.endswith(".pth") or "_resume" in os.path.basename(source) or \
            os.path.exists(config_path_for(source)):
        return ""
    return (f" its config JSON {config_path_for(source)} is missing, so the model was built from the flags (or the "
            "default preset). Copy the JSON of the run that wrote these weights there, or pass the model flags "
            "that match them")
