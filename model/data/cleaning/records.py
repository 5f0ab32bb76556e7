"""One input line becomes one record: decoded, parsed and checked here (a bad line raises BadLine with the reason
code the report counts it under), and the text(s) of a record read or replaced in one place, so every stage treats
pretrain text and conversations alike. Lines are decoded and checked by the same functions the trainers use
(model/data/jsonl.py, model/data/schema.py): a line cleaning keeps is a line training accepts."""

from ..jsonl import load_line
from ..schema import check_messages, check_text


class BadLine(Exception):
    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


def parse_record(raw: bytes, text_field: str) -> dict:
    """Decode one input line into a record dict, or raise BadLine with a reason code."""
    record, code, why = load_line(raw)
    if code is not None:
        raise BadLine(code, why)
    if not isinstance(record, dict):
        raise BadLine("bad_schema", f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        # any chat a trainer can render: SFT chats, GRPO prompts (no assistant turn yet), tool calls
        why = check_messages(record["conversations"])
    else:
        why = check_text(record, text_field)
        why = why and f"{why} (and no \"conversations\")"
    if why:
        raise BadLine("bad_schema", why)
    return record


def record_kind(record: dict) -> str:
    return "conversation" if "conversations" in record else "text"


def record_texts(record: dict, text_field: str) -> list:
    if "conversations" in record:
        # an assistant turn that only calls tools may have no content
        return [turn.get("content") or "" for turn in record["conversations"]]
    return [record[text_field]]


def with_texts(record: dict, text_field: str, texts: list) -> dict:
    """A copy of the record with its text(s) replaced; other fields untouched."""
    record = dict(record)
    if "conversations" in record:
        record["conversations"] = [dict(turn, content=t) if turn.get("content") is not None or t else turn
                                   for turn, t in zip(record["conversations"], texts)]
    else:
        record[text_field] = texts[0]
    return record


def joined_text(record: dict, text_field: str) -> str:
    return "\n".join(record_texts(record, text_field))
