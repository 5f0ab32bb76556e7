"""Weight files: how a stage's checkpoint is named and found, written atomically, loaded strictly, and which
tokenizer it was trained with. Training writes them; chat, serving, export and the next stage read them, so this
module knows nothing about training.

A checkpoint is `<save_dir>/<stage>_<hidden>[_moe][_mla].pth` (a plain fp32 state dict, as MiniMind's) with its
TinyMindConfig as JSON beside it."""
import glob
import hashlib
import os

import torch

from .config import TinyMindConfig


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


def atomic_torch_save(obj, path: str):
    """Write to a temp file in the same directory, fsync, then rename: a crash leaves the old file intact."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def unwrap(model):
    """The plain TinyMind module under DDP / torch.compile / DeepSpeed wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_weights(model, path: str):
    """fp32 state dict (MiniMind-style plain .pth) with the model config as JSON beside it."""
    model = unwrap(model)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
             for k, v in model.state_dict().items() if not k.endswith("expert_load")}
    atomic_torch_save(state, path)
    atomic_write_text(model.config.to_json_string(), config_path_for(path))


def load_weights(path: str) -> tuple[dict, TinyMindConfig | None]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a resume checkpoint also works as a weight file
    cfg_file = config_path_for(path)
    config = TinyMindConfig.from_json_file(cfg_file) if os.path.exists(cfg_file) else None
    return state, config


def load_state_into(model, state: dict, source: str):
    """Strict load with an error that says which checkpoint does not fit and how."""
    model_keys = {k for k in model.state_dict() if not k.endswith("expert_load")}
    missing, unexpected = model_keys - set(state), set(state) - model_keys
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in model.state_dict().items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {source} does not fit this model config:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {sorted(missing)[:5]}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {sorted(unexpected)[:5]}")
        lines += [f"  shape {m}" for m in mismatched[:5]]
        raise SystemExit("\n".join(lines))
    model.load_state_dict(state, strict=False)
