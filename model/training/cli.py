"""What every stage script does first: the command line it shares with the others (MiniMind's flag names where it
has one), the runtime and tokenizer, the model factory behind --preset / --from_weight, and one clear line instead
of a traceback for the errors a user can fix."""
import argparse
import functools
import math
import os

import torch

from ..checkpoint import (config_path_for, load_config, load_state_into, load_weights, record_tokenizer,
                          resolve_weight)
from ..config import PRESETS, TinyMindConfig
from ..data.jsonl import BadInput
from ..device import DTYPES, default_device
from ..model import TinyMindForCausalLM, describe
from .engine import TrainingDiverged
from .runtime import DEFAULT_DDP_TIMEOUT, Runtime, init_runtime, print0


def bounded(kind, minimum=None, maximum=None, above=None, why: str = ""):
    """An argparse `type`: an int or float that is finite and >= minimum (or > above) and <= maximum. A value out of
    range is an argparse error naming the flag, not an overflow or a division by zero deep in training (issue 18:
    --learning_rate 1e39 crashed in the optimizer)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        broken = ("is not a finite number" if not math.isfinite(value) else
                  f"must be > {above}" if above is not None and not value > above else
                  f"must be >= {minimum}" if minimum is not None and value < minimum else
                  f"must be <= {maximum}" if maximum is not None and value > maximum else None)
        if broken:
            raise argparse.ArgumentTypeError(f"{text} {broken}{why}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


POSITIVE_INT = bounded(int, minimum=1)
COUNT = bounded(int, minimum=0)
NON_NEGATIVE = bounded(float, minimum=0.0)
FRACTION = bounded(float, minimum=0.0, maximum=1.0)
# AdamW moves each weight by about the learning rate per step: above 1 every step overwrites the weights.
LEARNING_RATE = bounded(float, above=0.0, maximum=1.0, why=" (AdamW's usual range is 1e-5 to 1e-2)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the script docstring's layout and shows every flag's default."""


def add_common_args(parser: argparse.ArgumentParser, stage: str, new_student: bool = False, **defaults):
    """Flags every stage takes (MiniMind's names where it has one). `defaults` sets stage-specific defaults;
    `new_student`: the stage may build a new model although it names a default checkpoint (distillation)."""
    parser.set_defaults(tinymind_stage=stage)  # recorded in the saved config JSON, whatever --save_weight says
    g = parser.add_argument_group("output")
    g.add_argument("--save_dir", default="out", help="directory for weights, resume checkpoints and logs")
    g.add_argument("--save_weight", default=stage,
                   help="name prefix of the saved weights: <save_dir>/<name>_<hidden>.pth")
    # A stage that continues a checkpoint takes its architecture from the checkpoint's config JSON: the flags that
    # only shape a new model stay accepted (restating the checkpoint is allowed) but are left out of its --help.
    continues = defaults.get("from_weight", "none") != "none" and not new_student
    new_only = argparse.SUPPRESS if continues else None
    g = parser.add_argument_group(
        "model (from the --from_weight checkpoint's config; --hidden_size, --use_moe, --use_mla pick its file name)"
        if continues else "model (default: the checkpoint's own config, or --preset)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS), help=new_only or
                   "named size for a new model: nano (tests), tiny (CPU demo), small (26M), base (104M)")
    g.add_argument("--hidden_size", type=POSITIVE_INT, default=None, help="model width")
    g.add_argument("--num_hidden_layers", type=POSITIVE_INT, default=None,
                   help=new_only or "number of transformer blocks")
    g.add_argument("--num_attention_heads", type=POSITIVE_INT, default=None, help=new_only or "query heads")
    g.add_argument("--num_key_value_heads", type=POSITIVE_INT, default=None, help=new_only or "key/value heads (GQA)")
    g.add_argument("--intermediate_size", type=POSITIVE_INT, default=None, help=new_only or
                   "MLP width (default: 8/3 x hidden_size rounded up to 64, as MiniMind2; MiniMind's newer configs "
                   "use pi x hidden_size)")
    g.add_argument("--use_moe", type=int, default=None, choices=[0, 1], help="1: DeepSeekMoE feed-forward layers")
    g.add_argument("--use_mla", type=int, default=None, choices=[0, 1], help="1: multi-head latent attention")
    g.add_argument("--moe_balance", default=None, choices=["aux_free", "aux_loss", "none"], help=new_only or
                   "MoE load balancing: bias-based aux-loss-free (DeepSeek-V3), classic aux loss, or none")
    g.add_argument("--num_experts", type=POSITIVE_INT, default=None, help=new_only or "routed experts per MoE layer")
    g.add_argument("--num_experts_per_tok", type=POSITIVE_INT, default=None,
                   help=new_only or "experts each token is routed to (top-k)")
    g.add_argument("--bias_update_speed", type=NON_NEGATIVE, default=None, help="aux-free bias step gamma per update")
    g.add_argument("--aux_loss_alpha", type=NON_NEGATIVE, default=None, help="coefficient of the classic MoE aux loss")
    g.add_argument("--dropout", type=bounded(float, 0.0, 0.99), default=None, help="residual/embedding dropout")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=COUNT, default=defaults.get("epochs", 1), help="passes over the training data")
    g.add_argument("--max_steps", type=bounded(int, minimum=-1), default=defaults.get("max_steps", -1),
                   help="stop after this many optimizer steps (-1: run all epochs)")
    g.add_argument("--batch_size", type=POSITIVE_INT, default=defaults.get("batch_size", 16),
                   help="sequences per micro-batch per rank")
    g.add_argument("--accumulation_steps", type=POSITIVE_INT, default=defaults.get("accumulation_steps", 1),
                   help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=LEARNING_RATE, default=defaults.get("learning_rate", 5e-4),
                   help="peak learning rate")
    g.add_argument("--min_lr_ratio", type=FRACTION, default=0.1,
                   help="cosine schedule floor, as a fraction of the peak")
    g.add_argument("--warmup_steps", type=COUNT, default=defaults.get("warmup_steps", 0),
                   help="linear warmup steps (0: 1%% of the steps)")
    g.add_argument("--weight_decay", type=FRACTION, default=defaults.get("weight_decay", 0.1),
                   help="AdamW weight decay on weight matrices (not on norms or embeddings)")
    g.add_argument("--grad_clip", type=NON_NEGATIVE, default=1.0, help="clip the global gradient norm to this (0: off)")
    g.add_argument("--max_seq_len", type=bounded(int, minimum=2), default=defaults.get("max_seq_len", 512),
                   help="tokens per sequence")
    g.add_argument("--seed", type=bounded(int, 0, 2**31 - 1), default=42, help="seed for init, data order and dropout")
    g.add_argument("--num_workers", type=COUNT, default=defaults.get("num_workers", 0),
                   help="DataLoader worker processes")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="autocast dtype (default: bfloat16 on GPUs, float16 on old GPUs; on a CPU whichever of "
                        "bfloat16 and float32 a short matmul probe at the model's shape measures faster, cached)")
    g.add_argument("--num_threads", type=POSITIVE_INT, default=None,
                   help="CPU threads per process (default: cores / local ranks)")
    g.add_argument("--use_compile", type=int, default=0, choices=[0, 1], help="1: torch.compile the model")
    g.add_argument("--peak_tflops", type=bounded(float, above=0.0), default=None,
                   help="the device's peak TFLOP/s in the training dtype, for the logged MFU (default: a table of "
                        "common GPUs; none on a CPU or an unlisted GPU)")
    g.add_argument("--deepspeed", default=None, help="DeepSpeed config JSON (ZeRO-1/2), e.g. ds_config.json")
    g.add_argument("--ddp_timeout", type=bounded(float, above=0.0), default=DEFAULT_DDP_TIMEOUT,
                   help="seconds a collective waits for the other ranks before the run stops with an error (a rank "
                        "that died or froze); long enough for rank 0 to tokenize the data while the others wait")
    g = parser.add_argument_group("checkpoints, evaluation and logging")
    g.add_argument("--from_weight", default=defaults.get("from_weight", "none"),
                   help="start from these weights: a stage name resolved in --save_dir (e.g. pretrain) or a .pth path; "
                        "'none' starts from random init")
    g.add_argument("--from_resume", type=int, default=0, choices=[0, 1],
                   help="1: continue from <save_dir>/<save_weight>_<hidden>_resume.pth if present")
    g.add_argument("--save_interval", type=POSITIVE_INT, default=defaults.get("save_interval", 200),
                   help="write weights + resume checkpoint every N optimizer steps")
    g.add_argument("--log_interval", type=POSITIVE_INT, default=defaults.get("log_interval", 10),
                   help="log every N steps")
    g.add_argument("--eval_interval", type=COUNT, default=defaults.get("eval_interval", 100),
                   help="held-out evaluation every N steps (0: only at the end)")
    g.add_argument("--eval_batches", type=POSITIVE_INT, default=defaults.get("eval_batches", 20),
                   help="batches per held-out evaluation")
    g.add_argument("--use_wandb", type=int, default=0, choices=[0, 1],
                   help="1: log to Weights & Biases (offline when WANDB_API_KEY is not set)")
    g.add_argument("--wandb_project", default="TinyMind", help="wandb project name")
    return parser


def add_data_args(parser: argparse.ArgumentParser, data_path: str, contents: str, val_fraction: float | None = 0.01,
                  title: str = "data"):
    """The data flags of every stage: the file, its held-out twin (or share), the tokenizer, bad-line handling.
    `val_fraction` None: the held-out set is only ever a separate file (no --val_fraction flag)."""
    g = parser.add_argument_group(title)
    g.add_argument("--data_path", default=data_path, help=contents)
    held_out = "else --val_fraction of the data, chosen at random with --seed" if val_fraction is not None else \
        "else none"
    g.add_argument("--val_data_path", default=None,
                   help=f"held-out data (default: <data>_val.jsonl beside the data if it exists, {held_out})")
    if val_fraction is not None:
        g.add_argument("--val_fraction", type=bounded(float, 0.0, 0.99), default=val_fraction,
                       help="share of the data held out when there is no validation file")
    g.add_argument("--tokenizer_path", default="model", help="directory with tokenizer.json / tokenizer_config.json")
    g.add_argument("--skip_bad_lines", type=int, default=0, choices=[0, 1],
                   help="1: skip malformed lines (counted and reported) instead of stopping at the first")
    return g


def add_grpo_loss_args(parser: argparse.ArgumentParser):
    """The clipped-surrogate flags train_grpo.py and train_agent.py share (grpo_loss in model/training/losses.py)."""
    g = parser.add_argument_group("GRPO loss")
    g.add_argument("--loss_type", default="dapo", choices=["grpo", "bnpo", "dapo", "dr_grpo", "cispo"],
                   help="how per-token losses are averaged; dapo = token mean over the whole step (TRL's default)")
    g.add_argument("--scale_rewards", default="group", choices=["group", "batch", "none"],
                   help="divide advantages by the group's reward std, the whole batch's, or not at all (Dr. GRPO)")
    g.add_argument("--beta", type=float, default=0.0,
                   help="weight of the k3 KL penalty to the frozen starting model (0: no reference model is loaded; "
                        "DeepSeekMath used 0.04)")
    g.add_argument("--epsilon", type=float, default=0.2, help="lower clip range of the ratio: 1 - epsilon")
    g.add_argument("--epsilon_high", type=float, default=None,
                   help="upper clip range 1 + epsilon_high (default: epsilon; DAPO's clip-higher uses 0.28); "
                        "for cispo the absolute cap on the ratio (default 5)")
    g.add_argument("--delta", type=float, default=None,
                   help="optional cap on the unclipped ratio (INTELLECT-2's two-sided clipping), e.g. 4")
    g.add_argument("--num_iterations", type=int, default=1,
                   help="optimizer steps per rollout batch (mu); > 1 makes the ratio and its clipping matter")
    g.add_argument("--dynamic_sampling", type=int, default=0, choices=[0, 1],
                   help="1: drop groups whose rewards are all equal before the update (DAPO; they have A = 0)")
    return g


def check_group_sampling(parser: argparse.ArgumentParser, args) -> None:
    """GRPO's baseline is the group: it needs at least two different samples of each prompt."""
    if args.num_generations < 2:
        parser.error("--num_generations must be at least 2: the group is its own baseline")
    if args.temperature <= 0:
        parser.error("--temperature must be > 0: GRPO needs different samples of the same prompt")


MODEL_FLAGS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
               "use_moe", "use_mla", "moe_balance", "num_experts", "num_experts_per_tok", "bias_update_speed",
               "aux_loss_alpha", "dropout"]


ARCHITECTURE_FLAGS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "use_moe", "use_mla", "num_experts", "num_experts_per_tok"]


def config_from_args(args, base: TinyMindConfig | None = None, vocab_size: int | None = None,
                     default_preset: str | None = None) -> TinyMindConfig:
    """A checkpoint's config wins; flags may only restate it (or set training-time knobs like dropout). A flag
    that contradicts the checkpoint's architecture is an error rather than a silently mis-shaped model."""
    given = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k, None) is not None}
    if base is not None:
        clashes = {k: (v, getattr(base, k)) for k, v in given.items()
                   if k in ARCHITECTURE_FLAGS and getattr(base, k) != type(getattr(base, k))(v)}
        if clashes:
            detail = ", ".join(f"--{k} {v} but the checkpoint has {c}" for k, (v, c) in clashes.items())
            raise SystemExit(f"model flags contradict the checkpoint's config: {detail}. Drop these flags "
                             "(the checkpoint's config is used) or pick another --from_weight.")
        settings = base.to_dict()
        settings.update({k: v for k, v in given.items() if k not in ARCHITECTURE_FLAGS})
        for key in ("model_type", "transformers_version", "architectures"):
            settings.pop(key, None)
        return TinyMindConfig(**settings)
    # No preset named: the CPU demo's tiny model on a CPU when no size is given either; else MiniMind2-Small's
    # shape, with the given sizes on top of it.
    if default_preset is None:
        default_preset = "tiny" if default_device() != "cuda" and args.hidden_size is None else "small"
    settings = dict(PRESETS[args.preset or default_preset])
    settings.update({k: bool(v) if k in ("use_moe", "use_mla") else v for k, v in given.items()})
    if vocab_size is not None:
        settings["vocab_size"] = vocab_size
    return TinyMindConfig(**settings)


def build_model(args, vocab_size: int | None = None, default_preset: str | None = None, dropout: bool = True):
    """New model from flags, or the --from_weight checkpoint with its own config. Returns (model, source path).
    `vocab_size`: the tokenizer's size; a model with fewer embedding rows than it has tokens is refused.
    `dropout` False switches every dropout off (as TRL's disable_dropout for DPO and GRPO: a policy that drops
    units would not start equal to its reference, nor sample from the distribution it is trained on); the saved
    config keeps its value for the stages after."""
    source = None
    base_config, state = None, None
    if args.from_weight and args.from_weight != "none":
        source = resolve_weight(args.from_weight, args.save_dir, args.hidden_size)
        state, base_config = load_weights(source)
    config = config_from_args(args, base_config, vocab_size, default_preset)
    record_tokenizer(config, getattr(args, "tokenizer_path", None), base_config, source)
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise SystemExit(f"error: the tokenizer has {vocab_size} tokens but the model's vocab_size is "
                         f"{config.vocab_size}")
    model = TinyMindForCausalLM(config)
    if state is not None:
        load_state_into(model, state, source)
    if not dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.0
    print0(f"{describe(model)}" + (f"; weights from {source}" if source else "; random init")
           + ("" if dropout else "; dropout off"))
    return model, source


def planned_config(args) -> TinyMindConfig:
    """The config build_model will build (from the --from_weight checkpoint's JSON, or from the flags), without
    building the model or reading its weights."""
    base = None
    if args.from_weight and args.from_weight != "none":
        path = config_path_for(resolve_weight(args.from_weight, args.save_dir, args.hidden_size))
        base = load_config(path) if os.path.exists(path) else None
    return config_from_args(args, base)


def start_stage(args) -> tuple[Runtime, object]:
    """The runtime (device, dtype, seeds, process group) and the tokenizer every stage starts with. With no
    --dtype on a CPU, the dtype is measured at the model's own matmul shape (model.device.measured_cpu_dtype)."""
    from transformers import AutoTokenizer
    shape = None
    if args.dtype is None and (args.device or default_device()) == "cpu":
        config = planned_config(args)
        tokens = min(args.batch_size * args.max_seq_len, 4096)  # enough rows for the kernel's steady state
        shape = (tokens, config.hidden_size, config.intermediate_size)
    runtime = init_runtime(args.device, args.dtype, args.seed, args.num_threads, matmul_shape=shape,
                           ddp_timeout=args.ddp_timeout)
    return runtime, AutoTokenizer.from_pretrained(args.tokenizer_path)


def exit_on_user_error(main):
    """Bad data (the message names file and line), a missing file or a diverged run end the stage with one line
    `error: ...` and exit status 1, not a traceback."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (BadInput, FileNotFoundError, TrainingDiverged) as error:
            raise SystemExit(f"error: {error}") from error
    return wrapper
