"""Prompts for on-policy training (GRPO)."""
from torch.utils.data import Dataset

from .chat import encode_prompt
from .jsonl import BadInput, iter_jsonl


class PromptDataset(Dataset):
    """Prompts for on-policy training (GRPO): the conversation (ending with a user turn; a trailing assistant turn,
    as in MiniMind's rlaif files, is dropped) plus every other field of the line (e.g. "answer"), which reward
    functions receive as keyword arguments, as in TRL."""

    def __init__(self, data_path: str, tokenizer, max_prompt_len: int, skip_bad_lines: bool = False):
        self.items = []
        self.stats = {"bad_lines": 0, "dropped_too_long": 0}

        def validate(obj):
            if "conversations" not in obj:
                return 'missing the "conversations" field'
            messages = obj["conversations"]
            if not isinstance(messages, list) or not messages:
                return '"conversations" must be a non-empty list'
            return None

        for line_number, obj in iter_jsonl(data_path, skip_bad_lines, self.stats, validate):
            messages = [dict(m) for m in obj["conversations"]]
            if messages[-1].get("role") == "assistant":
                messages = messages[:-1]
            if not messages:
                continue
            prompt_ids = encode_prompt(tokenizer, messages)
            if len(prompt_ids) > max_prompt_len:
                self.stats["dropped_too_long"] += 1
                continue
            columns = {k: v for k, v in obj.items() if k != "conversations"}
            self.items.append({"prompt": messages, "prompt_ids": prompt_ids, "columns": columns})
        if not self.items:
            raise BadInput(f"{data_path}: no usable prompts ({self.stats})")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]
