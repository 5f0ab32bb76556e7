"""Prompts for on-policy training (GRPO)."""
from jinja2.exceptions import TemplateError
from torch.utils.data import Dataset

from .chat import encode_prompt
from .formats import open_source
from .jsonl import no_usable, note_bad_line
from .schema import prompt_of


class PromptDataset(Dataset):
    """Prompts for on-policy training (GRPO): the conversation (ending with a user or tool turn; a trailing assistant
    turn, as in MiniMind's rlaif files, is dropped) plus every other field of the line (e.g. "answer"), which reward
    functions receive as keyword arguments, as in TRL. TRL's {"prompt": ...} and the other chat formats are read too
    (formats.py). Lines are checked as chat data is (schema.py): a line with nothing to prompt with is a bad line, an
    error or, with skip_bad_lines, skipped and counted."""

    def __init__(self, data_path: str, tokenizer, max_prompt_len: int, skip_bad_lines: bool = False):
        self.items = []
        self.stats = {"bad_lines": 0, "dropped_too_long": 0}
        source = open_source(data_path, "grpo", skip_bad_lines)
        for line_number, obj in source.records(skip_bad_lines, self.stats):
            messages = prompt_of([dict(m) for m in obj["conversations"]])
            try:
                prompt_ids = encode_prompt(tokenizer, messages)
            except (TemplateError, TypeError, ValueError) as error:  # should the checks miss a case, still name it
                note_bad_line(data_path, line_number, f"the chat template cannot render it "
                                                      f"({type(error).__name__}: {error})", skip_bad_lines, self.stats,
                              source.unit)
                continue
            if len(prompt_ids) > max_prompt_len:
                self.stats["dropped_too_long"] += 1
                continue
            columns = {k: v for k, v in obj.items() if k != "conversations"}
            self.items.append({"prompt": messages, "prompt_ids": prompt_ids, "columns": columns})
        if not self.items:
            raise no_usable(data_path, "prompts", self.stats,
                            f", {self.stats['dropped_too_long']} longer than {max_prompt_len} tokens", source.unit)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]
