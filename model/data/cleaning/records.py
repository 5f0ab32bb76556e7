"""One input line becomes one record: decoded, parsed and checked here (a bad line raises BadLine with the reason
code the report counts it under), and the text(s) of a record read or replaced in one place, so every stage treats
pretrain text and conversations alike."""

import json


class BadLine(Exception):
    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


def parse_record(raw: bytes, text_field: str) -> dict:
    """Decode one input line into a record dict, or raise BadLine with a reason code."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine("invalid_utf8", str(e)) from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine("malformed_json", str(e)) from None
    if not isinstance(record, dict):
        raise BadLine("bad_schema", f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns or not all(
            isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("role"), str) for t in turns
        ):
            raise BadLine("bad_schema", "conversations must be a non-empty list of {role, content} strings")
        return record
    if not isinstance(record.get(text_field), str):
        raise BadLine("bad_schema", f"no string field '{text_field}' and no 'conversations'")
    return record


def record_kind(record: dict) -> str:
    return "conversation" if "conversations" in record else "text"


def record_texts(record: dict, text_field: str) -> list:
    if "conversations" in record:
        return [turn["content"] for turn in record["conversations"]]
    return [record[text_field]]


def with_texts(record: dict, text_field: str, texts: list) -> dict:
    """A copy of the record with its text(s) replaced; other fields untouched."""
    record = dict(record)
    if "conversations" in record:
        record["conversations"] = [dict(turn, content=t) for turn, t in zip(record["conversations"], texts)]
    else:
        record[text_field] = texts[0]
    return record


def joined_text(record: dict, text_field: str) -> str:
    return "\n".join(record_texts(record, text_field))
