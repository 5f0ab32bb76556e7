"""An OpenAI-compatible HTTP server for TinyMind checkpoints (FastAPI + uvicorn), plus the web chat page.

    python -m scripts.serve_openai_api                                   # out/full_sft_<hidden>.pth on 127.0.0.1:8998
    python -m scripts.serve_openai_api --weight full_sft dpo reason      # several checkpoints, chosen per request
    python -m scripts.serve_openai_api --load_from export/tinymind --port 8000 --api_key sk-local

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8998/v1", api_key="sk-local")
    client.chat.completions.create(model="full_sft_512", messages=[{"role": "user", "content": "你好"}], stream=True)

Endpoints: POST /v1/chat/completions (streamed as server-sent events ending with `data: [DONE]`, or one JSON
answer), GET /v1/models, GET /health, and GET / (the chat page in scripts/web/index.html).
Sampling fields: temperature (0 = greedy), top_p, max_tokens (or max_completion_tokens), stop, seed, and the
common extensions top_k and repetition_penalty. Every bad request gets a 4xx with an OpenAI-style JSON error body
naming the field: wrong JSON types are refused, not coerced, and every number is range-checked. A body over
--max_request_bytes is a 413 (sent with Content-Length or chunked), one slower than --body_timeout a 408. A stream
that fails after its 200 header reports an error event ({"error": {...}}), then `data: [DONE]`.

One model runs at a time: requests wait in arrival order for a lock around generation, so concurrent clients
never share a forward pass or a random-number stream, and each gets exactly its own tokens. On a CPU that is also
the fastest schedule (one generation already uses every core). --max_queue bounds the waiting line: one request
generating plus max_queue waiting are admitted, every request beyond gets a 503. A client that disconnects, streamed
or not, waiting or generating, is dropped: its generation stops at the next decode step and its place is freed.
Pretrain checkpoints continue the newest message's text; every other stage answers through the chat template.
"""
import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass
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

from model.inference import (GenerationStream, LoadedModel, build_prompt, default_generation_config,
                             discover_checkpoints, load_model_for_inference)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WEB_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "index.html")


@dataclass
class Limits:
    """What one request may ask for. Bounded inputs keep one client from tying up the server or its memory."""
    max_messages: int = 64
    max_message_chars: int = 16_000
    max_total_chars: int = 64_000
    max_request_bytes: int = 1_000_000
    body_timeout: float = 30.0  # seconds for a whole request body to arrive
    max_stop_sequences: int = 4
    max_stop_chars: int = 64
    default_max_tokens: int = 512
    max_queue: int = 16


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


class Message(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(StrictModel):
    include_usage: bool | None = False


class ChatCompletionRequest(StrictModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=10_000)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)  # a tinier one overflows the logits too
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False  # null is allowed wherever OpenAI's API allows it, and means the default
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1)
    seed: int | None = Field(None, ge=-2 ** 63, le=2 ** 64 - 1)  # what torch.manual_seed accepts
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)


# ================================================================================================ generation


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
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class PreparedRequest:
    loaded: LoadedModel
    prompt: str
    prompt_tokens: int
    generation_config: object
    stops: list[str]
    seed: int | None


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

    def prepare(self, request: ChatCompletionRequest) -> PreparedRequest:
        """Every check that can fail, before any work starts (and before a stream sends its 200 header)."""
        limits = self.limits
        loaded = self.models.get(request.model)
        if loaded is None:
            raise APIError(404, f"model {request.model[:100]!r} not found; available: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        if request.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        for field in ("frequency_penalty", "presence_penalty"):
            if getattr(request, field):
                raise APIError(400, f"{field} is not supported; use repetition_penalty", param=field)
        if len(request.messages) > limits.max_messages:
            raise APIError(400, f"too many messages: {len(request.messages)} > {limits.max_messages}",
                           param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in request.messages]
        for i, m in enumerate(messages):
            if len(m["content"]) > limits.max_message_chars:
                raise APIError(400, f"messages[{i}] has {len(m['content'])} characters; the limit is "
                                    f"{limits.max_message_chars}", param=f"messages[{i}].content")
            check_unicode(m["content"], f"messages[{i}].content")
        if sum(len(m["content"]) for m in messages) > limits.max_total_chars:
            raise APIError(400, f"the messages exceed {limits.max_total_chars} characters in total", param="messages")
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stops) > limits.max_stop_sequences or any(not s or len(s) > limits.max_stop_chars for s in stops):
            raise APIError(400, f"stop: at most {limits.max_stop_sequences} non-empty sequences of up to "
                                f"{limits.max_stop_chars} characters", param="stop")
        for stop in stops:
            check_unicode(stop, "stop")
        try:
            prompt = build_prompt(loaded.tokenizer, messages, loaded.mode)
        except TemplateError as error:  # some chat templates refuse e.g. roles out of order
            message = f"the model's chat template refused these messages: {error}"
            raise APIError(400, message, param="messages") from None
        prompt_tokens = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        context = loaded.context_length
        room = context - prompt_tokens
        asked = request.max_completion_tokens or request.max_tokens
        if room < 1 or (asked is not None and asked > room):
            raise APIError(400, f"this model's maximum context length is {context} tokens; the messages take "
                                f"{prompt_tokens} and {asked or 1} more were requested", param="messages",
                           code="context_length_exceeded")
        max_new_tokens = asked or min(limits.default_max_tokens, room)
        temperature = request.temperature
        if temperature is not None and temperature < MIN_TEMPERATURE:
            temperature = 0
        config = default_generation_config(
            loaded.tokenizer, temperature=temperature, top_p=request.top_p, top_k=request.top_k,
            repetition_penalty=request.repetition_penalty, max_new_tokens=max_new_tokens)
        return PreparedRequest(loaded, prompt, prompt_tokens, config, stops, request.seed)

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

    def start(self, prepared: PreparedRequest) -> GenerationStream:
        """Call with the lock held: the seed and the generation then belong to this request alone."""
        if prepared.seed is not None:
            torch.manual_seed(prepared.seed)
        return GenerationStream(prepared.loaded, prepared.prompt, prepared.generation_config)


class Ticket:
    """A request's place in line (see Server.admit); release() gives it back, once however often it is called."""

    def __init__(self, server: Server):
        self.server, self.held = server, True

    def release(self):
        with self.server.admission:
            if self.held:
                self.held = False
                self.server.active -= 1


def check_unicode(text: str, param: str):
    """JSON can spell a lone UTF-16 surrogate (\\ud800) that no UTF-8 tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{param} is not valid Unicode (it holds a lone surrogate)", param=param) from None


async def next_piece(iterator) -> str | None:
    """The next piece of text, None at the end. A cancelled request (its client left) stops waiting at once; the
    worker thread it abandons returns as soon as finish() has stopped the generation."""
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


async def complete(server: Server, prepared: PreparedRequest, request_id: str, created: int) -> dict:
    async with server.turn():
        stream = None
        try:
            stream = server.start(prepared)
            stop_filter, pieces = StopFilter(prepared.stops), []
            iterator = iter(stream)
            while not stop_filter.stopped:
                piece = await next_piece(iterator)
                if piece is None:
                    break
                pieces.append(stop_filter.feed(piece))
            pieces.append("" if stop_filter.stopped else stop_filter.flush())
        except Exception as error:  # noqa: BLE001 - a 500 for the client, the cause for the server log
            raise generation_failed(request_id, error) from None
        finally:
            if stream is not None:
                await finish(stream)
    finish_reason = "stop" if stop_filter.stopped else stream.finish_reason
    return {"id": request_id, "object": "chat.completion", "created": created, "model": prepared.loaded.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prepared.prompt_tokens, stream.new_tokens)}


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


async def stream_events(server: Server, prepared: PreparedRequest, request_id: str, created: int,
                        include_usage: bool):
    """Server-sent events: a role chunk, content chunks, a chunk with finish_reason, optionally a usage chunk,
    then [DONE]. An error after the 200 header can only be reported in the stream: an error event, then [DONE]."""

    def chunk(delta: dict, finish_reason=None) -> str:
        return sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                    "model": prepared.loaded.name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    async with server.turn():
        stream = None
        try:
            stream = server.start(prepared)
            yield chunk({"role": "assistant", "content": ""})
            stop_filter = StopFilter(prepared.stops)
            iterator = iter(stream)
            while not stop_filter.stopped:
                piece = await next_piece(iterator)
                if piece is None:
                    break
                text = stop_filter.feed(piece)
                if text:
                    yield chunk({"content": text})
            tail = "" if stop_filter.stopped else stop_filter.flush()
            if tail:
                yield chunk({"content": tail})
            await finish(stream)  # new_tokens is final once the worker has stopped
            yield chunk({}, "stop" if stop_filter.stopped else stream.finish_reason)
            if include_usage:
                yield sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                           "model": prepared.loaded.name, "choices": [],
                           "usage": usage(prepared.prompt_tokens, stream.new_tokens)})
        except Exception as error:  # noqa: BLE001 - an error event for the client, the cause for the server log
            yield sse(generation_failed(request_id, error).body())
        finally:
            if stream is not None:
                await finish(stream)
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

    @app.post("/v1/chat/completions", dependencies=[authorized])
    async def chat_completions(request: ChatCompletionRequest, http: Request):
        prepared = server.prepare(request)
        ticket = server.admit()
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return AdmittedStream(ticket, stream_events(server, prepared, request_id, created, include_usage),
                                  media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            answer = await cancel_on_disconnect(http.receive, complete(server, prepared, request_id, created))
        finally:
            ticket.release()
        return Response(status_code=499) if answer is None else answer  # 499: nginx's "client closed request"

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
