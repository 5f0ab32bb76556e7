"""Reward functions for GRPO, with TRL's calling convention so functions written for TRL plug in unchanged:

    def my_reward(prompts, completions, completion_ids, **columns) -> list[float | None]

One call scores a whole rollout batch. `prompts[i]` is the conversation that produced completion i (a list of
{"role", "content"} messages), `completions[i]` is [{"role": "assistant", "content": text}] (TRL's conversational
form; the plain text for plain-text prompts), `completion_ids[i]` the generated token ids up to and including the
first <|im_end|>, and every other field of the data line arrives as a keyword argument holding one value per
completion (e.g. answer=["12", "12", ...]). Return one float per completion, or None where the function does not
apply (TRL treats it as NaN; the weighted sum skips it). Unknown keyword arguments must be accepted (**kwargs).

Built in (names for --reward_funcs):
    format       1 if the reply is exactly "<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>" (strict)
    soft_format  1 if a <think>...</think> block is followed by an <answer>...</answer> block anywhere (soft)
    tag_count    0.25 for each of the four tags that appears exactly once (partial credit while learning the format)
    answer       1 if the text inside the last <answer>...</answer> equals the data's "answer" (normalised, see
                 `answers_match`: "12.0" == "12", "1,000" == "1000", "1/2" == "0.5"), else 0
    reward_model a sequence-classification reward model's score (--reward_model DIR), for open-ended prompts
Anything else is loaded as "package.module:function" or "path/to/file.py:function".
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import unicodedata
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import torch

THINK_ANSWER_STRICT = re.compile(r"<think>\n.+?\n</think>\n<answer>\n.+?\n</answer>", re.DOTALL)
THINK_ANSWER_SOFT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def completion_text(completion) -> str:
    """The reply text of a completion in either TRL form: a string, or [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]


# ================================================================================================ format rewards


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """Strict: the whole reply is one think block and one answer block, each tag exactly once, on its own line
    (the layout of the reasoning SFT data; open-r1's format_reward plus the once-only check)."""
    rewards = []
    for completion in completions:
        text = completion_text(completion).strip()
        once = all(text.count(tag) == 1 for tag in TAGS)
        rewards.append(1.0 if once and THINK_ANSWER_STRICT.fullmatch(text) else 0.0)
    return rewards


def soft_format_reward(prompts, completions, **kwargs) -> list[float]:
    """Soft: think-then-answer blocks in that order somewhere in the reply; whitespace and extra text allowed."""
    return [1.0 if THINK_ANSWER_SOFT.search(completion_text(c)) else 0.0 for c in completions]


def tag_count_reward(prompts, completions, **kwargs) -> list[float]:
    """0.25 per tag present exactly once: a graded signal while the model is still learning the format."""
    return [sum(0.25 for tag in TAGS if completion_text(c).count(tag) == 1) for c in completions]


# ================================================================================================ answer reward


def extract_answer(text: str) -> str | None:
    """The content of the LAST <answer>...</answer> block (a model may restate its answer), stripped; None if
    there is no complete block. No fallback to "the last number in the text": a reply that does not say which
    number is its answer earns nothing, so the format and answer rewards do not reward the same accident."""
    blocks = ANSWER_BLOCK.findall(text)
    return blocks[-1].strip() if blocks else None


_BOXED = re.compile(r"^\\boxed\{(.*)\}$", re.DOTALL)
_LATEX_FRACTION = re.compile(r"^(-?)\\d?frac\{([^{}]+)\}\{([^{}]+)\}$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


def _strip_wrappers(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).strip()  # full-width digits and punctuation -> ASCII
    for _ in range(3):  # "$\boxed{12}$." peels off in a few rounds
        previous = text
        text = text.strip().rstrip(".。").strip()
        if len(text) >= 2 and text[0] == text[-1] == "$":
            text = text[1:-1]
        boxed = _BOXED.match(text)
        if boxed:
            text = boxed.group(1)
        if text == previous:
            break
    return text.strip()


def parse_number(text: str) -> Fraction | None:
    """An exact rational for "12", "-3", "12.0", "1,000", "0.25", "1/4", "\\frac{1}{4}" (None if not a number).
    Exact fractions, not floats, so "0.1 + 0.2"-style rounding can never make two different answers equal."""
    text = _strip_wrappers(text).replace(" ", "")
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    latex = _LATEX_FRACTION.match(text)
    if latex:
        text = f"{latex.group(1)}{latex.group(2)}/{latex.group(3)}"
    try:
        if "/" in text:
            numerator, denominator = text.split("/")
            return Fraction(Decimal(numerator)) / Fraction(Decimal(denominator))
        value = Decimal(text)
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None
    return Fraction(value) if value.is_finite() else None


def normalize_text_answer(text: str) -> str:
    """Non-numeric answers: NFKC, no surrounding $ or \\boxed{}, no final full stop, single spaces, case-folded."""
    return " ".join(_strip_wrappers(text).split()).casefold()


def answers_match(predicted: str | None, reference) -> bool:
    """Exact comparison after normalisation: numerically if both sides are numbers, else as normalised text."""
    if predicted is None or reference is None:
        return False
    reference = str(reference)
    predicted_number, reference_number = parse_number(predicted), parse_number(reference)
    if predicted_number is not None and reference_number is not None:
        return predicted_number == reference_number
    return normalize_text_answer(predicted) == normalize_text_answer(reference)


def answer_reward(prompts, completions, answer=None, **kwargs) -> list[float]:
    """1.0 when the final answer (see extract_answer) matches the data's "answer" column, else 0.0."""
    if answer is None:
        raise ValueError('the "answer" reward needs an "answer" field in every data line '
                         '(e.g. {"conversations": [...], "answer": "12"})')
    return [1.0 if answers_match(extract_answer(completion_text(c)), a) else 0.0 for c, a in zip(completions, answer)]


# ================================================================================================ reward model


class _BatchScorer:
    """What both reward-model scorers share: render each (prompt, completion) with the scorer's tokenizer, tokenize
    in right-padded batches, and ask `score_batch` for one number per row."""
    __name__ = "reward_model"

    @torch.no_grad()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        texts = [render_pair(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=self.max_length, add_special_tokens=False)
            scores += self.score_batch(batch.to(self.device)).float().tolist()
        return scores


class RewardModelScorer(_BatchScorer):
    """Scores (prompt, completion) pairs with a transformers AutoModelForSequenceClassification directory: the
    score is logits[:, 0] at the last token, as in TRL. Local files only (nothing is downloaded). The pair is
    rendered with the reward model's own chat template when it has one (its tokenizer need not match the policy's),
    else as the concatenated message texts."""

    def __init__(self, path: str, device: torch.device | str = "cpu", batch_size: int = 16, max_length: int = 1024):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--reward_model {path}: not a directory (expected a transformers model folder "
                                    "with config.json, weights and a tokenizer)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
        if self.model.config.pad_token_id is None:  # it finds each row's last real token through the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval().requires_grad_(False)
        self.device, self.batch_size, self.max_length = torch.device(device), batch_size, max_length

    def score_batch(self, batch) -> torch.Tensor:
        return self.model(**batch).logits[:, 0]


def render_pair(tokenizer, prompt, completion) -> str:
    """Prompt + completion as the reward model reads it: its chat template if it has one, else the plain texts."""
    if isinstance(prompt, str):
        return prompt + completion_text(completion)
    messages = list(prompt) + [{"role": "assistant", "content": completion_text(completion)}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(m["content"] for m in messages)


class CheckpointRewardScorer(_BatchScorer):
    """One of our checkpoints with a value head as the reward model: a .pth holding the model's weights plus
    "score.weight" ([1, hidden]; "score.bias" optional), its config JSON beside it, our tokenizer. The score is the
    head applied to the final hidden state (after the last RMSNorm) at each row's last real token, which is what a
    transformers *ForSequenceClassification computes."""

    def __init__(self, path: str, tokenizer_path: str | None = None, device="cpu", batch_size: int = 16,
                 max_length: int = 1024):
        from transformers import AutoTokenizer

        from ..checkpoint import load_state_into, load_weights, trained_tokenizer_path
        from ..model import TinyMindForCausalLM
        if not os.path.exists(path):
            raise FileNotFoundError(f"--reward_model {path}: no such file")
        state, config = load_weights(path)
        if config is None:
            raise FileNotFoundError(f"--reward_model {path}: no config JSON beside it")
        head = {key[len("score."):]: state.pop(key) for key in list(state) if key.startswith("score.")}
        if "weight" not in head:
            raise ValueError(f"--reward_model {path}: no value head (a 'score.weight' tensor of shape "
                             f"[1, {config.hidden_size}]) in the checkpoint")
        self.model = TinyMindForCausalLM(config)
        load_state_into(self.model, state, path)
        self.head = torch.nn.Linear(config.hidden_size, 1, bias="bias" in head)
        self.head.load_state_dict(head)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or trained_tokenizer_path(config))
        self.tokenizer.padding_side = "right"
        self.model.to(device).eval().requires_grad_(False)
        self.head.to(device).requires_grad_(False)
        self.device, self.batch_size, self.max_length = torch.device(device), batch_size, max_length

    def score_batch(self, batch) -> torch.Tensor:
        hidden, _ = self.model.model(batch["input_ids"], attention_mask=batch["attention_mask"])
        last = batch["attention_mask"].sum(dim=1) - 1  # right padding: the last real token of each row
        return self.head(hidden[torch.arange(len(last)), last].float()).squeeze(-1)


# ================================================================================================ loading


BUILT_IN = {"format": format_reward, "soft_format": soft_format_reward, "tag_count": tag_count_reward,
            "answer": answer_reward}
DEFAULT_WEIGHTS = {"format": 0.5, "soft_format": 0.5, "tag_count": 0.5, "answer": 1.0}


def load_reward_function(name: str):
    """A built-in name, "package.module:function" (importable from the working directory or sys.path), or
    "path/to/file.py:function"."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    if ":" not in name:
        raise ValueError(f"unknown reward function {name!r}: use one of {sorted(BUILT_IN) + ['reward_model']}, "
                         "or module:function / path/to/file.py:function for your own")
    module_name, function_name = name.rsplit(":", 1)
    if module_name.endswith(".py"):
        if not os.path.exists(module_name):
            raise ValueError(f"reward function {name!r}: file {module_name} not found")
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(module_name))[0], module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"reward function {name!r}: cannot import {module_name} ({error})") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"reward function {name!r}: {module_name} has no function {function_name!r}")
    return function


def build_reward_functions(names: list[str], weights: list[float] | None, reward_model: str | None = None,
                           device="cpu") -> tuple[list, list[str], list[float]]:
    """(functions, names for the logs, weights) for --reward_funcs / --reward_weights / --reward_model. Weights
    default to DEFAULT_WEIGHTS (format 0.5, answer 1.0; 1.0 for anything else). "reward_model" in the list needs
    --reward_model; --reward_model alone adds it with weight 1. A custom function is logged under its own name
    ("my_rewards:brevity" -> "brevity")."""
    names = [n.strip() for n in names if n.strip()]
    if reward_model and "reward_model" not in names:
        names.append("reward_model")
        if weights is not None:
            weights = list(weights) + [1.0]
    if not names:
        raise ValueError("--reward_funcs is empty: name at least one reward function")
    if weights is None:
        weights = [DEFAULT_WEIGHTS.get(n, 1.0) for n in names]
    if len(weights) != len(names):
        raise ValueError(f"--reward_weights has {len(weights)} values for {len(names)} reward functions {names}")
    functions, labels = [], []
    for name in names:
        if name == "reward_model":
            if not reward_model:
                raise ValueError('the "reward_model" reward needs --reward_model DIR (or a .pth with a value head)')
            scorer = CheckpointRewardScorer if reward_model.endswith(".pth") else RewardModelScorer
            functions.append(scorer(reward_model, device=device))
        else:
            functions.append(load_reward_function(name))
        label = name.rsplit(":", 1)[-1]
        labels.append(label if label not in labels else name)
    return functions, labels, [float(w) for w in weights]


def score(functions, prompts: list, completions: list, completion_ids: list[list[int]],
          columns: dict[str, list]) -> torch.Tensor:
    """[N, F] float32 rewards, one column per function; None (does not apply) becomes NaN."""
    table = torch.empty(len(completions), len(functions), dtype=torch.float32)
    for j, function in enumerate(functions):
        values = function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if len(values) != len(completions):
            name = getattr(function, "__name__", repr(function))
            raise ValueError(f"reward function {name} returned {len(values)} values for {len(completions)} "
                             "completions")
        table[:, j] = torch.tensor([math.nan if v is None else float(v) for v in values])
    return table


def combine(rewards_per_function: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """sum_j w_j r_j per completion, skipping NaN (functions that do not apply), as TRL's nansum."""
    weights = torch.tensor(weights, dtype=rewards_per_function.dtype, device=rewards_per_function.device)
    return (rewards_per_function * weights).nansum(dim=1)
