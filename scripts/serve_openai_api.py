"""An OpenAI-compatible HTTP server for TinyMind checkpoints (FastAPI + uvicorn), plus the web chat page.

    python -m scripts.serve_openai_api                                   # out/full_sft_<hidden>.pth on 127.0.0.1:8998
    python -m scripts.serve_openai_api --weight full_sft dpo reason      # several checkpoints, chosen per request
    python -m scripts.serve_openai_api --load_from export/tinymind --port 8000 --api_key sk-local

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8998/v1", api_key="sk-local")
    client.chat.completions.create(model="full_sft_512", messages=[{"role": "user", "content": "你好"}], stream=True)

Endpoints: POST /v1/chat/completions and POST /v1/completions (each streamed as server-sent events ending with
`data: [DONE]`, or one JSON answer), GET /v1/models, GET /health, and GET / (the chat page in scripts/web/index.html).
Sampling fields: temperature (0 = greedy), top_p, max_tokens (or max_completion_tokens), stop, seed, and the
common extensions top_k and repetition_penalty. Every bad request gets a 4xx with an OpenAI-style JSON error body
naming the field: wrong JSON types are refused, not coerced, and every number is range-checked. A parameter the
server cannot honour (n > 1, penalties, logit_bias, JSON response formats, echo, ...) is a 400 that says so, never
silently ignored. A body over --max_request_bytes is a 413 (sent with Content-Length or chunked), one slower than
--body_timeout a 408. A stream that fails after its 200 header reports an error event ({"error": {...}}), then
`data: [DONE]`.

Tool calling: a request's `tools` are rendered by the chat template exactly as SFT renders MiniMind's `functions`,
and each <tool_call>{"name": ..., "arguments": ...}</tool_call> block the model writes comes back as a `tool_calls`
entry (finish_reason "tool_calls"), streamed too. Assistant messages with tool_calls (content null) and `tool`
messages are accepted. tool_choice: "auto" (the default) or "none". logprobs / top_logprobs (chat) and logprobs
(completions) report the model's own distribution, before temperature, top-k/top-p and the repetition penalty.

One model runs at a time: requests wait in arrival order for a lock around generation, so concurrent clients
never share a forward pass or a random-number stream, and each gets exactly its own tokens. On a CPU that is also
the fastest schedule (one generation already uses every core). --max_queue bounds the waiting line: one request
generating plus max_queue waiting are admitted, every request beyond gets a 503. A client that disconnects, streamed
or not, waiting or generating, is dropped: its generation stops at the next decode step and its place is freed.
Pretrain checkpoints continue text: a completion's prompt, or a chat request's newest message (the chat page
can then show what a base model does); every other stage answers chats through the chat template.
"""
import argparse
import asyncio
import codecs
import contextlib
import json
import os
import secrets
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import anyio
import torch
from fastapi import Depends, FastAPI, Request
from jinja2.exceptions import TemplateError
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.inference import (CountingStreamer, GenerationStream, LoadedModel, build_prompt, default_generation_config,
                             discover_checkpoints, encode_prompt, load_model_for_inference)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WEB_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "index.html")


@dataclass
class Limits:
    """What one request may ask for. Bounded inputs keep one client from tying up the server or its memory."""
    max_messages: int = 64  # also the prompts of one /v1/completions request
    max_message_chars: int = 16_000
    max_total_chars: int = 64_000
    max_request_bytes: int = 1_000_000
    body_timeout: float = 30.0  # seconds for a whole request body to arrive
    max_stop_sequences: int = 4
    max_stop_chars: int = 64
    default_max_tokens: int = 512
    max_queue: int = 16


# OpenAI's own defaults and bounds: completion clients rely on 16 tokens when they send no max_tokens, and 20 is
# the most alternatives OpenAI reports per token.
COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_TOP_LOGPROBS = 20
# Real tool schemas nest a few levels; rendering one nested hundreds deep would exhaust Python's recursion limit.
MAX_TOOL_DEPTH = 64
# What OpenAI reports for a token too unlikely to be worth a number; also keeps -inf (JSON has none) out of answers.
MIN_LOGPROB = -9999.0


class APIError(Exception):
    """Becomes an OpenAI-style error response: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.error_type = status, message, param, code, error_type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


# ================================================================================================ request schema


# Below this a temperature is greedy decoding in all but name, and dividing the logits by it overflows to inf.
MIN_TEMPERATURE = 1e-4


class StrictModel(BaseModel):
    # A wrong JSON type is a 400, as with OpenAI, instead of a silent coercion ("5" -> 5, true -> 1, "yes" -> True).
    # An integer still passes where a number is expected. Unknown fields (user, metadata, ...) are accepted, unused.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str
    arguments: str  # a JSON text, as OpenAI sends it; rendered into the prompt as it is


class ToolCall(StrictModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Missing or null is allowed only beside tool_calls (Server.chat_messages says so for every other message).
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None  # the template shows tool results in order; the id is not rendered

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(StrictModel):
    include_usage: bool | None = False


class ResponseFormat(StrictModel):
    type: str


class SamplingRequest(StrictModel):
    """What chat and completion requests share."""
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=10_000)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)  # a tinier one overflows the logits too
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False  # null is allowed wherever OpenAI's API allows it, and means the default
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1)
    seed: int | None = Field(None, ge=-2 ** 63, le=2 ** 64 - 1)  # what torch.manual_seed accepts
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict] | None = None  # checked field by field in Server.tool_schemas, then rendered as sent
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    functions: list | None = None  # OpenAI's deprecated form of tools: refused with a pointer to `tools`
    function_call: str | dict | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # here: how many alternatives per token
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


# ================================================================================================ answers


def held_prefix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker` (to hold back until the next
    piece shows whether they are)."""
    return max((k for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)


class StopFilter:
    """Cuts the streamed text at the first stop sequence. Text that might be the start of a stop sequence is held
    back until the next piece shows whether it is one, so a client never sees part of a stop sequence."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.stopped = stops, "", False

    def feed(self, piece: str) -> str:
        self.pending += piece
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        hold = max((held_prefix(self.pending, s) for s in self.stops), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def parse_tool_call(body: str) -> dict | None:
    """The OpenAI tool call a <tool_call> block's JSON stands for, or None if it is not {"name": ..., ...}."""
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: brackets nested thousands deep
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = call.get("arguments", {})
    # OpenAI sends arguments as a JSON text; a model that wrote a string has already written one
    arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": arguments}}


class ToolCallParser:
    """Splits a streamed answer into text and tool calls. Each <tool_call>{"name": ..., "arguments": ...}</tool_call>
    block, the form the chat template and MiniMind's SFT data teach, becomes a ("call", {...}) event; everything
    else is ("text", ...) as the model wrote it, a block that is not such JSON or that max_tokens cut off included.
    The line breaks the template puts around calls are not content: whitespace next to a call is dropped (and held
    back until it is known whether a call comes), so an answer without calls comes out exactly as written."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, max_calls: int | None = None):
        self.buffer, self.inside, self.space, self.after_call = "", False, "", False
        self.calls, self.max_calls = 0, max_calls

    def feed(self, text: str) -> list[tuple[str, object]]:
        self.buffer += text
        events = []
        while True:
            if self.inside:
                end = self.buffer.find(self.CLOSE)
                if end < 0:
                    return events
                body, self.buffer, self.inside = self.buffer[:end], self.buffer[end + len(self.CLOSE):], False
                call = parse_tool_call(body)
                if call is None:
                    self.text(self.OPEN + body + self.CLOSE, events)
                    continue
                self.space, self.after_call = "", True
                if self.max_calls is None or self.calls < self.max_calls:  # parallel_tool_calls false: the first
                    events.append(("call", call))
                self.calls += 1
            else:
                start = self.buffer.find(self.OPEN)
                if start < 0:
                    keep = len(self.buffer) - held_prefix(self.buffer, self.OPEN)
                    self.text(self.buffer[:keep], events)
                    self.buffer = self.buffer[keep:]
                    return events
                self.text(self.buffer[:start], events)
                self.buffer, self.inside = self.buffer[start + len(self.OPEN):], True

    def finish(self) -> list[tuple[str, object]]:
        events = []
        self.text((self.OPEN if self.inside else "") + self.buffer, events)
        if self.space and not self.calls:
            events.append(("text", self.space))
        self.buffer, self.inside, self.space = "", False, ""
        return events

    def text(self, text: str, events: list):
        if self.after_call:
            text = text.lstrip()
            if not text:
                return
            self.after_call = False
        text = self.space + text
        body = text.rstrip()
        self.space = text[len(body):]
        if body:
            events.append(("text", body))


def gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE vocabularies (GPT-2's, ours, Qwen's) spell each byte as a printable character; this maps the
    characters back to bytes, so a token that is half of a UTF-8 character still has exact bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


BYTE_DECODER = gpt2_byte_decoder()


@dataclass
class TokenLogprob:
    token: bytes
    logprob: float
    top: list[tuple[bytes, float]] = field(default_factory=list)


def token_text(raw: bytes) -> str:
    """A token as text; bytes that are not a whole UTF-8 character are written \\xNN (the `bytes` field is exact)."""
    return raw.decode("utf-8", errors="backslashreplace")


class LogprobAligner:
    """Hands out each token's logprob entry once text it spells has gone to the client: a stop sequence then cuts
    the entries where it cuts the text, and a streamed chunk carries the entries of its own text."""

    def __init__(self):
        self.pending, self.end, self.released = deque(), 0, 0  # (start byte, entry); byte counts

    def add(self, entries: list[TokenLogprob]):
        for entry in entries:
            self.pending.append((self.end, entry))
            self.end += len(entry.token)

    def release(self, text: str) -> list[TokenLogprob]:
        self.released += len(text.encode("utf-8", errors="replace"))
        out = []
        while self.pending and self.pending[0][0] < self.released:
            out.append(self.pending.popleft()[1])
        return out

    def rest(self) -> list[TokenLogprob]:
        out = [entry for _, entry in self.pending]
        self.pending.clear()
        return out


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    return {"content": [{"token": token_text(e.token), "logprob": e.logprob, "bytes": list(e.token),
                         "top_logprobs": [{"token": token_text(t), "logprob": lp, "bytes": list(t)} for t, lp in e.top]}
                        for e in entries], "refusal": None}


class CompletionLogprobs:
    """OpenAI's legacy completion shape: parallel lists tokens, token_logprobs, top_logprobs ({token: logprob}) and
    text_offset (each token's first character in the completion's text), continued across streamed chunks."""

    def __init__(self, alternatives: int):
        self.alternatives, self.chars = alternatives, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def shape(self, entries: list[TokenLogprob]) -> dict:
        offsets = []
        for entry in entries:
            offsets.append(self.chars)
            self.chars += len(self.decoder.decode(entry.token))
        return {"tokens": [token_text(e.token) for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{token_text(t): lp for t, lp in e.top} for e in entries] if self.alternatives
                else None, "text_offset": offsets}


# ================================================================================================ generation


class TokenStreamer(CountingStreamer):
    """CountingStreamer whose queue carries (text, [TokenLogprob]) pairs: each piece of text with the tokens that
    arrived since the last piece. With `top_logprobs` set, a forward hook (see_logits) keeps each step's log-softmax
    of the raw logits, so the logprobs are the model's own distribution, before temperature, top-k/top-p and the
    repetition penalty (as vLLM reports them by default)."""

    def __init__(self, tokenizer, top_logprobs: int | None = None):
        super().__init__(tokenizer)
        self.top_logprobs, self.entries, self.step_logprobs = top_logprobs, [], None
        self.special_ids = set(tokenizer.all_special_ids)  # dropped from the text, so from the logprobs too
        self.added = {i: token.content for i, token in tokenizer.added_tokens_decoder.items()}

    def see_logits(self, module, args, output):
        logprobs = torch.log_softmax(output.logits[0, -1].float(), dim=-1)
        self.step_logprobs = logprobs.nan_to_num(MIN_LOGPROB, MIN_LOGPROB, MIN_LOGPROB).clamp(min=MIN_LOGPROB)

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece and all(char in BYTE_DECODER for char in piece):
            return bytes(BYTE_DECODER[char] for char in piece)
        return self.tokenizer.decode([token_id]).encode()  # not a byte-level vocabulary

    def put(self, value):
        if self.top_logprobs is not None and not self.next_tokens_are_prompt:
            for token in value.reshape(-1).tolist():
                if token not in self.special_ids:
                    self.entries.append(self.entry(token))
        super().put(value)

    def entry(self, token: int) -> TokenLogprob:
        logprobs, top = self.step_logprobs, []
        if self.top_logprobs:
            values, ids = torch.topk(logprobs, min(self.top_logprobs, logprobs.numel()))
            top = [(self.token_bytes(i), v) for i, v in zip(ids.tolist(), values.tolist())]
        return TokenLogprob(self.token_bytes(token), float(logprobs[token]), top)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        entries, self.entries = self.entries, []
        self.text_queue.put((text, entries), timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)


class ServedGeneration(GenerationStream):
    """A GenerationStream that yields (text, [TokenLogprob]) pairs: its setup, with a TokenStreamer (the base class
    takes no streamer), and the logits hook on the model while this generation runs (the lock makes it the only
    one)."""

    def __init__(self, loaded: LoadedModel, prompt: str, generation_config, top_logprobs: int | None = None):
        self.loaded, self.generation_config = loaded, generation_config
        self.input_ids = encode_prompt(loaded.tokenizer, prompt, loaded.device)
        self.prompt_tokens = self.input_ids.shape[1]
        self.cancel_event = threading.Event()
        self.streamer = TokenStreamer(loaded.tokenizer, top_logprobs)
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        hook = None
        if self.streamer.top_logprobs is not None:
            hook = self.loaded.model.register_forward_hook(self.streamer.see_logits)
        try:
            super()._run()
        finally:
            if hook is not None:
                hook.remove()


@dataclass
class Job:
    """One prompt to generate from (a chat request has one, a completion request one per prompt)."""
    prompt: str
    prompt_tokens: int
    generation_config: object


@dataclass
class PreparedRequest:
    loaded: LoadedModel
    jobs: list[Job]
    stops: list[str]
    seed: int | None
    top_logprobs: int | None = None  # None: no logprobs; k: each token's logprob and k alternatives
    tools: bool = False  # parse <tool_call> blocks out of the answer
    max_tool_calls: int | None = None


class Server:
    """The loaded models, the generation lock, admission and the request checks."""

    def __init__(self, models: list[LoadedModel], limits: Limits, api_key: str | None = None):
        self.models = {loaded.name: loaded for loaded in models}
        self.limits, self.api_key = limits, api_key
        self.lock = asyncio.Lock()  # FIFO: waiting requests are served in arrival order
        self.waiting = 0  # requests waiting for the lock right now (reported by /health)
        self.active = 0  # admitted and not finished: the one generating plus those waiting (bounded by admit())
        self.admission = threading.Lock()
        self.created = int(time.time())

    @contextlib.asynccontextmanager
    async def turn(self):
        """Wait in line for the model, counted in `waiting`, then hold it."""
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self.lock.release()

    def check_api_key(self, request: Request):
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", error_type="authentication_error")

    # Every check that can fail runs before any work starts (and before a stream sends its 200 header).

    def common_checks(self, request: SamplingRequest) -> tuple[LoadedModel, list[str]]:
        """The model and the stop sequences, after the checks chat and completion requests share."""
        limits = self.limits
        loaded = self.models.get(request.model)
        if loaded is None:
            raise APIError(404, f"model {request.model[:100]!r} not found; available: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        if request.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(request, name):
                raise APIError(400, f"{name} is not supported; use repetition_penalty", param=name)
        if request.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stops) > limits.max_stop_sequences or any(not s or len(s) > limits.max_stop_chars for s in stops):
            raise APIError(400, f"stop: at most {limits.max_stop_sequences} non-empty sequences of up to "
                                f"{limits.max_stop_chars} characters", param="stop")
        for stop in stops:
            check_unicode(stop, "stop")
        return loaded, stops

    def job(self, loaded: LoadedModel, prompt: str, request: SamplingRequest, asked: int | None,
            default_max_tokens: int, param: str) -> Job:
        """A prompt that fits the context with the tokens asked for, and its generation settings."""
        prompt_tokens = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        context = loaded.context_length
        room = context - prompt_tokens
        if room < 1 or (asked is not None and asked > room):
            raise APIError(400, f"this model's maximum context length is {context} tokens; the {param} take "
                                f"{prompt_tokens} and {asked or 1} more were requested", param=param,
                           code="context_length_exceeded")
        temperature = request.temperature
        if temperature is not None and temperature < MIN_TEMPERATURE:
            temperature = 0
        config = default_generation_config(
            loaded.tokenizer, temperature=temperature, top_p=request.top_p, top_k=request.top_k,
            repetition_penalty=request.repetition_penalty, max_new_tokens=asked or min(default_max_tokens, room))
        return Job(prompt, prompt_tokens, config)

    def prepare(self, request: ChatCompletionRequest) -> PreparedRequest:
        loaded, stops = self.common_checks(request)
        if request.functions or request.function_call is not None:
            param = "functions" if request.functions else "function_call"
            raise APIError(400, "functions/function_call are OpenAI's deprecated form of tool calling; send `tools` "
                                "(and `tool_choice`) instead", param=param)
        if request.response_format is not None and request.response_format.type != "text":
            raise APIError(400, f"response_format {request.response_format.type!r} is not supported: only 'text' "
                                "(this server cannot constrain generation to JSON; ask for JSON in the prompt)",
                           param="response_format")
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        messages = self.chat_messages(request)
        tools = self.tool_schemas(request, loaded)
        chars = sum(len(m["content"]) + sum(len(c["function"]["name"]) + len(c["function"]["arguments"])
                                            for c in m.get("tool_calls", [])) for m in messages)
        if chars + (len(json.dumps(tools, ensure_ascii=False)) if tools else 0) > self.limits.max_total_chars:
            raise APIError(400, f"the messages and tools exceed {self.limits.max_total_chars} characters in total",
                           param="messages")
        try:
            prompt = build_prompt(loaded.tokenizer, messages, loaded.mode, **({"tools": tools} if tools else {}))
        except TemplateError as error:  # some chat templates refuse e.g. roles out of order
            message = f"the model's chat template refused these messages: {error}"
            raise APIError(400, message, param="messages") from None
        job = self.job(loaded, prompt, request, request.max_completion_tokens or request.max_tokens,
                       self.limits.default_max_tokens, "messages")
        return PreparedRequest(loaded, [job], stops, request.seed,
                               top_logprobs=(request.top_logprobs or 0) if request.logprobs else None,
                               tools=bool(tools), max_tool_calls=1 if request.parallel_tool_calls is False else None)

    def chat_messages(self, request: ChatCompletionRequest) -> list[dict]:
        """The messages as the chat template (and SFT data) has them: developer is system, tool calls carry only
        their function, null content is ""."""
        limits = self.limits
        if len(request.messages) > limits.max_messages:
            raise APIError(400, f"too many messages: {len(request.messages)} > {limits.max_messages}",
                           param="messages")
        messages = []
        for i, m in enumerate(request.messages):
            if m.content is None and not (m.role == "assistant" and m.tool_calls):
                raise APIError(400, f"messages[{i}] ({m.role}) needs content: only an assistant message with "
                                    "tool_calls may have none", param=f"messages[{i}].content")
            if m.tool_calls and m.role != "assistant":
                raise APIError(400, f"messages[{i}]: only assistant messages carry tool_calls",
                               param=f"messages[{i}].tool_calls")
            message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if len(message["content"]) > limits.max_message_chars:
                raise APIError(400, f"messages[{i}] has {len(message['content'])} characters; the limit is "
                                    f"{limits.max_message_chars}", param=f"messages[{i}].content")
            check_unicode(message["content"], f"messages[{i}].content")
            if m.tool_calls:
                for j, call in enumerate(m.tool_calls):
                    check_unicode(call.function.name + call.function.arguments, f"messages[{i}].tool_calls[{j}]")
                message["tool_calls"] = [{"type": "function", "function": {"name": call.function.name,
                                                                            "arguments": call.function.arguments}}
                                         for call in m.tool_calls]
            messages.append(message)
        return messages

    def tool_schemas(self, request: ChatCompletionRequest, loaded: LoadedModel) -> list[dict] | None:
        """The request's tools, checked, in the form the template renders (OpenAI's, which is also the form of
        MiniMind's `functions`), or None when the answer must not call any."""
        choice = request.tool_choice
        if isinstance(choice, dict) or choice not in (None, "auto", "none"):
            shown = "a named function" if isinstance(choice, dict) else repr(choice)
            raise APIError(400, f"tool_choice {shown} is not supported: only 'auto' and 'none' (the model decides "
                                "whether to call a tool; it cannot be forced)", param="tool_choice")
        if not request.tools:
            return None
        for i, tool in enumerate(request.tools):
            function = tool.get("function")
            if tool.get("type") != "function":
                raise APIError(400, f"tools[{i}].type must be 'function'", param=f"tools[{i}].type")
            if not isinstance(function, dict):
                raise APIError(400, f"tools[{i}].function must be an object", param=f"tools[{i}].function")
            if not isinstance(function.get("name"), str) or not function["name"]:
                raise APIError(400, f"tools[{i}].function.name must be a non-empty string",
                               param=f"tools[{i}].function.name")
            for key, kind, name in (("description", str, "a string"), ("parameters", dict, "an object")):
                if function.get(key) is not None and not isinstance(function[key], kind):
                    raise APIError(400, f"tools[{i}].function.{key} must be {name}",
                                   param=f"tools[{i}].function.{key}")
            if nesting_depth(tool) > MAX_TOOL_DEPTH:  # the template renders schemas recursively
                raise APIError(400, f"tools[{i}] is nested more than {MAX_TOOL_DEPTH} levels deep", param=f"tools[{i}]")
        check_unicode(json.dumps(request.tools, ensure_ascii=False), "tools")
        if loaded.mode != "chat":
            raise APIError(400, f"{loaded.name} is a pretrained base model: it continues text and was never taught "
                                "to call tools; serve a chat checkpoint (full_sft, ...) for tools", param="tools")
        # "none": the tools are left out of the prompt too. A model trained on MiniMind's data calls a tool whenever
        # the prompt lists some, and its <tool_call> text would then end up in the answer.
        return None if choice == "none" else request.tools

    def prepare_completion(self, request: CompletionRequest) -> PreparedRequest:
        loaded, stops = self.common_checks(request)
        limits = self.limits
        if request.echo:
            raise APIError(400, "echo is not supported: the answer holds only the completion", param="echo")
        if request.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
        if request.best_of not in (None, 1):
            raise APIError(400, "only best_of=1 is supported", param="best_of")
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts or len(prompts) > limits.max_messages:
            raise APIError(400, f"prompt: a string or a list of 1 to {limits.max_messages} strings", param="prompt")
        for i, prompt in enumerate(prompts):
            param = "prompt" if isinstance(request.prompt, str) else f"prompt[{i}]"
            if len(prompt) > limits.max_message_chars:
                raise APIError(400, f"{param} has {len(prompt)} characters; the limit is {limits.max_message_chars}",
                               param=param)
            check_unicode(prompt, param)
        if sum(map(len, prompts)) > limits.max_total_chars:
            raise APIError(400, f"the prompts exceed {limits.max_total_chars} characters in total", param="prompt")
        # The prompt is text to continue, as a pretraining document is; those start with BOS (<|im_start|>), so
        # that comes first unless the prompt brings it (a prompt already in the chat template's form).
        bos = loaded.tokenizer.bos_token or ""
        jobs = [self.job(loaded, prompt if prompt.startswith(bos) else bos + prompt, request, request.max_tokens,
                         COMPLETION_DEFAULT_MAX_TOKENS, "prompt") for prompt in prompts]
        return PreparedRequest(loaded, jobs, stops, request.seed, top_logprobs=request.logprobs)

    def admit(self) -> "Ticket":
        """A place in line, or a 503. Checking and taking the place are one step under a lock, and the place is
        held until the request is over (a stream: until its last event is sent or its client leaves). Counting
        only the requests already waiting for the model let a burst slip past the limit: a stream starts waiting
        only after its 200 header is on the way."""
        with self.admission:
            if self.active > self.limits.max_queue:  # one generating + max_queue waiting
                raise APIError(503, f"server busy: {self.active - 1} requests are waiting; retry later",
                               code="server_busy", error_type="server_error")
            self.active += 1
        return Ticket(self)

    def start(self, prepared: PreparedRequest, job: Job) -> ServedGeneration:
        """Call with the lock held: the seed and the generation then belong to this request alone. The seed is set
        before every prompt, so a prompt's text does not depend on its place in a list of prompts."""
        if prepared.seed is not None:
            torch.manual_seed(prepared.seed)
        return ServedGeneration(prepared.loaded, job.prompt, job.generation_config, prepared.top_logprobs)


class Ticket:
    """A request's place in line (see Server.admit); release() gives it back, once however often it is called."""

    def __init__(self, server: Server):
        self.server, self.held = server, True

    def release(self):
        with self.server.admission:
            if self.held:
                self.held = False
                self.server.active -= 1


def nesting_depth(value) -> int:
    """How deeply lists and objects nest in a JSON value, counted without recursion (which a hostile value could
    exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


def check_unicode(text: str, param: str):
    """JSON can spell a lone UTF-16 surrogate (\\ud800) that no UTF-8 tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param} is not valid Unicode (it holds a lone surrogate)", param=param) from None


async def next_piece(iterator) -> tuple[str, list] | None:
    """The next (text, logprob entries), None at the end. A cancelled request (its client left) stops waiting at
    once; the worker thread it abandons returns as soon as finish() has stopped the generation."""
    return await anyio.to_thread.run_sync(next, iterator, None, abandon_on_cancel=True)


async def finish(stream: GenerationStream):
    """Stop the worker thread at its next decode step and wait for it, even while this request is being cancelled
    (client gone): the lock must not be released while the model is still generating."""
    stream.cancel()
    with anyio.CancelScope(shield=True):
        await run_in_threadpool(stream.join)


def generation_failed(request_id: str, error: Exception) -> APIError:
    print(f"generation failed for {request_id}: {error!r}", file=sys.stderr, flush=True)  # the log gets the cause
    return APIError(500, "generation failed", error_type="server_error")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Answer:
    """One prompt's generation as the client gets it. events() yields ("text", str, entries) and, when the request
    has tools, ("call", tool call, entries): stop sequences cut, logprob entries with the text they spell, tool
    calls parsed. Call with the lock held; afterwards finish_reason and completion_tokens are set."""

    def __init__(self, server: Server, prepared: PreparedRequest, job: Job):
        self.server, self.prepared, self.job = server, prepared, job
        self.finish_reason, self.completion_tokens = None, 0
        self.held_entries = []  # logprob entries whose text the parser still holds (e.g. inside a <tool_call>)

    async def events(self):
        prepared = self.prepared
        stop_filter, aligner = StopFilter(prepared.stops), LogprobAligner()
        parser = ToolCallParser(prepared.max_tool_calls) if prepared.tools else None
        stream = None
        try:
            stream = self.server.start(prepared, self.job)
            iterator = iter(stream)
            while not stop_filter.stopped:
                item = await next_piece(iterator)
                if item is None:
                    break
                text, entries = item
                aligner.add(entries)
                released = stop_filter.feed(text)
                for event in self.shape(parser, released, aligner.release(released)):
                    yield event
            tail = "" if stop_filter.stopped else stop_filter.flush()
            await finish(stream)  # new_tokens is final once the worker has stopped
            entries = aligner.release(tail) + ([] if stop_filter.stopped else aligner.rest())
            for event in self.shape(parser, tail, entries, last=True):
                yield event
            self.completion_tokens = stream.new_tokens
            if parser is not None and parser.calls:
                self.finish_reason = "tool_calls"
            else:
                self.finish_reason = "stop" if stop_filter.stopped else stream.finish_reason
        finally:
            if stream is not None:
                await finish(stream)

    def shape(self, parser: ToolCallParser | None, text: str, entries: list, last: bool = False) -> list[tuple]:
        self.held_entries += entries
        pieces = [("text", text)] if parser is None else parser.feed(text) + (parser.finish() if last else [])
        events = []
        for kind, value in pieces:
            if kind == "call" or value:
                events.append((kind, value, self.held_entries))
                self.held_entries = []
        if last and self.held_entries:
            events.append(("text", "", self.held_entries))
            self.held_entries = []
        return events


async def chat_answer(server: Server, prepared: PreparedRequest, request_id: str, created: int) -> dict:
    texts, calls, entries = [], [], []
    async with server.turn():
        answer = Answer(server, prepared, prepared.jobs[0])
        try:
            async with contextlib.aclosing(answer.events()) as events:
                async for kind, value, got in events:
                    (texts if kind == "text" else calls).append(value)
                    entries += got
        except Exception as error:  # noqa: BLE001 - a 500 for the client, the cause for the server log
            raise generation_failed(request_id, error) from None
    content = "".join(texts)
    message = {"role": "assistant", "content": content if content or not calls else None}
    if calls:
        message["tool_calls"] = calls
    logprobs = chat_logprobs(entries) if prepared.top_logprobs is not None else None
    return {"id": request_id, "object": "chat.completion", "created": created, "model": prepared.loaded.name,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": answer.finish_reason}],
            "usage": usage(prepared.jobs[0].prompt_tokens, answer.completion_tokens)}


async def completion_answer(server: Server, prepared: PreparedRequest, request_id: str, created: int) -> dict:
    choices, completion_tokens = [], 0
    async with server.turn():  # a list of prompts is one request: answered in one turn, in order
        for index, job in enumerate(prepared.jobs):
            answer, texts, entries = Answer(server, prepared, job), [], []
            try:
                async with contextlib.aclosing(answer.events()) as events:
                    async for _, text, got in events:
                        texts.append(text)
                        entries += got
            except Exception as error:  # noqa: BLE001 - a 500 for the client, the cause for the server log
                raise generation_failed(request_id, error) from None
            logprobs = None
            if prepared.top_logprobs is not None:
                logprobs = CompletionLogprobs(prepared.top_logprobs).shape(entries)
            choices.append({"index": index, "text": "".join(texts), "logprobs": logprobs,
                            "finish_reason": answer.finish_reason})
            completion_tokens += answer.completion_tokens
    return {"id": request_id, "object": "text_completion", "created": created, "model": prepared.loaded.name,
            "choices": choices, "usage": usage(sum(job.prompt_tokens for job in prepared.jobs), completion_tokens)}


async def cancel_on_disconnect(receive, work):
    """Await `work`, unless the client hangs up first: then cancel it and return None. StreamingResponse does the
    same for streams; without it a non-streamed answer was generated to the end for nobody, holding the model."""
    scope = anyio.CancelScope()

    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        with scope:
            return await work
        return None  # reached only when the client left
    finally:
        watcher.cancel()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def chat_events(server: Server, prepared: PreparedRequest, request_id: str, created: int,
                      include_usage: bool):
    """Server-sent events: a role chunk, content and tool-call chunks, a chunk with finish_reason, optionally a usage
    chunk, then [DONE]. An error after the 200 header can only be reported in the stream: an error event, then
    [DONE]. A tool call goes out whole, in one chunk, once its </tool_call> has arrived (OpenAI's delta format
    allows its arguments in any number of pieces)."""

    def chunk(delta: dict, finish_reason=None, entries=None) -> str:
        logprobs = chat_logprobs(entries or []) if prepared.top_logprobs is not None else None
        return sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": prepared.loaded.name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]})

    async with server.turn():
        answer, calls = Answer(server, prepared, prepared.jobs[0]), 0
        try:
            yield chunk({"role": "assistant", "content": ""})
            async with contextlib.aclosing(answer.events()) as events:
                async for kind, value, entries in events:
                    if kind == "text":
                        yield chunk({"content": value}, entries=entries)
                    else:
                        yield chunk({"tool_calls": [{"index": calls, **value}]}, entries=entries)
                        calls += 1
            yield chunk({}, answer.finish_reason)
            if include_usage:
                yield sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                           "model": prepared.loaded.name, "choices": [],
                           "usage": usage(prepared.jobs[0].prompt_tokens, answer.completion_tokens)})
        except Exception as error:  # noqa: BLE001 - an error event for the client, the cause for the server log
            yield sse(generation_failed(request_id, error).body())
    yield "data: [DONE]\n\n"


async def completion_events(server: Server, prepared: PreparedRequest, request_id: str, created: int,
                            include_usage: bool):
    """Server-sent events as OpenAI streams completions: text chunks of each prompt's choice (index i) in turn, a
    chunk with its finish_reason, optionally a usage chunk, then [DONE]; an error event, then [DONE], on failure."""

    def chunk(index: int, text: str, finish_reason=None, logprobs=None) -> str:
        return sse({"id": request_id, "object": "text_completion", "created": created, "model": prepared.loaded.name,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                 "finish_reason": finish_reason}]})

    async with server.turn():
        try:
            completion_tokens = 0
            for index, job in enumerate(prepared.jobs):
                answer = Answer(server, prepared, job)
                shape = CompletionLogprobs(prepared.top_logprobs or 0).shape
                async with contextlib.aclosing(answer.events()) as events:
                    async for _, text, entries in events:
                        yield chunk(index, text, logprobs=shape(entries) if prepared.top_logprobs is not None else None)
                yield chunk(index, "", answer.finish_reason)
                completion_tokens += answer.completion_tokens
            if include_usage:
                yield sse({"id": request_id, "object": "text_completion", "created": created,
                           "model": prepared.loaded.name, "choices": [],
                           "usage": usage(sum(job.prompt_tokens for job in prepared.jobs), completion_tokens)})
        except Exception as error:  # noqa: BLE001 - an error event for the client, the cause for the server log
            yield sse(generation_failed(request_id, error).body())
    yield "data: [DONE]\n\n"


class AdmittedStream(StreamingResponse):
    """A streamed answer that holds its request's place in line (a Ticket) until it is over, however it ends."""

    def __init__(self, ticket: Ticket, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ticket = ticket

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                # A stream cut while its generator waits at a `yield` would otherwise be closed only by the garbage
                # collector, and hold the model until then.
                with anyio.CancelScope(shield=True):
                    await self.body_iterator.aclose()
            finally:
                self.ticket.release()


# ====================================================================================================== app


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class BodyLimit:
    """Reads each request's whole body before the app sees it, so both limits hold however the body is sent: over
    max_bytes is a 413 (whether Content-Length announces it or a chunked body grows past it), slower than `timeout`
    seconds a 408 (a slowloris client would otherwise hold its connection open for ever). The app then gets the
    body replayed, and after it the real receive, which reports the client disconnecting."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        # Closing a socket with unread data resets the connection, and the client might never read its 413: so
        # the rest of a body that is too large is read and dropped first, up to this many bytes.
        self.drain_bytes = 4 * max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"request body larger than {self.max_bytes} bytes", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.drain_bytes):
            return await error_response(too_large)(scope, receive, send)
        chunks, size, more = [], 0, True
        try:
            with anyio.fail_after(self.timeout):
                while more and size <= self.drain_bytes:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left before its request was complete: nobody to answer
                    body, more = message.get("body", b""), message.get("more_body", False)
                    size += len(body)
                    if size <= self.max_bytes:
                        chunks.append(body)
        except TimeoutError:
            timeout = APIError(408, f"the request body did not arrive within {self.timeout:g} seconds",
                               code="request_timeout")
            return await error_response(too_large if size > self.max_bytes else timeout)(scope, receive, send)
        if size > self.max_bytes:
            return await error_response(too_large)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


# Names pydantic adds to an error's location for the branch of a union (`str | list[str]`), not fields.
UNION_BRANCHES = {"str", "int", "float", "bool"}


def error_param(location) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content', how the other errors name fields."""
    param = ""
    for part in location:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part != "body" and part.isidentifier() and part not in UNION_BRANCHES:
            param += f".{part}" if param else part
    return param or None


def create_app(models: list[LoadedModel], limits: Limits | None = None, api_key: str | None = None,
               web_ui: bool = True) -> FastAPI:
    server = Server(models, limits or Limits(), api_key)
    app = FastAPI(title="TinyMind OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=server.limits.max_request_bytes, timeout=server.limits.body_timeout)

    @app.exception_handler(APIError)
    async def on_api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, error: RequestValidationError):
        # Of a union's failed branches the one that got furthest says most: a list of parts with a bad part is
        # reported as that part ('messages[0].content[0].type'), not as "content: Input should be a valid string".
        first = max(error.errors(), key=lambda e: len(e.get("loc", ())), default={"msg": "invalid request"})
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "")
            return error_response(APIError(400, f"the request body is not valid JSON ({detail})"))
        param = error_param(first.get("loc", ()))
        return error_response(APIError(400, f"{param or 'request body'}: {first['msg']}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, error: StarletteHTTPException):
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return error_response(APIError(error.status_code, str(error.detail), error_type=kind))

    @app.exception_handler(Exception)
    async def on_unexpected(request, error: Exception):
        print(f"unhandled error on {request.url.path}: {error!r}", file=sys.stderr, flush=True)  # log, don't leak
        return error_response(APIError(500, "internal server error", error_type="server_error"))

    authorized = Depends(server.check_api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(server.models), "waiting": server.waiting, "active": server.active}

    @app.get("/v1/models", dependencies=[authorized])
    async def list_models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": server.created, "owned_by": "tinymind",
             "context_length": loaded.context_length, "mode": loaded.mode} for name, loaded in server.models.items()]}

    async def respond(request: SamplingRequest, prepared: PreparedRequest, http: Request, id_prefix: str,
                      answer, events):
        """The answer to a prepared request, streamed or not, holding a place in line until it is over."""
        ticket = server.admit()
        request_id, created = f"{id_prefix}-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return AdmittedStream(ticket, events(server, prepared, request_id, created, include_usage),
                                  media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            body = await cancel_on_disconnect(http.receive, answer(server, prepared, request_id, created))
        finally:
            ticket.release()
        return Response(status_code=499) if body is None else body  # 499: nginx's "client closed request"

    @app.post("/v1/chat/completions", dependencies=[authorized])
    async def chat_completions(request: ChatCompletionRequest, http: Request):
        return await respond(request, server.prepare(request), http, "chatcmpl", chat_answer, chat_events)

    @app.post("/v1/completions", dependencies=[authorized])
    async def completions(request: CompletionRequest, http: Request):
        return await respond(request, server.prepare_completion(request), http, "cmpl", completion_answer,
                             completion_events)

    if web_ui:
        @app.get("/", include_in_schema=False)
        async def web_page():
            return FileResponse(WEB_PAGE, media_type="text/html")

    return app


# ====================================================================================================== CLI


def add_server_args(parser: argparse.ArgumentParser, default_weights: list[str]):
    g = parser.add_argument_group("models")
    g.add_argument("--weight", nargs="+", default=default_weights,
                   help="stage names resolved in --save_dir (full_sft dpo ...), or 'all' for every checkpoint there")
    g.add_argument("--load_from", nargs="+", default=None,
                   help=".pth files or transformers directories to serve instead of --weight")
    g.add_argument("--save_dir", default="out", help="where --weight and --lora_name are looked up")
    g.add_argument("--lora_name", default=None,
                   help="add this LoRA adapter (out/lora/<name>_<hidden>.pth) to each model")
    g.add_argument("--hidden_size", type=int, default=None, help="only to choose between checkpoints of one stage")
    g.add_argument("--tokenizer_path", default=None, help="tokenizer directory (default: model/)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weight dtype (default: bfloat16/float16 on GPUs, float32 on CPUs)")
    g.add_argument("--num_threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on; 0.0.0.0 exposes the server to the network (set --api_key)")
    g.add_argument("--port", type=int, default=8998, help="TCP port")
    g.add_argument("--api_key", default=os.environ.get("TINYMIND_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on /v1/* (default: $TINYMIND_API_KEY, else open)")
    g.add_argument("--web_ui", type=int, default=1, choices=[0, 1], help="1: serve the chat page at /")
    g = parser.add_argument_group("limits per request")
    defaults = Limits()
    g.add_argument("--default_max_tokens", type=int, default=defaults.default_max_tokens,
                   help="answer length when a request gives no max_tokens")
    g.add_argument("--max_messages", type=int, default=defaults.max_messages, help="messages per request")
    g.add_argument("--max_message_chars", type=int, default=defaults.max_message_chars, help="characters per message")
    g.add_argument("--max_total_chars", type=int, default=defaults.max_total_chars, help="characters per request")
    g.add_argument("--max_request_bytes", type=int, default=defaults.max_request_bytes, help="request body size")
    g.add_argument("--body_timeout", type=float, default=defaults.body_timeout,
                   help="seconds a request body may take to arrive (408 after)")
    g.add_argument("--max_queue", type=int, default=defaults.max_queue,
                   help="requests allowed to wait for the model while one generates; more get 503")


def load_models(args) -> list[LoadedModel]:
    if args.load_from:
        sources = [dict(load_from=path) for path in args.load_from]
    elif args.weight == ["all"]:
        found = discover_checkpoints(args.save_dir)
        if not found:
            raise SystemExit(f"no checkpoints with a config JSON in {args.save_dir}/; train one first")
        sources = [dict(load_from=path) for path in found]
    else:
        sources = [dict(weight=name) for name in args.weight]
    models = []
    for source in sources:
        loaded = load_model_for_inference(save_dir=args.save_dir, hidden_size=args.hidden_size,
                                          lora_name=args.lora_name, tokenizer_path=args.tokenizer_path,
                                          device=args.device, dtype=args.dtype, **source)
        if any(m.name == loaded.name for m in models):
            raise SystemExit(f"two models are both called {loaded.name}")
        models.append(loaded)
    return models


def serve(args):
    import uvicorn
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    models = load_models(args)
    limits = Limits(max_messages=args.max_messages, max_message_chars=args.max_message_chars,
                    max_total_chars=args.max_total_chars, max_request_bytes=args.max_request_bytes,
                    body_timeout=args.body_timeout, default_max_tokens=args.default_max_tokens,
                    max_queue=args.max_queue)
    app = create_app(models, limits, args.api_key, bool(args.web_ui))
    for loaded in models:
        if loaded.mode == "continue":
            print(f"note: {loaded.name} is a pretrained base model: /v1/completions continues a prompt, and a chat "
                  "request continues the text of its newest message (no chat template, no tools)")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api_key: anyone who can reach this port can use it")
    print(f"serving {', '.join(m.name for m in models)} at http://{args.host}:{args.port}/v1"
          + (f" (chat page: http://{args.host}:{args.port}/)" if args.web_ui else ""), flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(parser, default_weights=["full_sft"])
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
