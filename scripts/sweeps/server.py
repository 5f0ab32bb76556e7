"""Malformed and hostile requests against the OpenAI-compatible server (issue 18): scripts/serve_openai_api.py
runs as its own process on a tiny random checkpoint, exactly as typed on a command line, and every case goes over
real sockets.

    python -m scripts.sweeps.server                   # every case; about three minutes on 2 busy cores
    python -m scripts.sweeps.server --only burst,slow  # the cases whose group or name holds one of these words
    python -m scripts.sweeps.server --repo ../old      # the server of another checkout, to compare before a fix

The groups: bad JSON, every request field with wrong types and out-of-range values (sent plain and streamed; chat's
tools, tool_choice, logprobs and response_format too), the same for /v1/completions, bodies (over
--max_request_bytes with Content-Length or chunked, wrong content types), routes, extreme but valid values (tool
calls in the history, logprobs, prompt lists), clients that disconnect (while generating or waiting in line,
streamed or not, chat or completion, mid-body, by reset), bursts past --max_queue, and slowloris bodies (stalled or
trickled). A case is

    clean  answered as it should be: a 4xx (or a 503 beyond the queue) with an OpenAI-style body
           {"error": {"message", "type", "param", "code"}} naming the field where there is one, a 200 for a valid
           request; the server log without a traceback; and the server answering the next request promptly (after a
           disconnect: with nothing left generating or waiting for the client that left)
    raw    anything else: a 500, a cut stream, a plain-text error, an error naming no field or the wrong one, a
           traceback, a burst refused inexactly, a body that never times out, or a server slow to answer next"""
import argparse
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = "full_sft_64"
MAX_QUEUE = 4
BODY_TIMEOUT = 3.0
MAX_BYTES = 1_000_000  # the server's default --max_request_bytes
PROMPTLY = 3.0  # seconds a 2-token answer may take after a case (a few ms when the model is free)


def ask(text):
    return [{"role": "user", "content": text}]


def short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:28]}...({len(text)} chars)"


def body(**fields) -> dict:
    """A valid request, but for `fields`."""
    return {"model": MODEL, "messages": ask("hi"), "max_tokens": 2, **fields}


def completion(**fields) -> dict:
    """A valid /v1/completions request, but for `fields`."""
    return {"model": MODEL, "prompt": "hi", "max_tokens": 2, **fields}


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


# ========================================================================================== the server process


def make_checkpoint(save_dir: str):
    """A random nano model, saved the way training saves one (the tests build theirs the same way)."""
    import torch
    from transformers import AutoTokenizer

    from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
    from model.checkpoint import save_weights
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "model"))
    torch.manual_seed(1)
    model = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS["nano"])).eval()
    save_weights(model, os.path.join(save_dir, f"{MODEL}.pth"))


class ServerProcess:
    """`python -m scripts.serve_openai_api` on a free port, its log in a file the cases read from."""

    def __init__(self, repo: str, save_dir: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        with open(os.path.join(repo, "scripts", "serve_openai_api.py")) as source:
            self.has_body_timeout = "--body_timeout" in source.read()
        args = [sys.executable, "-m", "scripts.serve_openai_api", "--save_dir", save_dir, "--weight", "full_sft",
                "--tokenizer_path", os.path.join(ROOT, "model"), "--device", "cpu", "--num_threads", "1",
                "--port", str(self.port), "--max_queue", str(MAX_QUEUE), "--max_request_bytes", str(MAX_BYTES),
                "--web_ui", "0"]
        if self.has_body_timeout:
            args += ["--body_timeout", str(BODY_TIMEOUT)]
        self.log_path = os.path.join(save_dir, "server.log")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(args, cwd=repo, stdout=self.log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start:\n{self.log_text(0)[-3000:]}")
            time.sleep(0.5)

    def log_size(self) -> int:
        return os.path.getsize(self.log_path)

    def log_text(self, offset: int) -> str:
        with open(self.log_path, errors="replace") as log:
            log.seek(offset)
            return log.read()

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


# ============================================================================================= raw HTTP helpers


def connect(server: ServerProcess, timeout: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def post_bytes(payload: bytes, content_type: str | None = "application/json", path="/v1/chat/completions",
               length: int | None = None) -> bytes:
    """A POST whose connection the server closes once it has answered."""
    headers = f"POST {path} HTTP/1.1\r\nHost: sweep\r\nConnection: close\r\n"
    if content_type:
        headers += f"Content-Type: {content_type}\r\n"
    headers += f"Content-Length: {len(payload) if length is None else length}\r\n\r\n"
    return headers.encode() + payload


def read_all(connection: socket.socket) -> bytes:
    reply = b""
    try:
        while piece := connection.recv(65536):
            reply += piece
    except (ConnectionResetError, socket.timeout):
        pass
    return reply


def read_until(connection: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        piece = connection.recv(65536)
        if not piece:
            raise ConnectionError(f"closed before {marker!r}: {data[-200:]!r}")
        data += piece
    return data


def status_of(reply: bytes) -> int | None:
    parts = reply.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and reply.startswith(b"HTTP/1.1") and parts[1].isdigit() else None


def json_of(reply: bytes):
    return json.loads(reply.partition(b"\r\n\r\n")[2])


def error_problem(error_body, status: int, expected: set, param="any") -> str | None:
    """Why this is not an OpenAI-style error answer as expected, or None."""
    if status not in expected:
        return f"status {status}, expected {sorted(expected)}: {str(error_body)[:160]}"
    error = error_body.get("error") if isinstance(error_body, dict) else None
    if not isinstance(error, dict) or not all(key in error for key in ("message", "type", "param", "code")):
        return f"not an OpenAI-style error body: {str(error_body)[:160]}"
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return f"error without a message or a type: {error}"
    if param != "any" and error["param"] != param:
        return f"the error names {error['param']!r}, not {param!r}: {error['message'][:100]}"
    return None


def response_problem(response: httpx.Response, expected: set, param="any") -> str | None:
    try:
        error_body = response.json()
    except ValueError:
        return f"status {response.status_code}, body not JSON: {response.text[:160]!r}"
    return error_problem(error_body, response.status_code, expected, param)


# ================================================================================================== the cases


# Field values that must be refused with a 400 naming the field: (field, value, param when not the field itself).
BAD_FIELDS = [
    ("model", 42), ("model", None), ("model", ["m"]), ("model", {}),
    ("messages", "hi"), ("messages", {}), ("messages", []), ("messages", None), ("messages", ["hi"], "messages[0]"),
    ("messages", [{"role": "user"}], "messages[0].content"),
    ("messages", [{"role": "wizard", "content": "hi"}], "messages[0].role"),
    ("messages", [{"role": 5, "content": "hi"}], "messages[0].role"),
    ("messages", [{"role": "user", "content": 42}], "messages[0].content"),
    ("messages", [{"role": "user", "content": None}], "messages[0].content"),
    ("messages", [{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].type"),
    ("messages", [{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text"),
    ("messages", [{"role": "user", "content": "\ud800"}], "messages[0].content"),
    ("messages", ask("hi") * 65), ("messages", ask("x" * 16_001), "messages[0].content"),
    ("messages", ask("x" * 15_000) * 5),
    ("temperature", -1), ("temperature", 2.5), ("temperature", "hot"), ("temperature", "0.5"), ("temperature", True),
    ("temperature", []), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0), ("top_p", -0.1), ("top_p", 1.5), ("top_p", "x"), ("top_p", True),
    ("top_k", -1), ("top_k", 10_001), ("top_k", 2.5), ("top_k", "5"), ("top_k", True),
    ("repetition_penalty", 0), ("repetition_penalty", -1), ("repetition_penalty", 11),
    ("repetition_penalty", 1e-300), ("repetition_penalty", "x"),
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", 1.5), ("max_tokens", "5"), ("max_tokens", True),
    ("max_tokens", 2 ** 70, "messages"), ("max_tokens", 10 ** 6, "messages"),
    ("max_completion_tokens", 0), ("max_completion_tokens", 2 ** 70, "messages"), ("max_completion_tokens", "x"),
    ("stop", 5), ("stop", [1], "stop[0]"), ("stop", ""), ("stop", [""]), ("stop", ["x" * 65]),
    ("stop", ["a", "b", "c", "d", "e"]), ("stop", [None], "stop[0]"), ("stop", {"a": 1}), ("stop", "\udfff"),
    ("seed", 2 ** 70), ("seed", -2 ** 70), ("seed", 2 ** 64), ("seed", -2 ** 63 - 1), ("seed", "7"), ("seed", 1.5),
    ("seed", True),
    ("n", 0), ("n", 2), ("n", 2 ** 70), ("n", "1"), ("n", 1.5),
    ("stream", "yes"), ("stream", 1), ("stream", "false"),
    ("stream_options", "x"), ("stream_options", {"include_usage": "yes"}, "stream_options.include_usage"),
    ("presence_penalty", 1), ("presence_penalty", 5), ("presence_penalty", "x"),
    ("frequency_penalty", -1), ("frequency_penalty", -3), ("frequency_penalty", "x"),
    ("logit_bias", {"5": 1}), ("logit_bias", "x"),
    ("messages", [{"role": "assistant", "content": None}], "messages[0].content"),
    ("messages", [{"role": "tool", "tool_call_id": "c"}], "messages[0].content"),
    ("messages", [{"role": "user", "content": "hi", "tool_calls": [CALL]}], "messages[0].tool_calls"),
    ("messages", [{"role": "assistant", "tool_calls": [{"id": "c"}]}], "messages[0].tool_calls[0].function"),
    ("messages", [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ("messages", [{"role": "assistant", "tool_calls": "f"}], "messages[0].tool_calls"),
    ("tools", "f"), ("tools", ["f"], "tools[0]"), ("tools", [{"type": "retrieval"}], "tools[0].type"),
    ("tools", [{"type": "function"}], "tools[0].function"),
    ("tools", [{"type": "function", "function": {"name": ""}}], "tools[0].function.name"),
    ("tools", [{"type": "function", "function": {"name": 5}}], "tools[0].function.name"),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": []}}], "tools[0].function.parameters"),
    ("tools", [{"type": "function", "function": {"name": "f", "description": 1}}], "tools[0].function.description"),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": json.loads('{"a": ' * 90 + "1"
                                                                                        + "}" * 90)}}], "tools[0]"),
    ("tools", [{"type": "function", "function": {"name": "\udc00"}}]),
    ("tool_choice", "required"), ("tool_choice", "any"), ("tool_choice", 1),
    ("tool_choice", {"type": "function", "function": {"name": "get_weather"}}),
    ("parallel_tool_calls", "no"), ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("logprobs", "yes"), ("logprobs", 1), ("top_logprobs", 2), ("top_logprobs", -1), ("top_logprobs", 21),
    ("top_logprobs", 1.5),
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("response_format", "json"), ("response_format", {}, "response_format.type"),
]

BAD_COMPLETION_FIELDS = [  # the same for /v1/completions
    ("prompt", None), ("prompt", 5), ("prompt", [1, 2], "prompt[0]"), ("prompt", [[1, 2]], "prompt[0]"),
    ("prompt", []), ("prompt", ["a"] * 65), ("prompt", "x" * 16_001), ("prompt", ["a", "x" * 16_001], "prompt[1]"),
    ("prompt", ["x" * 15_000] * 5), ("prompt", "\ud800"), ("prompt", ["a", "\ud800"], "prompt[1]"),
    ("echo", True), ("echo", "yes"), ("suffix", "x"), ("suffix", 5), ("best_of", 2), ("best_of", 0),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", True), ("logprobs", "2"),
    ("max_tokens", 0), ("max_tokens", 10 ** 6, "prompt"), ("max_tokens", "5"), ("temperature", 3), ("top_p", 0),
    ("stop", ""), ("stop", [1], "stop[0]"), ("seed", 2 ** 70), ("n", 2), ("presence_penalty", 1),
    ("logit_bias", {"5": 1}), ("stream", "yes"), ("model", 5),
]

BAD_JSON = [  # (name, raw body): refused with a 400 that names no field
    ("not JSON", b"{bad"), ("empty body", b""), ("a list", b"[]"), ("null", b"null"), ("a number", b"42"),
    ("a string", b'"text"'), ("trailing garbage", json.dumps(body()).encode() + b" trailing"),
    ("invalid UTF-8", b'{"model": "\xff\xfe", "messages": []}'), ("deeply nested", b"[" * 200_000 + b"]" * 200_000),
    ("5000-digit integer", b'{"model": "%s", "messages": [], "max_tokens": %s}' % (MODEL.encode(), b"9" * 5000)),
    ("NUL bytes", b"\x00" * 1000),
]

EXTREME_VALID = [  # (name, fields): must be answered (200) like any request
    ("temperature tiny", dict(temperature=1e-300)), ("temperature 2, top_p tiny", dict(temperature=2, top_p=1e-300)),
    ("top_k 0", dict(top_k=0)), ("top_k 10000", dict(top_k=10_000)),
    ("repetition_penalty 0.01", dict(repetition_penalty=0.01)), ("repetition_penalty 10", dict(repetition_penalty=10)),
    ("seed largest", dict(seed=2 ** 64 - 1)), ("seed smallest", dict(seed=-2 ** 63)),
    ("stop 64 characters", dict(stop="x" * 64)), ("max_tokens 1", dict(max_tokens=1)),
    ("nulls everywhere", dict(temperature=None, top_p=None, n=None, stream=None, stop=None, seed=None)),
    ("developer role and parts", dict(messages=[{"role": "developer", "content": "be brief"},
                                                {"role": "user", "content": [{"type": "text", "text": "hi"}]}])),
    ("unknown fields", dict(user="u", metadata={"a": 1}, store=False, logit_bias={}, tools=[])),
    ("emoji and CJK", dict(messages=ask("你好 👋🏽 \u200d"))),
    ("tools", dict(tools=TOOLS, tool_choice="auto", parallel_tool_calls=False)),
    ("tool_choice none", dict(tools=TOOLS, tool_choice="none")),
    ("tool call and result in the history", dict(tools=TOOLS, messages=[
        *ask("Weather in Paris?"), {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])),
    ("tool call with text and parts", dict(messages=[
        *ask("hi"), {"role": "assistant", "content": [{"type": "text", "text": "let me see"}], "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]}])),
    ("logprobs, 20 alternatives", dict(logprobs=True, top_logprobs=20)),
    ("logprobs, none", dict(logprobs=False)), ("response_format text", dict(response_format={"type": "text"})),
]

COMPLETION_VALID = [  # (name, fields) for /v1/completions
    ("a prompt", {}), ("a list of prompts", dict(prompt=["a", "b", ""])), ("an empty prompt", dict(prompt="")),
    ("the template's form", dict(prompt="<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")),
    ("logprobs 0", dict(logprobs=0)), ("logprobs 20", dict(logprobs=20, temperature=0)),
    ("stop and seed", dict(stop=["\n", "x" * 64], seed=7, temperature=1)),
    ("nulls everywhere", dict(temperature=None, top_p=None, n=None, stream=None, stop=None, seed=None,
                              logprobs=None, echo=None, suffix=None, best_of=None)),
    ("echo false, best_of 1", dict(echo=False, best_of=1)), ("usage", dict(stream_options={"include_usage": True})),
]


class Sweep:
    def __init__(self, server: ServerProcess, only: list[str], long_body: dict, long_completion: dict):
        self.server, self.only, self.long, self.long_completion = server, only, long_body, long_completion
        self.tried = self.clean = 0
        self.raw = []

    def case(self, group: str, name: str, run):
        """run() returns None when the answer was right, else why not."""
        if self.only and not any(word in f"{group} {name}" for word in self.only):
            return
        offset = self.server.log_size()
        try:
            why = run()
        except Exception as error:  # noqa: BLE001 - a case the server broke (or the harness): reported, not fatal
            why = f"{type(error).__name__}: {error}"
        time.sleep(0.05)  # let the log catch up
        if why is None and "Traceback" in self.server.log_text(offset):
            why = "a traceback in the server log: " + self.server.log_text(offset).strip()[-300:].replace("\n", " | ")
        if why is None:
            why = self.answers_promptly()
        else:
            self.recover()
        self.tried += 1
        self.clean += why is None
        if why is not None:
            self.raw.append(f"{group}: {name}")
        print(f"{'clean' if why is None else 'RAW  '} | {group:10s} | {name[:58]:58s} | {why or ''}", flush=True)

    def answers_promptly(self) -> str | None:
        """After a case: nobody left waiting or generating, and a 2-token answer within PROMPTLY seconds."""
        deadline = time.time() + 2
        while True:
            state = self.server.health()
            if state["waiting"] == 0 and state.get("active", 0) == 0:
                break
            if time.time() > deadline:
                self.recover()
                return f"still busy after the case: {state}"
            time.sleep(0.05)
        started = time.time()
        try:
            response = httpx.post(self.server.url + "/v1/chat/completions", json=body(), timeout=PROMPTLY)
        except httpx.TimeoutException:
            self.recover()
            return f"the next request took over {PROMPTLY:g} s"
        if response.status_code != 200:
            return f"the next request got {response.status_code}: {response.text[:100]}"
        if time.time() - started > PROMPTLY:
            return f"the next request took {time.time() - started:.1f} s"
        return None

    def recover(self):
        """Wait (up to two minutes) until the server answers again, so one failure does not spill into the next."""
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.post(self.server.url + "/v1/chat/completions", json=body(), timeout=30).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(1)

    # ------------------------------------------------------------------------------------------- simple cases

    def post(self, payload, expected: set, param="any", content_type="application/json", path=CHAT):
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        headers = {"Content-Type": content_type} if content_type else {}
        response = httpx.post(self.server.url + path, content=payload, headers=headers, timeout=30)
        return response_problem(response, expected, param)

    def run_simple_cases(self):
        for name, payload in BAD_JSON:
            self.case("json", name, lambda payload=payload: self.post(payload, {400}, None))
        for field, value, *named in BAD_FIELDS:
            param = named[0] if named else field
            for stream in (False,) if field in ("stream", "stream_options") else (False, True):
                fields = {field: value, "stream": True} if stream else {field: value}
                name = f"{field}={short(value)}" + (" streamed" if stream else "")
                self.case("fields", name, lambda fields=fields, param=param: self.post(body(**fields), {400}, param))
        for name, fields in EXTREME_VALID:
            for stream in (False, True):
                self.case("valid", name + (" streamed" if stream else ""),
                          lambda fields=fields, stream=stream: self.valid(dict(fields, stream=stream)))
        for field, value, *named in BAD_COMPLETION_FIELDS:
            param = named[0] if named else field
            for stream in (False,) if field == "stream" else (False, True):
                fields = {field: value, "stream": True} if stream else {field: value}
                name = f"{field}={short(value)}" + (" streamed" if stream else "")
                self.case("completions", name, lambda fields=fields, param=param: self.post(
                    completion(**fields), {400}, param, path=COMPLETIONS))
        for name, fields in COMPLETION_VALID:
            for stream in (False, True):
                self.case("completions", "valid: " + name + (" streamed" if stream else ""),
                          lambda fields=fields, stream=stream: self.valid(dict(fields, stream=stream), COMPLETIONS))
        self.case("completions", "GET /v1/completions", lambda: response_problem(
            httpx.get(self.server.url + COMPLETIONS, timeout=10), {405}))
        self.case("completions", "unknown model", lambda: self.post(completion(model="gpt-4"), {404}, "model",
                                                                    path=COMPLETIONS))
        self.case("route", "GET /v1/chat/completions", lambda: response_problem(
            httpx.get(self.server.url + "/v1/chat/completions", timeout=10), {405}))
        self.case("route", "POST /v1/nothing", lambda: response_problem(
            httpx.post(self.server.url + "/v1/nothing", json={}, timeout=10), {404}))
        self.case("route", "unknown model", lambda: self.post(body(model="gpt-4"), {404}, "model"))
        self.case("route", "unknown model, a long name", lambda: self.post(body(model="m" * 500_000), {404}, "model"))

    def valid(self, fields: dict, path=CHAT) -> str | None:
        request = body(**fields) if path == CHAT else completion(**fields)
        response = httpx.post(self.server.url + path, json=request, timeout=30)
        if response.status_code != 200:
            return f"status {response.status_code}: {response.text[:160]}"
        if fields.get("stream"):
            events = [line for line in response.text.splitlines() if line]
            if events[-1:] != ["data: [DONE]"] or any('"error"' in line for line in events):
                return f"the stream did not end cleanly: {events[-2:]}"
        elif path == CHAT and response.json()["choices"][0]["message"]["role"] != "assistant":
            return f"no answer: {response.text[:160]}"
        elif path == COMPLETIONS:
            prompts = request["prompt"] if isinstance(request["prompt"], list) else [request["prompt"]]
            if [c["index"] for c in response.json()["choices"]] != list(range(len(prompts))):
                return f"not one choice per prompt: {response.text[:160]}"
        return None

    # ------------------------------------------------------------------------------------------------- bodies

    def run_body_cases(self):
        big = json.dumps(body(messages=ask("x" * (MAX_BYTES + 200_000)))).encode()
        self.case("body", "over the limit, Content-Length", lambda: self.post(big, {413}))
        for size in (MAX_BYTES + 200_000, 6 * MAX_BYTES):
            payload = json.dumps(body(messages=ask("x" * size))).encode()
            self.case("body", f"over the limit, chunked, {size / 1e6:.1f} MB",
                      lambda payload=payload: self.post_chunked(payload, {413}))
        small = json.dumps(body(messages=ask("y" * 1000))).encode()
        self.case("body", "under the limit, chunked", lambda: self.post_chunked(small, {200}))
        self.case("body", "Content-Length 10 GB, little sent",
                  lambda: self.raw_error(post_bytes(b'{"model": ', length=10 ** 10), {413}))
        self.case("body", "Content-Length larger than the body sent, then half-close",
                  lambda: self.raw_error(post_bytes(json.dumps(body()).encode(), length=10 ** 5), {400, None},
                                         half_close=True))
        self.case("body", "text/plain", lambda: self.post(body(), {400, 415}, content_type="text/plain"))
        self.case("body", "form-encoded", lambda: self.post(b"model=x&messages=y", {400, 415},
                                                              content_type="application/x-www-form-urlencoded"))
        self.case("body", "no Content-Type", lambda: self.post(body(), {400, 415}, content_type=None))
        self.case("body", "10000 tiny messages", lambda: self.post(body(messages=ask("") * 10_000), {400}, "messages"))

    def post_chunked(self, payload: bytes, expected: set) -> str | None:
        chunks = (payload[i:i + 65536] for i in range(0, len(payload), 65536))  # no Content-Length: chunked
        try:
            response = httpx.post(self.server.url + "/v1/chat/completions", content=chunks,
                                  headers={"Content-Type": "application/json"}, timeout=60)
        except httpx.TransportError as error:
            return f"no answer read: {error!r}"
        if expected == {200}:
            return None if response.status_code == 200 else f"status {response.status_code}: {response.text[:160]}"
        return response_problem(response, expected)

    def raw_error(self, request: bytes, expected: set, half_close=False) -> str | None:
        """None in `expected`: no answer at all is right too (the client gave up before its body was complete)."""
        with connect(self.server, timeout=BODY_TIMEOUT + 10) as connection:
            connection.sendall(request)
            if half_close:
                connection.shutdown(socket.SHUT_WR)
            reply = read_all(connection)
        if None in expected and not reply:
            return None
        try:
            return error_problem(json_of(reply), status_of(reply), expected)
        except ValueError:
            return f"not a JSON error: {reply[:160]!r}"

    # --------------------------------------------------------------------------------------------- slow bodies

    def run_slow_cases(self):
        wait = BODY_TIMEOUT + 5
        self.case("slow", "body stalls after 10 of 200 bytes", lambda: self.slow(
            post_bytes(b'{"model": ', length=200), b"", wait))
        self.case("slow", "body trickles a byte every 0.2 s", lambda: self.slow(
            post_bytes(b"", length=200), b"x" * 200, wait, trickle=0.2))
        chunked_head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: sweep\r\nContent-Type: application/json\r\n"
                        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\n{\"mod\r\n")
        self.case("slow", "chunked body stalls", lambda: self.slow(chunked_head, b"", wait))

    def slow(self, head: bytes, rest: bytes, wait: float, trickle: float = 0.0) -> str | None:
        started = time.time()
        with connect(self.server, timeout=wait) as connection:
            connection.sendall(head)
            for byte in rest:
                # Stop once the server has answered: writing on would reset the connection, losing the answer.
                if time.time() - started > wait or select.select([connection], [], [], 0)[0]:
                    break
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    break  # the server has answered and closed
                time.sleep(trickle)
            reply = read_all(connection)
        if not reply:
            return f"no answer within {wait:g} s: the server has no body timeout"
        try:
            return error_problem(json_of(reply), status_of(reply), {408})
        except ValueError:
            return f"not a JSON error: {reply[:160]!r}"

    # ------------------------------------------------------------------------------------------- disconnects

    def run_disconnect_cases(self):
        for path in (CHAT, COMPLETIONS):
            for stream in (False, True):
                kind = ("chat, " if path == CHAT else "completion, ") + ("streamed" if stream else "not streamed")
                self.case("disconnect", f"{kind}, while generating",
                          lambda stream=stream, path=path: self.leave(stream, "generate", path=path))
                self.case("disconnect", f"{kind}, right after sending",
                          lambda stream=stream, path=path: self.leave(stream, "send", path=path))
                self.case("disconnect", f"{kind}, by reset while generating",
                          lambda stream=stream, path=path: self.leave(stream, "generate", reset=True, path=path))
                self.case("disconnect", f"{kind}, while waiting in line",
                          lambda stream=stream, path=path: self.leave_the_line(stream, path))
        self.case("disconnect", "mid-body", lambda: self.leave_mid_body())

    def leave(self, stream: bool, when: str, reset=False, path=CHAT) -> str | None:
        connection = connect(self.server)
        request = self.long if path == CHAT else self.long_completion
        connection.sendall(post_bytes(json.dumps(dict(request, stream=stream)).encode(), path=path))
        if when == "generate":
            if stream:
                read_until(connection, b"data: ")
            else:
                time.sleep(0.5)  # prefill done, decoding
        if reset:  # RST instead of FIN: linger on, for 0 seconds
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()
        return None  # answers_promptly() then shows whether the generation went on for nobody

    def leave_mid_body(self) -> str | None:
        connection = connect(self.server)
        connection.sendall(post_bytes(b'{"model": "x", ', length=500))
        time.sleep(0.2)
        connection.close()
        return None

    def leave_the_line(self, stream: bool, path=CHAT) -> str | None:
        holder = self.hold_the_model()
        try:
            connection = connect(self.server)
            request = body(stream=stream) if path == CHAT else completion(stream=stream)
            connection.sendall(post_bytes(json.dumps(request).encode(), path=path))
            if not self.wait_for(lambda: self.server.health()["waiting"] == 1, 5):
                return f"the second request is not waiting: {self.server.health()}"
            connection.close()
            if not self.wait_for(lambda: self.server.health()["waiting"] == 0, 3):
                return "the client that left is still in line"
            return None
        finally:
            holder.close()

    def hold_the_model(self) -> socket.socket:
        """A long stream, generating: the model is locked until the connection is closed."""
        holder = connect(self.server)
        holder.sendall(post_bytes(json.dumps(dict(self.long, stream=True)).encode()))
        read_until(holder, b"data: ")
        return holder

    @staticmethod
    def wait_for(condition, timeout: float) -> bool:
        deadline = time.time() + timeout
        while not condition():
            if time.time() > deadline:
                return False
            time.sleep(0.05)
        return True

    # ------------------------------------------------------------------------------------------------- bursts

    def run_burst_cases(self):
        for extra, every in ((8, 3), (5, 1), (12, 2)):
            kinds = {1: "answers only", 2: "half streams", 3: "mostly streams"}[every]
            self.case("burst", f"max_queue {MAX_QUEUE} + {extra} at once, {kinds}",
                      lambda extra=extra, every=every: self.burst(extra, every))

    def burst(self, extra: int, every: int) -> str | None:
        """While one request generates, MAX_QUEUE + extra more arrive at once: exactly `extra` must get 503."""
        count = MAX_QUEUE + extra
        holder = self.hold_the_model()
        replies, readers = [b""] * count, []
        try:
            connections = [connect(self.server, timeout=60) for _ in range(count)]
            for i, connection in enumerate(connections):  # back to back: the server reads them all at once
                stream = i % every != 0
                if i % 4 == 3:  # completions share the line
                    connection.sendall(post_bytes(json.dumps(completion(stream=stream)).encode(), path=COMPLETIONS))
                else:
                    connection.sendall(post_bytes(json.dumps(body(stream=stream)).encode()))

            def read(i):
                replies[i] = read_all(connections[i])

            readers = [threading.Thread(target=read, args=(i,)) for i in range(count)]
            for reader in readers:
                reader.start()

            def refused():
                return sum(status_of(reply) == 503 for reply in replies)

            if not self.wait_for(lambda: refused() + self.server.health()["waiting"] == count, 20):
                return f"the burst was not all refused or in line: {refused()} refused, {self.server.health()}"
            refusals = refused()
        finally:
            holder.close()
        for reader in readers:
            reader.join(timeout=60)
        if refusals != extra:
            return f"{refusals} refused of {count}, expected {extra}"
        for reply in replies:
            status = status_of(reply)
            if status == 503:
                problem = error_problem(json_of(reply), status, {503})
                if problem or b"server_busy" not in reply:
                    return problem or f"a 503 without code server_busy: {reply[-200:]!r}"
            elif status != 200 or not (b"data: [DONE]" in reply or b'"choices"' in reply):
                return f"an admitted request was not answered: {reply[:200]!r}"
        return None


def long_request(server: ServerProcess) -> dict:
    """A request that generates for long: greedy decoding, on a prompt whose answer runs to its length without an
    end-of-turn token (a random model's greedy answer soon repeats a cycle, so it never ends if it has not yet)."""
    for prompt in ("long", "tell me everything", "1 2 3", "abc", "你好", "The king"):
        trial = body(messages=ask(prompt), max_tokens=300, temperature=0)
        response = httpx.post(server.url + "/v1/chat/completions", json=trial, timeout=120)
        if response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length":
            return dict(trial, max_tokens=20_000)
    raise SystemExit("no prompt found whose greedy answer runs to its length")


def long_completion(server: ServerProcess) -> dict:
    """long_request's counterpart for /v1/completions."""
    for prompt in ("The king", "long", "1 2 3", "你好", "abc"):
        trial = completion(prompt=prompt, max_tokens=300, temperature=0)
        response = httpx.post(server.url + COMPLETIONS, json=trial, timeout=120)
        if response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length":
            return dict(trial, max_tokens=20_000)
    # A server without /v1/completions (--repo of an older checkout) gets its completion cases reported raw.
    return completion(prompt="The king", max_tokens=20_000, temperature=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated words: run the cases whose group/name has one")
    parser.add_argument("--repo", default=ROOT, help="the checkout whose scripts/serve_openai_api.py to run")
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="server_sweep_") as save_dir:
        make_checkpoint(save_dir)
        server = ServerProcess(os.path.abspath(args.repo), save_dir)
        try:
            print(f"server up on port {server.port} ({time.time() - started:.0f} s); max_queue {MAX_QUEUE}, "
                  f"max_request_bytes {MAX_BYTES}, body timeout "
                  f"{f'{BODY_TIMEOUT:g} s' if server.has_body_timeout else 'none'}", flush=True)
            sweep = Sweep(server, [word for word in args.only.split(",") if word], long_request(server),
                          long_completion(server))
            sweep.run_simple_cases()
            sweep.run_body_cases()
            sweep.run_slow_cases()
            sweep.run_disconnect_cases()
            sweep.run_burst_cases()
        finally:
            server.stop()
    print(f"\nserver sweep: {sweep.tried} tried, {sweep.clean} clean, {sweep.tried - sweep.clean} raw "
          f"({time.time() - started:.0f} s)")
    for name in sweep.raw:
        print(f"  raw: {name}")
    return 0 if sweep.clean == sweep.tried else 1


if __name__ == "__main__":
    sys.exit(main())
