"""What a line of each data format must hold, checked in one place. Every trainer's reader and clean_data use these
checks, so cleaning keeps exactly what training accepts and training never meets a line it cannot render. Each
check returns why a line cannot be used, or None.

The chat rules are what the chat template (model/tokenizer_config.json) can render. It concatenates strings, so
every message needs a role among ROLES and a string "content"; an assistant message may have tool calls instead of
content (OpenAI's `"content": null`), a string "reasoning_content", and "tool_calls", a list of {name, arguments}
objects, bare or under "function". MiniMind's tool schemas sit in the first (system) message's "functions" field,
as a list or as its JSON string; a system message that only carries them has `"content": null` (tools without a
system prompt: how formats.py keeps OpenAI's record-level "tools"; the chat template is not shown that message).

Other formats (OpenAI/TRL messages, ShareGPT, Alpaca, parquet, ...) are turned into these by formats.py first."""
import json

ROLES = ("system", "user", "assistant", "tool")


def json_type(value) -> str:
    """A value's type as the JSON file spells it, for messages about the file."""
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def check_text(obj: dict, field: str = "text") -> str | None:
    """A pretraining line: {"text": "..."}."""
    if field not in obj:
        return f'missing the "{field}" field'
    if not isinstance(obj[field], str):
        return f'"{field}" must be a string, got {json_type(obj[field])}'
    return None


def check_tool_call(call) -> str | None:
    if isinstance(call, dict) and call.get("function"):  # OpenAI's {"type": "function", "function": {...}}
        call = call["function"]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
        return "each tool call must be an object with a string \"name\" and \"arguments\""
    return None


def check_message(i: int, message) -> str | None:
    if not isinstance(message, dict):
        return f"message {i} is not an object"
    role = message.get("role")
    if role not in ROLES:
        return f"message {i} has role {role!r}; expected one of {sorted(ROLES)}"
    content = message.get("content")
    calls_only = role == "assistant" and content is None and message.get("tool_calls")
    tools_only = role == "system" and i == 0 and content is None and message.get("functions")
    if not isinstance(content, str) and not calls_only and not tools_only:
        if "content" not in message:
            return f'message {i} ({role}) has no "content"'
        return f'message {i} ({role}) needs a string "content", got {json_type(content)}'
    if role != "assistant":  # the template reads the fields below on assistant messages only
        return None
    reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        return f'message {i}: "reasoning_content" must be a string, got {json_type(reasoning)}'
    calls = message.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        return f'message {i}: "tool_calls" must be a list, got {json_type(calls)}'
    for call in calls or []:
        reason = check_tool_call(call)
        if reason:
            return f"message {i}: {reason}"
    return None


def check_messages(messages) -> str | None:
    """A conversation the template can render: a non-empty list of good messages, with usable tool schemas."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else json_type(messages)
        return f"a conversation must be a non-empty list of messages, got {got}"
    for i, message in enumerate(messages):
        reason = check_message(i, message)
        if reason:
            return reason
    tools = messages[0].get("functions") if messages[0]["role"] == "system" else None
    if tools and isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            return 'the system message\'s "functions" is a string but not JSON'
    if tools and not (isinstance(tools, list) and all(isinstance(tool, dict) for tool in tools)):
        return 'the system message\'s "functions" must be a list of tool schemas (objects)'
    return None


def check_chat(obj: dict) -> str | None:
    """An SFT line (also LoRA, distillation, reasoning): {"conversations": [...]} with a reply to learn."""
    if "conversations" not in obj:
        return 'missing the "conversations" field'
    reason = check_messages(obj["conversations"])
    if reason:
        return reason
    if not any(m["role"] == "assistant" for m in obj["conversations"]):
        return "no assistant message to learn from"
    return None


def prompt_of(messages: list[dict]) -> list[dict]:
    """The prompt of a conversation: all of it but a final assistant turn (the reference answer in MiniMind's rlaif
    files, and what DPO's two sides differ in)."""
    return messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages


def check_prompt(obj: dict) -> str | None:
    """A GRPO line: {"conversations": [...], ...} whose prompt (a final assistant turn dropped) asks for a reply."""
    if "conversations" not in obj:
        return 'missing the "conversations" field'
    reason = check_messages(obj["conversations"])
    if reason:
        return reason
    prompt = prompt_of(obj["conversations"])
    if not prompt:
        return "no prompt: the only message is the assistant's"
    if prompt[-1]["role"] not in ("user", "tool"):
        return f"the prompt must end with a user or tool message, not {prompt[-1]['role']!r}"
    return None


def check_pair(obj: dict) -> str | None:
    """A DPO line: {"chosen": [...], "rejected": [...]}, each ending with the assistant's answer, same prompt."""
    for side in ("chosen", "rejected"):
        if side not in obj:
            return f'missing the "{side}" field'
        reason = check_messages(obj[side])
        if reason:
            return f"{side}: {reason}"
        if obj[side][-1]["role"] != "assistant":
            return f"{side}: the last message must be the assistant's answer"
    if prompt_of(obj["chosen"]) != prompt_of(obj["rejected"]):
        return "chosen and rejected have different prompts (all turns before the last assistant turn must match)"
    return None
