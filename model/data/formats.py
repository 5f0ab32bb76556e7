"""The data formats other tools write, read and turned into MiniMind's, record by record, before schema.py checks
them: every dataset class, the checks and the token caches see MiniMind's form only. docs/sft.md lists what each
stage accepts, with an example of each.

A file's container comes from its name and first bytes: JSON lines (.jsonl, or any other name whose first character
is not "["), a JSON array of records (.json, or a name without .jsonl, starting with "["), parquet (.parquet, or a
file starting with parquet's magic bytes), a `datasets` save_to_disk folder, or plain text (.txt: pretraining only,
one document per non-blank line, as datasets' own "text" loader reads it). Its layout comes from the fields of its
first record (a later one, with skip_bad_lines, if the first matches nothing): MiniMind's `conversations`,
OpenAI/TRL `messages`, ShareGPT (`conversations` of {"from", "value"}), TRL's prompt/completion and preference
columns, Alpaca's instruction/input/output. A file none of them fits is one error naming the file and what each
stage expects; only a record that breaks its file's layout is a bad line, for --skip_bad_lines.

Errors locate a record by its line in a text file, or as "record 17" (counted from 0, as pandas and datasets index
rows) in the others; the token caches store those numbers, so held-out splits find their records again."""
import json
import os
from dataclasses import dataclass

from .jsonl import BadInput, decode_line, iter_lines, note_bad_line, parse_line
from .schema import check_chat, check_pair, check_prompt, check_text, json_type

# Part of every token cache's key (jsonl.token_cache_path): bump it whenever a record converts differently, so the
# caches built from the old conversion are rebuilt.
FORMATS_VERSION = 1

CHECKS = {"pretrain": check_text, "sft": check_chat, "dpo": check_pair, "grpo": check_prompt}
STAGES = {"pretrain": "pretraining text", "sft": "chat (SFT)", "dpo": "preference (DPO)", "grpo": "prompt (GRPO)"}

CONVERSATIONS = ("conversations", ("conversations",), '{"conversations": [...]} (MiniMind; ShareGPT with from/value)')
MESSAGES = ("messages", ("messages",), '{"messages": [...]} (OpenAI/TRL)')
ALPACA = ("alpaca", ("instruction",), '{"instruction", "input", "output"} (Alpaca)')
# Per stage, in the order they are tried: (layout, the fields a first record must have, how errors spell it).
LAYOUTS = {
    "pretrain": [("text", ("text",), '{"text": "..."} (or a .txt file, one document per line)')],
    "sft": [CONVERSATIONS, MESSAGES, ("prompt_completion", ("prompt", "completion"),
                                      '{"prompt", "completion"} (TRL)'), ALPACA],
    "dpo": [("pair", ("chosen",), '{"chosen", "rejected"} (MiniMind, TRL; with "prompt" in TRL\'s explicit-prompt '
                                  'form, "conversations" in ShareGPT\'s)')],
    "grpo": [CONVERSATIONS, MESSAGES, ("prompt", ("prompt",), '{"prompt": ...} (TRL)'), ALPACA],
}
DETECT_LIMIT = 1000  # with skip_bad_lines, how many records may precede the first that names the layout

JSONL_EXTENSIONS = (".jsonl", ".ndjson", ".jl")
UNSUPPORTED = (".csv", ".tsv", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".arrow")
SUPPORTED = ("JSON lines (.jsonl), a JSON array (.json), parquet (.parquet), a datasets save_to_disk folder, or "
             "plain text (.txt, pretraining only)")

# ShareGPT's speakers (LLaMA-Factory's names among them) as MiniMind's roles; a function_call becomes an assistant
# turn that calls tools, an observation the tool's reply.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}


# ================================================================================================ messages


def tool_calls_of(value) -> tuple[list | None, str | None]:
    """A ShareGPT function_call turn's calls: its value is one {"name", "arguments"} object or a list of them,
    usually as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None, 'is a function_call whose "value" is not JSON ({"name": ..., "arguments": ...} or a list)'
    return (value if isinstance(value, list) else [value]), None


def content_text(content) -> tuple[object, str | None]:
    """OpenAI's content parts ([{"type": "text", "text": ...}, ...]) as one string, joined by newlines as vLLM does;
    any other content is left for schema.py to judge."""
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        return content, None
    kinds = {part.get("type") for part in content}
    if kinds - {"text"}:
        return None, f"has content parts of types {sorted(map(str, kinds - {'text'}))}; only text can be trained on"
    return "\n".join(str(part.get("text", "")) for part in content), None


def convert_message(message) -> tuple[object, str | None]:
    """A ShareGPT message as MiniMind's; others as they are, less OpenAI's content parts. Returns the message itself
    when nothing changes, so MiniMind's records pass through untouched."""
    if not isinstance(message, dict):
        return message, None  # schema.py names what is wrong with it
    if "role" not in message and "from" in message:
        speaker, value = message["from"], message.get("value")
        if speaker not in SHAREGPT_ROLES:
            return None, f'has "from": {speaker!r}; expected one of {sorted(SHAREGPT_ROLES)}'
        if speaker == "function_call":
            calls, reason = tool_calls_of(value)
            return {"role": "assistant", "content": "", "tool_calls": calls}, reason
        return {"role": SHAREGPT_ROLES[speaker], "content": value}, None
    content, reason = content_text(message.get("content"))
    if reason is not None or content is message.get("content"):
        return message, reason
    return {**message, "content": content}, None


def to_messages(value, role: str | None = None) -> tuple[object, str | None]:
    """Messages from any of the forms a field holds them in: a list of messages, or the column-wise dict
    ({"role": [...], "content": [...]}) of a datasets Sequence feature; where a layout lets a field hold one turn
    (`role` given: TRL's prompts and answers, ShareGPT's preference answers), also a plain string or one message.
    Returns the value itself when nothing changes; a value of another type is left for schema.py to name."""
    if isinstance(value, str) and role is not None:
        return [{"role": role, "content": value}], None
    if isinstance(value, dict):
        columns = list(value.values())
        if columns and all(isinstance(column, list) and len(column) == len(columns[0]) for column in columns):
            value = [dict(zip(value, row)) for row in zip(*columns)]
        elif role is not None:
            value = [value]
    if not isinstance(value, list):
        return value, None
    converted = []
    for i, message in enumerate(value):
        message, reason = convert_message(message)
        if reason is not None:
            return None, f"message {i} {reason}"
        converted.append(message)
    return (value if all(a is b for a, b in zip(converted, value)) else converted), None


def tool_schemas(tools):
    """A record-level "tools" field (OpenAI/TRL: a list; LLaMA-Factory's ShareGPT: a JSON string, often "") as
    MiniMind's "functions", or None when it names no tool. A string that is not JSON is kept for schema.py to name."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except ValueError:
            return tools
    return tools or None


def with_system_and_tools(messages, system, tools) -> tuple[object, str | None]:
    """Fold record-level "system" and "tools" fields into the conversation, where MiniMind keeps them: a first
    system message, carrying the tool schemas in its "functions". Tools without a system prompt go in a system
    message with null content, which the chat template is not shown (schema.py, chat.template_inputs)."""
    if system is not None and not isinstance(system, str):
        return None, f'"system" must be a string, got {json_type(system)}'
    tools = tool_schemas(tools)
    if not isinstance(messages, list) or not (system or tools):
        return messages, None
    has_system = bool(messages) and isinstance(messages[0], dict) and messages[0].get("role") == "system"
    if system and not has_system:
        messages, has_system = [{"role": "system", "content": system}, *messages], True
    if tools and has_system and not messages[0].get("functions"):
        messages = [{**messages[0], "functions": tools}, *messages[1:]]
    elif tools and not has_system:
        messages = [{"role": "system", "content": None, "functions": tools}, *messages]
    return messages, None


def rest_of(record: dict, used: tuple) -> dict:
    """The fields a conversion did not consume: GRPO hands them to reward functions (e.g. "answer")."""
    return {key: value for key, value in record.items() if key not in used}


# ================================================================================================ layouts


def from_conversations(record: dict, key: str = "conversations") -> tuple[dict, str | None]:
    """MiniMind's and ShareGPT's {"conversations": [...]}, OpenAI/TRL's {"messages": [...]} (key "messages"), with
    optional record-level "system" and "tools"."""
    if key not in record:
        return record, f'missing the "{key}" field'
    messages, reason = to_messages(record[key])
    if reason is None:
        messages, reason = with_system_and_tools(messages, record.get("system"), record.get("tools"))
    if reason is not None:
        return record, reason
    if key == "conversations" and messages is record[key]:
        return record, None  # MiniMind's own: untouched
    return {**rest_of(record, (key, "system", "tools")), "conversations": messages}, None


def from_prompt(record: dict, completion: bool) -> tuple[dict, str | None]:
    """TRL's {"prompt": ...} (GRPO) and {"prompt": ..., "completion": ...} (SFT), each a string or messages."""
    used = ("prompt", "completion", "system", "tools") if completion else ("prompt", "system", "tools")
    for field in used[:2 if completion else 1]:
        if field not in record:
            return record, f'missing the "{field}" field'
    messages = []
    for field, role in (("prompt", "user"), ("completion", "assistant"))[:2 if completion else 1]:
        turns, reason = to_messages(record[field], role)
        if reason is not None:
            return record, f"{field}: {reason}"
        if not isinstance(turns, list):
            return record, f'"{field}" must be a string or a list of messages, got {json_type(turns)}'
        messages += turns
    messages, reason = with_system_and_tools(messages, record.get("system"), record.get("tools"))
    return {**rest_of(record, used), "conversations": messages}, reason


def from_alpaca(record: dict, kind: str) -> tuple[dict, str | None]:
    """Alpaca's {"instruction", "input", "output"} (plus LLaMA-Factory's optional "system" and "history" of
    [question, answer] pairs): the instruction and input make one user turn, joined by a newline as LLaMA-Factory
    does; the output is the reply (a GRPO prompt may have none; if it has one it is the reference answer, dropped
    from the prompt as MiniMind's rlaif files' last turn is)."""
    fields = {"instruction": True, "input": False, "output": kind == "sft", "system": False}
    for field, required in fields.items():
        value = record.get(field)
        if value is None and required:
            return record, f'missing the "{field}" field'
        if value is not None and not isinstance(value, str):
            return record, f'"{field}" must be a string, got {json_type(value)}'
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(turn, (list, tuple)) and len(turn) == 2 and
                                                all(isinstance(text, str) for text in turn) for turn in history):
        return record, '"history" must be a list of [question, answer] string pairs'
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": "\n".join(text for text in (record["instruction"],
                                                                            record.get("input")) if text)})
    if record.get("output") is not None:
        messages.append({"role": "assistant", "content": record["output"]})
    return {**rest_of(record, ("instruction", "input", "output", "system", "history")), "conversations": messages}, None


def from_pair(record: dict) -> tuple[dict, str | None]:
    """Preference pairs. MiniMind's and TRL's implicit-prompt form: {"chosen": [messages], "rejected": [messages]}
    (the prompt is what both share). TRL's explicit-prompt form: {"prompt", "chosen", "rejected"}, each messages or
    a plain string (a prompt string is one user turn, an answer string one assistant turn). LLaMA-Factory's ShareGPT
    form: {"conversations": [...], "chosen": {message}, "rejected": {message}}. As in TRL, a prompt string beside
    conversational answers is not prepended: those hold it already."""
    prompt_field = "prompt" if "prompt" in record else "conversations" if "conversations" in record else None
    sides = [side for side in ("chosen", "rejected") if side in record]
    if prompt_field == "prompt" and isinstance(record["prompt"], str) and sides and \
            all(isinstance(record[side], list) for side in sides):
        # whole conversations beside a prompt string (HuggingFaceH4/ultrafeedback_binarized): the prompt is already
        # in them, so it is read as TRL reads it, from the conversations
        prompt_field = None
    if prompt_field is None:
        if any(isinstance(record[side], str) for side in sides):
            return record, ('plain-text "chosen" and "rejected" need a "prompt" field (TRL\'s implicit-prompt '
                            'plain text cannot be split into prompt and answer)')
        converted = {}
        for side in sides:
            converted[side], reason = to_messages(record[side])
            if reason is not None:
                return record, f"{side}: {reason}"
        if all(converted[side] is record[side] for side in sides):
            return record, None  # MiniMind's own: untouched
        return {**record, **converted}, None
    prompt, reason = to_messages(record[prompt_field], "user")
    if reason is None:
        prompt, reason = with_system_and_tools(prompt, record.get("system"), record.get("tools"))
    if reason is not None:
        return record, f"{prompt_field}: {reason}"
    if not isinstance(prompt, list):
        return record, f'"{prompt_field}" must be a string or a list of messages, got {json_type(prompt)}'
    converted = {}
    for side in sides:
        answer, reason = to_messages(record[side], "assistant")
        if reason is not None:
            return record, f"{side}: {reason}"
        converted[side] = prompt + answer if isinstance(answer, list) else answer
    return {**rest_of(record, (prompt_field, "system", "tools")), **converted}, None


def convert(record: dict, kind: str, layout: str) -> tuple[dict, str | None]:
    """A record of `layout` in MiniMind's form for stage `kind`, or (record, why it cannot be)."""
    if layout == "text":
        return record, None
    if layout in ("conversations", "messages"):
        return from_conversations(record, layout)
    if layout in ("prompt", "prompt_completion"):
        return from_prompt(record, completion=layout == "prompt_completion")
    if layout == "alpaca":
        return from_alpaca(record, kind)
    if layout == "pair":
        return from_pair(record)
    raise ValueError(f"unknown layout {layout!r}")


def layout_of(record: dict, kind: str) -> str | None:
    return next((name for name, fields, _ in LAYOUTS[kind] if all(field in record for field in fields)), None)


def format_error(path: str, kind: str, record: dict, where: str) -> BadInput:
    """The one-line error of a file in a layout `kind` does not read: what it holds (`where`: the record whose
    fields are shown), what was expected, and which stage's data it looks like."""
    expected = ", ".join(description for _, _, description in LAYOUTS[kind])
    other = next((STAGES[stage] for stage in LAYOUTS if stage != kind and layout_of(record, stage)), None)
    looks = f" (it looks like {other} data)" if other else ""
    fields = sorted(record)
    shown = fields if len(fields) <= 20 else fields[:20] + [f"... {len(fields) - 20} more"]
    return BadInput(f"{path}: not {STAGES[kind]} data: {where} has the fields {shown}{looks}; expected {expected}")


# ================================================================================================ files


def container_of(path: str) -> str:
    """ "jsonl", "json" (an array of records), "parquet", "datasets" (a save_to_disk folder) or "txt"."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_dict.json")):
            with open(os.path.join(path, "dataset_dict.json")) as f:
                splits = json.load(f).get("splits", [])
            example = os.path.join(path, splits[0]) if splits else os.path.join(path, "train")
            raise BadInput(f"{path}: a datasets DatasetDict with the splits {splits}; pass one split's folder, e.g. "
                           f"{example} (and --val_data_path another)")
        if os.path.exists(os.path.join(path, "state.json")):
            return "datasets"
        raise BadInput(f"{path}: a folder but not a datasets save_to_disk folder (it has no state.json); expected "
                       f"{SUPPORTED}")
    extension = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if extension == ".parquet" or head.startswith(b"PAR1"):
        return "parquet"
    if extension == ".txt":
        return "txt"
    if extension in UNSUPPORTED:
        raise BadInput(f"{path}: {extension} files are not read; expected {SUPPORTED}")
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if text[:1] == b"[" and extension not in JSONL_EXTENSIONS:
        return "json"
    if text[:1] == b"{" and extension == ".json" and b"\n" in text and parse_line(text.split(b"\n", 1)[0])[1]:
        one_object(path)  # a first line that is not a whole object: pretty-printed JSON, not JSON lines
    return "jsonl"


def one_object(path: str):
    """Refuse a .json file holding one JSON object spread over lines: read as JSON lines, every line would be bad."""
    try:
        with open(path, "rb") as f:
            value = json.loads(decode_line(f.read()))
    except (ValueError, RecursionError):
        return  # not one object either: reading names its bad lines
    if isinstance(value, dict):
        raise BadInput(f"{path}: one JSON object (with the fields {sorted(value)[:10]}); expected a JSON array of "
                       f"records or one record per line (JSON lines)")


def load_json_array(path: str) -> list:
    """The records of a JSON array file: unlike a JSON lines file, one syntax error spoils all of it, so it is one
    error without a --skip_bad_lines hint."""
    try:
        with open(path, "rb") as f:
            records = json.loads(decode_line(f.read()))
    except UnicodeDecodeError as error:
        raise BadInput(f"{path}: not valid UTF-8 ({error})") from None
    except (ValueError, RecursionError) as error:
        raise BadInput(f"{path}: not a valid JSON array of records ({error})") from None
    if not isinstance(records, list):
        raise BadInput(f"{path}: expected a JSON array of records, got {json_type(records)}")
    return records


def load_dataset_folder(path: str):
    from datasets import load_from_disk  # only here: importing datasets takes a second
    try:
        return load_from_disk(path)
    except Exception as error:  # noqa: BLE001 - whatever datasets raises, it is this folder's error
        raise BadInput(f"{path}: datasets cannot load this folder ({type(error).__name__}: {error})") from None


@dataclass(frozen=True)
class Source:
    """A data file (or folder) opened for one stage: where its records are and how to turn each into MiniMind's
    form. Plain strings only, so it travels to the tokenizing workers."""
    path: str
    kind: str  # "pretrain", "sft", "dpo" or "grpo"
    container: str  # see container_of
    layout: str  # see LAYOUTS

    @property
    def unit(self) -> str:
        """What errors and counts call a record: a "line" of a text file, else a "record"."""
        return "line" if self.container in ("jsonl", "txt") else "record"

    def nbytes(self) -> int:
        if self.container != "datasets":
            return os.path.getsize(self.path)
        return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(self.path)
                   for name in files)

    def progress_total(self) -> int | None:
        """The progress bar's total: bytes of a text file, records of the others (None where only reading all of it
        would tell)."""
        if self.unit == "line":
            return os.path.getsize(self.path)
        if self.container == "parquet":
            import pyarrow.parquet as pq
            return pq.ParquetFile(self.path).metadata.num_rows
        if self.container == "datasets":
            return len(load_dataset_folder(self.path))
        return None

    def payloads(self, on_progress=None):
        """Yield (line or record number, payload): a text file's raw line (bytes: parsed by `prepare`, in the
        tokenizing workers) or a record of the others. `on_progress(n)` counts bytes or records."""
        if self.unit == "line":
            yield from iter_lines(self.path, on_progress)
            return
        for number, record in enumerate(self._records()):
            if on_progress is not None:
                on_progress(1)
            yield number, record

    def _records(self):
        if self.container == "json":
            yield from load_json_array(self.path)
        elif self.container == "parquet":
            import pyarrow.parquet as pq
            try:
                parquet = pq.ParquetFile(self.path)
            except Exception as error:  # noqa: BLE001 - pyarrow's errors differ by version; all mean unreadable
                raise BadInput(f"{self.path}: not a readable parquet file ({type(error).__name__}: {error})") from None
            for batch in parquet.iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        else:  # datasets
            for batch in load_dataset_folder(self.path).iter(batch_size=1024):
                yield from (dict(zip(batch, row)) for row in zip(*batch.values()))

    def parse(self, payload) -> tuple[object, str | None]:
        if self.container == "jsonl":
            return parse_line(payload)
        if self.container == "txt":
            try:
                return {"text": decode_line(payload).rstrip("\r\n")}, None
            except UnicodeDecodeError as error:
                return None, f"not valid UTF-8 ({error})"
        if not isinstance(payload, dict):
            return payload, f"expected an object, got {json_type(payload)}"
        return payload, None

    def prepare(self, payload) -> tuple[dict | None, str | None]:
        """(record in MiniMind's form, None), or (None, why not) for a bad one."""
        record, reason = self.parse(payload)
        if reason is None:
            record, reason = convert(record, self.kind, self.layout)
        if reason is None:
            reason = CHECKS[self.kind](record)
        return (None, reason) if reason is not None else (record, None)

    def records(self, skip_bad_lines: bool = False, stats: dict | None = None, on_progress=None):
        """Yield (number, record in MiniMind's form), checked by schema.py. A bad record is an error naming it, or
        with skip_bad_lines is skipped and counted in stats."""
        for number, payload in self.payloads(on_progress):
            if stats is not None:
                stats["lines"] = stats.get("lines", 0) + 1
            record, reason = self.prepare(payload)
            if reason is not None:
                note_bad_line(self.path, number, reason, skip_bad_lines, stats, self.unit)
                continue
            yield number, record


def open_source(path: str, kind: str, skip_bad_lines: bool = False) -> Source:
    """Open a data file or folder for stage `kind`: its container from its name and first bytes, its layout from
    its first record. A file no layout of `kind` fits is one error naming it and the layouts expected."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise BadInput(f"{path}: the file is empty")
    container = container_of(path)
    if container == "txt":
        if kind != "pretrain":
            raise BadInput(f"{path}: a .txt file is plain text, which only pretraining reads; {STAGES[kind]} data "
                           f"must be {', '.join(description for _, _, description in LAYOUTS[kind])}")
        return Source(path, kind, container, "text")
    probe = Source(path, kind, container, LAYOUTS[kind][0][0])
    first, seen, opening = None, 0, None
    payloads = probe.payloads()
    try:
        for number, payload in payloads:
            opening = number if opening is None else opening
            record, _ = probe.parse(payload)
            if not isinstance(record, dict):
                continue  # a line that is not an object says nothing of the layout; reading reports it
            layout = layout_of(record, kind)
            if layout is not None:
                return Source(path, kind, container, layout)
            first = first or (record, number)
            seen += 1
            if not skip_bad_lines or seen >= DETECT_LIMIT:
                break
    finally:
        payloads.close()
    if first is None:  # no record at all: reading says so (blank, or every line bad)
        return probe
    record, number = first
    if seen > 1:
        where = f"none of its first {seen} records fits; {probe.unit} {number}"
    else:
        where = f"its first {probe.unit}" if number == opening else f"its first record ({probe.unit} {number})"
    raise format_error(path, kind, record, where)
