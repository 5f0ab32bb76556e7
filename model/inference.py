"""Everything the chat CLI, the benchmark script, the API server and the exporter share about *using* a trained model:
finding and loading a checkpoint, prompt building, sampling defaults and streamed generation.

    loaded = load_model_for_inference(weight="full_sft", save_dir="out")            # out/full_sft_<hidden>*.pth
    loaded = load_model_for_inference(load_from="out/dpo_512.pth", lora_name="lora_medical")
    loaded = load_model_for_inference(load_from="export/tinymind-26m")            # a transformers directory
    prompt = build_prompt(loaded.tokenizer, [{"role": "user", "content": "你好"}], loaded.mode)
    for piece in generate_stream(loaded, prompt, default_generation_config(loaded.tokenizer)):
        print(piece, end="")

A checkpoint is `<save_dir>/<stage>_<hidden>[_moe][_mla].pth` (plain fp32 state dict) with its TinyMindConfig as
`<stage>_<hidden>[_moe][_mla].json` beside it, so Dense, MoE and MLA models load without repeating model flags.
"""
import functools
import glob
import os
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, StoppingCriteria, TextIteratorStreamer

from .checkpoint import (SHIPPED_TOKENIZER, BadCheckpoint, config_from_dict, config_path_for, load_state_into,
                         load_weights, read_json, recorded_stage, resolve_weight, trained_tokenizer_path)
from .config import TinyMindConfig
from .device import DTYPES, cast_weights, default_device
from .model import TinyMindForCausalLM, describe

# Special token ids of the TinyMind/MiniMind tokenizer; the tokenizer's own ids are used when it has them.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# MiniMind's chat sampling settings; a repetition penalty keeps small models out of loops.
GENERATION_DEFAULTS = dict(max_new_tokens=512, temperature=0.7, top_p=0.85, top_k=0, repetition_penalty=1.1)

# The repository's tokenizer (model/tokenizer.json), found from any working directory.
DEFAULT_TOKENIZER = SHIPPED_TOKENIZER

EXPORT_ADVICE = "export the directory again (python -m scripts.convert_model)"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # e.g. "full_sft_512", or "full_sft_512+lora_medical"; the model id the API server lists
    source: str  # the file or directory the weights came from
    mode: str  # "chat": prompts go through the chat template; "continue": plain text continuation (pretrain)
    device: torch.device
    dtype: torch.dtype
    info: dict = field(default_factory=dict)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


# ============================================================================================= finding weights


def pick_weight_file(weight: str, save_dir: str, hidden_size: int | None = None, use_moe: int | None = None,
                     use_mla: int | None = None) -> str:
    """A stage name resolved in save_dir (out/full_sft_512.pth), or a path. When both a dense and a MoE/MLA file
    exist for the same stage, --use_moe/--use_mla choose between them instead of an ambiguity error."""
    if weight.endswith(".pth") or os.sep in weight:
        return resolve_weight(weight, save_dir, flag="--load_from")
    if use_moe is not None or use_mla is not None:
        suffix = ("_moe" if use_moe else "") + ("_mla" if use_mla else "")
        sizes = [str(hidden_size)] if hidden_size else ["*"]
        found = [p for size in sizes for p in glob.glob(os.path.join(save_dir, f"{weight}_{size}{suffix}.pth"))
                 if os.path.basename(p)[len(weight) + 1:].split("_")[0].split(".")[0].isdigit()]
        if len(found) == 1:
            return found[0]
        if not found:
            raise SystemExit(f"no '{weight}' weights with suffix '{suffix or '(dense)'}' in {save_dir}/")
        raise SystemExit(f"several matches in {save_dir}/: {', '.join(sorted(found))}; pass --hidden_size or a path")
    return resolve_weight(weight, save_dir, hidden_size, flag="--load_from")


def discover_checkpoints(save_dir: str) -> list[str]:
    """Every servable weight file in save_dir (not resume checkpoints, only files with a config JSON beside them)."""
    files = sorted(glob.glob(os.path.join(save_dir, "*.pth")))
    return [p for p in files if "_resume" not in os.path.basename(p) and os.path.exists(config_path_for(p))]


def lora_file_for(lora_name: str, save_dir: str, config) -> str:
    """MiniMind's adapter naming: <save_dir>/lora/<lora_name>_<hidden>[_moe][_mla].pth; a path is taken as is."""
    if lora_name.endswith((".pth", ".pt")) or os.sep in lora_name:
        candidates = [lora_name]
    else:
        suffix = ("_moe" if getattr(config, "use_moe", False) else "") + \
                 ("_mla" if getattr(config, "use_mla", False) else "")
        base = os.path.join(save_dir, "lora", f"{lora_name}_{config.hidden_size}")
        candidates = [base + suffix + ".pth", base + ".pth"]
    for path in candidates:
        if os.path.exists(path):
            return path
    raise SystemExit(f"LoRA adapter not found: looked for {' and '.join(dict.fromkeys(candidates))}; train it with "
                     "train_lora.py or pass the adapter's path as --lora_name")


def mode_for(name: str, tokenizer, stage: str | None = None) -> str:
    """Pretrained models only ever saw plain documents, so they continue text; every later stage was trained on
    the chat template. `stage`: the one recorded with the weights (checkpoint.recorded_stage); checkpoints saved
    before that record are judged by their name. A tokenizer without a chat template leaves continuation as the
    only option."""
    if not getattr(tokenizer, "chat_template", None):
        return "continue"
    return "continue" if (stage or os.path.basename(name)).startswith("pretrain") else "chat"


# ================================================================================================== loading


def pick_device_and_dtype(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """Inference casts the weights themselves (no fp32 master copy is needed): bf16/fp16 halve memory and traffic on
    GPUs. On CPUs fp32 is the default, since bf16 matmuls are emulated (slow) on most of them. Buffers (RoPE
    frequencies, the MoE bias) are not cast: see device.cast_weights."""
    device = device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device (try --device cpu)")
    if dtype is None:
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype not in DTYPES:
        raise SystemExit(f"--dtype {dtype!r}: choose one of float32, bfloat16, float16")
    return torch.device(device), DTYPES[dtype]


def is_transformers_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def load_tokenizer(tokenizer_path: str):
    if not os.path.exists(os.path.join(tokenizer_path, "tokenizer.json")) and \
            not os.path.exists(os.path.join(tokenizer_path, "tokenizer_config.json")):
        raise SystemExit(f"no tokenizer in {tokenizer_path}/ (expected tokenizer.json); pass --tokenizer_path")
    return AutoTokenizer.from_pretrained(tokenizer_path)


def read_safetensors(directory: str) -> dict:
    """All tensors of a transformers directory (model.safetensors, or the shards its index lists)."""
    from safetensors.torch import load_file
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index, EXPORT_ADVICE)
        if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
            raise BadCheckpoint(f"{index} has no weight_map: {EXPORT_ADVICE}")
        files = sorted(set(map(str, weight_map["weight_map"].values())))
    elif os.path.exists(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise SystemExit(f"no model.safetensors in {directory}/")
    state = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise BadCheckpoint(f"{path} is missing (listed in {index}): {EXPORT_ADVICE}")
        try:
            state.update(load_file(path))
        except Exception:  # safetensors' errors (header, length, EOF) do not name the file
            raise BadCheckpoint(f"{path} is not a complete safetensors file (truncated or corrupt; "
                                f"{os.path.getsize(path):,} bytes): {EXPORT_ADVICE}") from None
    return state


def load_transformers_dir(directory: str):
    """A directory written by scripts/convert_model.py (or any Llama/Qwen3 one). Our own model_type is built
    directly from config.json + safetensors with the local classes: no trust_remote_code, no code from the
    directory is run. Anything else goes through AutoModelForCausalLM, which never runs remote code here."""
    config_file = os.path.join(directory, "config.json")
    raw = read_json(config_file, EXPORT_ADVICE)
    if not isinstance(raw, dict):
        raise BadCheckpoint(f"{config_file} is not a model config (a JSON {type(raw).__name__}): {EXPORT_ADVICE}")
    if raw.get("model_type") != "tinymind":
        try:
            model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                               output_loading_info=True)
        except Exception as error:  # transformers' and safetensors' errors do not say which file is bad
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            raise BadCheckpoint(f"{directory}{os.sep} cannot be loaded ({reason}): {EXPORT_ADVICE}") from None
        # transformers fills weights the files lack with random values and only warns: refuse that instead
        missing = sorted(set(info["missing_keys"]) | {str(k[0]) if isinstance(k, tuple) else str(k)
                                                      for k in info.get("mismatched_keys", [])})
        if missing:
            raise BadCheckpoint(f"{directory}{os.sep} does not fit its config.json: {len(missing)} weights missing "
                                f"or of another shape (e.g. {missing[:3]}): {EXPORT_ADVICE}")
        return model
    config = config_from_dict({k: v for k, v in raw.items()
                               if k not in ("architectures", "auto_map", "transformers_version", "dtype")},
                              config_file, EXPORT_ADVICE)
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_safetensors(directory).items()}
    # The export leaves the tied head out (safetensors refuses shared tensors); a file without the embedding either
    # is left to load_state_into, which names what is missing.
    if config.tie_word_embeddings and "model.embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    return build_tinymind(state, config, directory)


def build_tinymind(state: dict, config: TinyMindConfig, source: str) -> TinyMindForCausalLM:
    model = TinyMindForCausalLM(config)
    load_state_into(model, state, source)
    return model


def exit_on_bad_file(load):
    """Chat, serving, export and the benchmark all load through load_model_for_inference: a file there that cannot
    be used ends them with one `error: ...` line naming it (as the stages' exit_on_user_error does), not a
    traceback."""
    @functools.wraps(load)
    def wrapper(*args, **kwargs):
        try:
            return load(*args, **kwargs)
        except (BadCheckpoint, FileNotFoundError) as error:
            raise SystemExit(f"error: {error}") from error
    return wrapper


@exit_on_bad_file
def load_model_for_inference(load_from: str | None = None, weight: str | None = "full_sft", save_dir: str = "out",
                             hidden_size: int | None = None, use_moe: int | None = None, use_mla: int | None = None,
                             lora_name: str | None = None, tokenizer_path: str | None = None,
                             device: str | None = None, dtype: str | None = None, mode: str = "auto",
                             verbose: bool = True) -> LoadedModel:
    """Load a model for generation, in eval mode, on the chosen device and dtype.

    load_from: a .pth file (config JSON beside it) or a transformers directory (config.json + safetensors, as
    scripts/convert_model.py writes); otherwise `weight`, a stage name resolved in save_dir. lora_name adds a LoRA
    adapter (merged into the weights, so decoding costs nothing extra). mode: auto | chat | continue."""
    device, torch_dtype = pick_device_and_dtype(device, dtype)
    if load_from and is_transformers_dir(load_from):
        source = load_from.rstrip(os.sep)
        model = load_transformers_dir(source)
        name = os.path.basename(source)
        has_own_tokenizer = os.path.exists(os.path.join(source, "tokenizer.json"))
        tokenizer = load_tokenizer(tokenizer_path or (source if has_own_tokenizer else DEFAULT_TOKENIZER))
    else:
        if load_from and os.path.isdir(load_from):
            raise SystemExit(f"{load_from} is a directory without config.json: not a transformers model directory")
        source = pick_weight_file(load_from or weight, save_dir, hidden_size, use_moe, use_mla)
        state, config = load_weights(source)
        if config is None:
            raise BadCheckpoint(f"{config_path_for(source)} not found: every checkpoint needs its config JSON beside "
                                "it (the training scripts write it). Copy the JSON of the run that produced these "
                                "weights there, or save it with `TinyMindConfig(...).to_json_file(path)`.")
        model = build_tinymind(state, config, source)
        name = os.path.basename(source)[:-len(".pth")]
        tokenizer = load_tokenizer(tokenizer_path or trained_tokenizer_path(config))
    vocab_size = model.config.vocab_size
    if len(tokenizer) > vocab_size:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}: "
                         "wrong --tokenizer_path for this checkpoint?")
    if lora_name:
        from .lora import load_lora, remove_lora
        lora_path = lora_file_for(lora_name, save_dir, model.config)
        load_lora(model, lora_path)
        remove_lora(model, merge=True)  # W + sBA folded in: a plain model again, as fast as the base one
        name += "+" + os.path.basename(lora_path).rsplit(".", 1)[0]
    if mode == "auto":
        mode = mode_for(name, tokenizer, recorded_stage(model.config))  # the base's stage, under an adapter
    elif mode not in ("chat", "continue"):
        raise SystemExit(f"mode {mode!r}: choose auto, chat or continue")
    # Only the weights take the inference dtype: RoPE frequencies and the MoE bias stay fp32, as in training.
    # Cast before moving, so a GPU never holds the fp32 copy.
    model = cast_weights(model, torch_dtype).to(device).eval()
    info = {"description": describe(model) if isinstance(model, TinyMindForCausalLM) else type(model).__name__}
    if verbose:
        print(f"{info['description']}; weights from {source}{' + ' + lora_name if lora_name else ''}; "
              f"{mode} mode; {device}, {str(torch_dtype).replace('torch.', '')}", flush=True)
    return LoadedModel(model, tokenizer, name, source, mode, device, torch_dtype, info)


# ================================================================================================== prompts


def trim_history(messages: list[dict], history_turns: int) -> list[dict]:
    """Keep system messages, the last `history_turns` user/assistant exchanges before the newest message, and the
    newest message. Small models lose the thread in long contexts, so MiniMind's default is no history at all."""
    system = [m for m in messages if m["role"] == "system"]
    dialogue = [m for m in messages if m["role"] != "system"]
    if not dialogue:
        return system
    earlier = dialogue[:-1][-2 * history_turns:] if history_turns > 0 else []
    return system + earlier + dialogue[-1:]


def build_prompt(tokenizer, messages: list[dict], mode: str = "chat", **template_kwargs) -> str:
    """chat: the tokenizer's chat template with the assistant header appended. continue: BOS + the newest message's
    text, exactly how pretraining documents start (<|im_start|>text<|im_end|>)."""
    if mode == "continue":
        return (tokenizer.bos_token or "") + messages[-1]["content"]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)


def encode_prompt(tokenizer, prompt: str, device) -> torch.Tensor:
    """The special tokens are spelled out in the prompt text already; adding more would duplicate BOS."""
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)


def default_generation_config(tokenizer=None, **overrides) -> GenerationConfig:
    """Sampling defaults for chat: stop at <|im_end|>, pad with <|endoftext|>. temperature 0 means greedy."""
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    settings = dict(GENERATION_DEFAULTS, do_sample=True, eos_token_id=[EOS_ID if eos is None else eos],
                    pad_token_id=PAD_ID if pad is None else pad, bos_token_id=BOS_ID)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if settings["temperature"] <= 0:
        # Greedy: leave the sampling knobs unset, otherwise GenerationConfig warns that they are ignored.
        settings.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return GenerationConfig(**settings)


# =============================================================================================== generation


class CountingStreamer(TextIteratorStreamer):
    """A TextIteratorStreamer that also counts the generated tokens and times them: the first generated token marks
    the end of the prefill, the rest are decode steps."""

    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kwargs)
        self.new_tokens, self.last_token = 0, None
        self.start_time = time.perf_counter()
        self.first_token_time = self.end_time = None

    def put(self, value):
        if not self.next_tokens_are_prompt:  # generate() hands over the prompt first, then one token per step
            now = time.perf_counter()
            self.first_token_time = self.first_token_time or now
            self.end_time = now
            self.new_tokens += value.numel()
            self.last_token = int(value.reshape(-1)[-1])
        super().put(value)


class CancelCriteria(StoppingCriteria):
    """Stops generation at the next token once `event` is set (the API server sets it when a client goes away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class GenerationStream:
    """Iterate to get the answer as text pieces while `model.generate` runs in a worker thread. Afterwards:
    prompt_tokens, new_tokens, finish_reason ("stop": end-of-turn token or cancel, "length": token budget used up),
    prefill_seconds, decode_tokens_per_second, total_seconds. `cancel()` stops the generation early."""

    def __init__(self, loaded: LoadedModel, prompt: str, generation_config: GenerationConfig):
        self.loaded, self.generation_config = loaded, generation_config
        self.input_ids = encode_prompt(loaded.tokenizer, prompt, loaded.device)
        self.prompt_tokens = self.input_ids.shape[1]
        self.cancel_event = threading.Event()
        self.streamer = CountingStreamer(loaded.tokenizer)
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            with torch.inference_mode():
                self.loaded.model.generate(self.input_ids, attention_mask=torch.ones_like(self.input_ids),
                                           generation_config=self.generation_config, streamer=self.streamer,
                                           stopping_criteria=[CancelCriteria(self.cancel_event)])
        except Exception as error:  # re-raised in the consumer's thread, which would otherwise wait forever
            self.error = error
            self.streamer.end()

    def __iter__(self):
        for piece in self.streamer:
            if piece:
                yield piece
        self.thread.join()
        if self.error is not None:
            raise self.error

    def cancel(self):
        self.cancel_event.set()

    def join(self):
        self.thread.join()

    @property
    def new_tokens(self) -> int:
        return self.streamer.new_tokens

    @property
    def finish_reason(self) -> str:
        eos = self.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        if self.new_tokens >= self.generation_config.max_new_tokens and self.streamer.last_token not in eos:
            return "length"
        return "stop"

    @property
    def total_seconds(self) -> float:
        return (self.streamer.end_time or time.perf_counter()) - self.streamer.start_time

    @property
    def prefill_seconds(self) -> float:
        return (self.streamer.first_token_time or time.perf_counter()) - self.streamer.start_time

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, per second of decoding: the steady-state speed, without the prompt's prefill."""
        if self.new_tokens < 2:
            return 0.0
        return (self.new_tokens - 1) / max(self.streamer.end_time - self.streamer.first_token_time, 1e-9)


def generate_stream(loaded: LoadedModel, prompt: str, generation_config: GenerationConfig) -> GenerationStream:
    return GenerationStream(loaded, prompt, generation_config)


def generate_text(loaded: LoadedModel, prompt: str,
                  generation_config: GenerationConfig) -> tuple[str, GenerationStream]:
    stream = GenerationStream(loaded, prompt, generation_config)
    return "".join(stream), stream
