"""scripts/serve_openai_api.py on a free 127.0.0.1 port, called with the official openai client: streamed and not,
concurrent clients that must not mix, stop sequences, usage, API keys, malformed requests (4xx + JSON naming the
field, never a traceback), body limits (413 chunked or not, 408 for a body that never ends), generation failures
(a 500, or an error event and [DONE] in a stream), clients that disconnect (the generation stops, the place in
line is freed), an exact --max_queue under a burst, and the chat page. Tool calling (tools rendered as SFT renders
MiniMind's `functions`, <tool_call> output parsed into tool_calls, streamed, the tool result sent back; also
through LangChain's ChatOpenAI when langchain-openai is installed), /v1/completions, and logprobs checked against
the model's own forward pass. A model is made to write a given text (a tool call) by forcing its logits."""
import argparse
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn
from transformers import AutoTokenizer

from model import PRESETS, TinyMindConfig, TinyMindForCausalLM
from model.checkpoint import save_weights
from model.inference import LoadedModel, build_prompt, default_generation_config
from scripts import serve_openai_api as server_module
from scripts import web_demo
from tests import ROOT, TOKENIZER, free_port

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

openai = pytest.importorskip("openai")


MODEL_ID = "full_sft_64"


class RunningServer:
    """uvicorn in a thread, on a socket bound to 127.0.0.1 port 0 (the OS picks a free port, no race)."""

    def __init__(self, app):
        self.app = app
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


@pytest.fixture(scope="module")
def models():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    loaded = []
    for seed, name, mode in ((1, MODEL_ID, "chat"), (0, "pretrain_64", "continue")):
        torch.manual_seed(seed)
        model = TinyMindForCausalLM(TinyMindConfig(vocab_size=len(tokenizer), **PRESETS["nano"])).eval()
        loaded.append(LoadedModel(model, tokenizer, name, "memory", mode, torch.device("cpu"), torch.float32))
    return loaded


@pytest.fixture(scope="module")
def server(models):
    limits = server_module.Limits(max_messages=8, max_message_chars=2000, max_total_chars=4000,
                                  max_request_bytes=20_000)
    running = RunningServer(server_module.create_app(models, limits))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(loaded: LoadedModel, messages, max_tokens, **sampling):
    """What generation must produce for these messages, computed without the server."""
    prompt = build_prompt(loaded.tokenizer, messages, loaded.mode)
    ids = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    config = default_generation_config(loaded.tokenizer, max_new_tokens=max_tokens, **sampling)
    with torch.no_grad():
        out = loaded.model.generate(ids, generation_config=config)
    new = out[0, ids.shape[1]:]
    text = loaded.tokenizer.decode(new, skip_special_tokens=True)
    return text, ids.shape[1], len(new), "stop" if new[-1].item() == 2 else "length"


def ask(text):
    return [{"role": "user", "content": text}]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'  # as SFT renders it


class DecodeSteps:
    """Counts a model's forward passes (the prefill, then one per decode step) while active, and keeps it from
    choosing its end-of-turn token: a generation then runs until its max_tokens, or until it is cancelled."""

    def __init__(self, loaded: LoadedModel):
        self.model, self.eos, self.count = loaded.model, loaded.tokenizer.eos_token_id, 0

    def hook(self, module, inputs, output):
        self.count += 1
        output.logits[..., self.eos] = float("-inf")

    def __enter__(self):
        self.handle = self.model.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def wait_until_stopped(self, quiet=0.5, timeout=10.0) -> int:
        """The count once it has not changed for `quiet` seconds; fails if it keeps changing for `timeout`."""
        deadline, last, since = time.time() + timeout, self.count, time.time()
        while time.time() - since < quiet:
            assert time.time() < deadline, f"the generation kept running ({self.count} steps)"
            time.sleep(0.05)
            if self.count != last:
                last, since = self.count, time.time()
        return last


class ForcedText:
    """Makes a model write `text`, then its end-of-turn token, whatever it is asked: each step's logits are -inf but
    for the next token of the text (a tiny random model never calls a tool by itself). A prefill (more than one
    input token) starts the text again, so every request while this is active gets it."""

    def __init__(self, loaded: LoadedModel, text: str):
        self.model, self.step = loaded.model, 0
        self.ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"] + [loaded.tokenizer.eos_token_id]

    def hook(self, module, args, kwargs, output):
        if kwargs["input_ids"].shape[1] > 1:
            self.step = 0
        logits = output.logits[:, -1]
        logits.fill_(float("-inf"))
        logits[:, self.ids[min(self.step, len(self.ids) - 1)]] = 0
        self.step += 1

    def __enter__(self):
        self.handle = self.model.register_forward_hook(self.hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def wait_until(condition, what, timeout=20.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.02)


def connect(url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30)


def request_bytes(body: dict) -> bytes:
    """A whole POST (to /v1/completions if the body has a prompt); the server closes the connection after answering
    it."""
    payload = json.dumps(body).encode()
    path = b"/v1/completions" if "prompt" in body else b"/v1/chat/completions"
    return (b"POST " + path + b" HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Connection: close\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)


def open_request(url: str, body: dict) -> socket.socket:
    """A POST sent on a raw connection, nothing read: closing it is a client that hangs up."""
    connection = connect(url)
    connection.sendall(request_bytes(body))
    return connection


def read_until(connection: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        piece = connection.recv(65536)
        assert piece, f"connection closed before {marker!r}: {data[-300:]!r}"
        data += piece
    return data


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()


@pytest.fixture
def server_log(capsys):
    """What the server wrote to its log during the test: uvicorn's logger (tracebacks of unhandled errors),
    the root logger (asyncio's "exception never retrieved") and stderr (the server's own messages)."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler, loggers = Keep(logging.DEBUG), [logging.getLogger("uvicorn"), logging.getLogger()]
    for logger in loggers:
        logger.addHandler(handler)

    def text():
        lines.append(capsys.readouterr().err)
        return "\n".join(lines)

    yield text
    for logger in loggers:
        logger.removeHandler(handler)


def test_models_are_listed(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL_ID, "pretrain_64"]


def test_non_streamed_answer_and_usage(client, models):
    response = client.chat.completions.create(model=MODEL_ID, messages=ask("你好"), max_tokens=12, temperature=0)
    text, prompt_tokens, new_tokens, finish = reference(models[0], ask("你好"), 12, temperature=0)
    assert response.choices[0].message.content == text and response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == finish and response.model == MODEL_ID
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, new_tokens)
    assert response.usage.total_tokens == prompt_tokens + new_tokens


def test_streamed_answer_equals_the_non_streamed_one(client, models):
    messages = [{"role": "system", "content": "你是TinyMind"}, *ask("写一首诗")]
    stream = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    expected, prompt_tokens, new_tokens, expected_finish = reference(models[0], messages, 16, temperature=0)
    assert text == expected and finish == [expected_finish]
    assert chunks[-1].usage.completion_tokens == new_tokens and chunks[-1].usage.prompt_tokens == prompt_tokens


def test_raw_event_stream_ends_with_done(server):
    body = {"model": MODEL_ID, "messages": ask("hi"), "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_pretrain_model_continues_the_last_message(client, models):
    response = client.chat.completions.create(model="pretrain_64", messages=ask("床前明月光"), max_tokens=8,
                                              temperature=0)
    assert response.choices[0].message.content == reference(models[1], ask("床前明月光"), 8, temperature=0)[0]
    assert response.usage.prompt_tokens == 1 + len(models[1].tokenizer("床前明月光")["input_ids"])


def test_concurrent_clients_get_their_own_answers(client, models):
    prompts = [f"问题{i}: {word}" for i, word in enumerate(["春", "夏", "秋", "冬", "风", "雨"])]

    def one(i):
        kwargs = dict(model=MODEL_ID, messages=ask(prompts[i]), max_tokens=10, temperature=0)
        if i % 2:  # half of them streamed
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True,
                                                                                                    **kwargs))
        return client.chat.completions.create(**kwargs).choices[0].message.content

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(one, range(len(prompts))))
    assert answers == [reference(models[0], ask(p), 10, temperature=0)[0] for p in prompts]


def test_seeded_sampling_is_reproducible_under_concurrency(client):
    def sample(_):
        return client.chat.completions.create(model=MODEL_ID, messages=ask("讲个故事"), max_tokens=10,
                                              temperature=1.0, top_p=0.95, seed=11).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(sample, range(4)))
    assert len(set(answers)) == 1


def test_stop_sequences_cut_the_answer(client, models):
    full, *_ = reference(models[1], ask("The king"), 16, temperature=0)
    stop = full.strip()[2:4]  # somewhere inside the answer
    assert stop and stop in full
    expected = full[:full.index(stop)]
    for stream in (False, True):
        response = client.chat.completions.create(model="pretrain_64", messages=ask("The king"), max_tokens=16,
                                                  temperature=0, stop=[stop, "never-generated"], stream=stream)
        if stream:
            chunks = list(response)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            text, finish = response.choices[0].message.content, [response.choices[0].finish_reason]
        assert text == expected and finish == ["stop"]


def test_stop_filter_holds_back_partial_matches():
    stop_filter = server_module.StopFilter(["</s>", "END"])
    assert stop_filter.feed("hello <") == "hello "
    assert stop_filter.feed("/") == ""
    assert stop_filter.feed("b> E") == "</b> "
    assert stop_filter.feed("NDING") == ""
    assert stop_filter.stopped


def bad(**fields):
    """A request that is valid but for `fields`."""
    return {"model": MODEL_ID, "messages": ask("hi"), "max_tokens": 2, **fields}


# (name, body: a dict or the raw text, status, the field the error must name)
BAD_REQUESTS = [
    ("not json", "{bad", 400, None),
    ("empty body", "", 400, None),
    ("body is a list", "[]", 400, None),
    ("body is null", "null", 400, None),
    ("too deeply nested", "[" * 5000 + "]" * 5000, 400, None),
    ("integer too long to parse", '{"model": "%s", "max_tokens": %s}' % (MODEL_ID, "9" * 5000), 400, None),
    ("no messages", {"model": MODEL_ID}, 400, "messages"),
    ("empty messages", {"model": MODEL_ID, "messages": []}, 400, "messages"),
    ("messages not a list", bad(messages="hi"), 400, "messages"),
    ("message not an object", bad(messages=["hi"]), 400, "messages[0]"),
    ("no model", {"messages": ask("hi")}, 400, "model"),
    ("model not a string", bad(model=42), 400, "model"),
    ("bad role", bad(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
    ("no content", bad(messages=[{"role": "user"}]), 400, "messages[0].content"),
    ("content not text", bad(messages=[{"role": "user", "content": 42}]), 400, "messages[0].content"),
    ("content null", bad(messages=[{"role": "user", "content": None}]), 400, "messages[0].content"),
    ("image part", bad(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages[0].content[0].type"),
    ("lone surrogate", bad(messages=ask("\ud800")), 400, "messages[0].content"),
    ("temperature", bad(temperature=3), 400, "temperature"),
    ("temperature type", bad(temperature="hot"), 400, "temperature"),
    ("temperature string number", bad(temperature="0.5"), 400, "temperature"),
    ("temperature NaN", json.dumps(bad(temperature=float("nan"))), 400, "temperature"),
    ("temperature infinite", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}'
     % MODEL_ID, 400, "temperature"),
    ("top_p zero", bad(top_p=0), 400, "top_p"),
    ("top_p over one", bad(top_p=1.5), 400, "top_p"),
    ("top_k negative", bad(top_k=-1), 400, "top_k"),
    ("top_k float", bad(top_k=2.5), 400, "top_k"),
    ("repetition_penalty tiny", bad(repetition_penalty=1e-300), 400, "repetition_penalty"),
    ("max_tokens zero", bad(max_tokens=0), 400, "max_tokens"),
    ("max_tokens string", bad(max_tokens="5"), 400, "max_tokens"),
    ("max_tokens boolean", bad(max_tokens=True), 400, "max_tokens"),
    ("max_tokens over context", bad(max_tokens=10 ** 6), 400, "messages"),
    ("max_completion_tokens huge", bad(max_completion_tokens=2 ** 70), 400, "messages"),
    ("seed too large", bad(seed=2 ** 70), 400, "seed"),
    ("seed too large streamed", bad(seed=2 ** 70, stream=True), 400, "seed"),
    ("seed too small", bad(seed=-2 ** 63 - 1), 400, "seed"),
    ("seed string", bad(seed="7"), 400, "seed"),
    ("seed float", bad(seed=1.5), 400, "seed"),
    ("stream string", bad(stream="yes"), 400, "stream"),
    ("stream_options type", bad(stream=True, stream_options={"include_usage": "yes"}), 400,
     "stream_options.include_usage"),
    ("too many messages", {"model": MODEL_ID, "messages": ask("hi") * 9}, 400, "messages"),
    ("message too long", {"model": MODEL_ID, "messages": ask("长" * 2001)}, 400, "messages[0].content"),
    ("too many stops", bad(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop not text", bad(stop=[1]), 400, "stop[0]"),
    ("stop empty", bad(stop=""), 400, "stop"),
    ("stop too long", bad(stop=["x" * 65]), 400, "stop"),
    ("n", bad(n=2), 400, "n"),
    ("n zero", bad(n=0), 400, "n"),
    ("n huge", bad(n=2 ** 70), 400, "n"),
    ("presence_penalty", bad(presence_penalty=1), 400, "presence_penalty"),
    ("frequency_penalty", bad(frequency_penalty=1), 400, "frequency_penalty"),
    ("frequency_penalty out of range", bad(frequency_penalty=3), 400, "frequency_penalty"),
    ("logit_bias", bad(logit_bias={"5": 1}), 400, "logit_bias"),
    ("unknown model", {"model": "gpt-4", "messages": ask("hi")}, 404, "model"),
    ("assistant content null without tool_calls", bad(messages=[{"role": "assistant", "content": None}]), 400,
     "messages[0].content"),
    ("tool message without content", bad(messages=[*ask("hi"), {"role": "tool", "tool_call_id": "c"}]), 400,
     "messages[1].content"),
    ("tool_calls on a user message", bad(messages=[{"role": "user", "content": "hi", "tool_calls": [CALL]}]), 400,
     "messages[0].tool_calls"),
    ("tool call arguments not text", bad(messages=[*ask("hi"), {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]), 400,
     "messages[1].tool_calls[0].function.arguments"),
    ("tool call without a function", bad(messages=[*ask("hi"), {"role": "assistant", "tool_calls": [{"id": "c"}]}]),
     400, "messages[1].tool_calls[0].function"),
    ("tools not a list", bad(tools="get_weather"), 400, "tools"),
    ("tool not an object", bad(tools=["get_weather"]), 400, "tools[0]"),
    ("tool of another type", bad(tools=[{"type": "code_interpreter"}]), 400, "tools[0].type"),
    ("tool without a name", bad(tools=[{"type": "function", "function": {"parameters": {}}}]), 400,
     "tools[0].function.name"),
    ("tool parameters not an object", bad(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
     400, "tools[0].function.parameters"),
    ("tool nested too deeply", bad(tools=[{"type": "function", "function": {"name": "f", "parameters": json.loads(
        '{"a": ' * 100 + "{}" + "}" * 100)}}]), 400, "tools[0]"),
    ("tools on a pretrained model", bad(model="pretrain_64", tools=TOOLS), 400, "tools"),
    ("tool_choice required", bad(tools=TOOLS, tool_choice="required"), 400, "tool_choice"),
    ("tool_choice a named function", bad(tools=TOOLS, tool_choice={"type": "function",
                                                                  "function": {"name": "get_weather"}}), 400,
     "tool_choice"),
    ("tool_choice unknown", bad(tool_choice="sometimes"), 400, "tool_choice"),
    ("functions (deprecated)", bad(functions=[TOOLS[0]["function"]]), 400, "functions"),
    ("function_call (deprecated)", bad(function_call="auto"), 400, "function_call"),
    ("logprobs not a boolean", bad(logprobs="yes"), 400, "logprobs"),
    ("top_logprobs without logprobs", bad(top_logprobs=2), 400, "top_logprobs"),
    ("top_logprobs over 20", bad(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("response_format json_object", bad(response_format={"type": "json_object"}), 400, "response_format"),
    ("response_format json_schema", bad(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400,
     "response_format"),
    ("response_format without a type", bad(response_format={}), 400, "response_format.type"),
    ("body too large", {"model": MODEL_ID, "messages": ask("x" * 30_000)}, 413, None),
    ("body far too large", {"model": MODEL_ID, "messages": ask("x" * 200_000)}, 413, None),
]


@pytest.mark.parametrize("body,status,param", [case[1:] for case in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_4xx_and_a_json_error_naming_the_field(server, server_log, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server.url + "/v1/chat/completions", content=content,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param, error
    assert "Traceback" not in response.text + server_log()


@pytest.mark.parametrize("body", [bad(temperature=1e-300), bad(temperature=2, top_p=1e-300, top_k=10_000),
                                  bad(top_k=0, top_p=1), bad(repetition_penalty=0.01), bad(repetition_penalty=10),
                                  bad(seed=2 ** 64 - 1), bad(seed=-2 ** 63), bad(max_tokens=1, stop="x" * 64),
                                  bad(stream=True, seed=-1, temperature=1e-300)],
                         ids=["temperature tiny", "temperature 2, top_p tiny", "top_k 0", "repetition_penalty 0.01",
                              "repetition_penalty 10", "seed largest", "seed smallest", "max_tokens 1",
                              "streamed temperature tiny"])
def test_extreme_valid_values_are_answered(server, server_log, body):
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    if body.get("stream"):
        assert "error" not in response.text and response.text.rstrip().endswith("data: [DONE]")
    else:
        assert response.json()["choices"][0]["message"]["role"] == "assistant"
    assert "Traceback" not in server_log() and "generation failed" not in server_log()


def test_chunked_body_over_the_limit_is_413_like_a_sized_one(server):
    def chunked(body):  # an iterator makes httpx send the body chunked, without a Content-Length
        payload = json.dumps(body).encode()
        return iter([payload[i:i + 4096] for i in range(0, len(payload), 4096)])

    for size in (30_000, 200_000):
        response = httpx.post(server.url + "/v1/chat/completions", content=chunked(bad(messages=ask("x" * size))),
                              headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    response = httpx.post(server.url + "/v1/chat/completions", content=chunked(bad(messages=ask("y" * 1500))),
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 2


def test_body_that_never_arrives_gets_408(models):
    running = RunningServer(server_module.create_app(models, server_module.Limits(body_timeout=1)))
    try:
        connection = socket.create_connection(("127.0.0.1", running.port), timeout=15)
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json"
                           b"\r\nContent-Length: 100\r\n\r\n{\"model\": ")  # and then nothing
        started = time.time()
        reply = read_until(connection, b"}}")
        assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply and time.time() - started < 10
        connection.close()
        assert httpx.post(running.url + "/v1/chat/completions", json=bad(), timeout=30).status_code == 200
    finally:
        running.stop()


def test_context_length_error_names_its_code(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_ID, messages=ask("hi"), max_tokens=10 ** 6)
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=ask("hi"))


def test_unknown_routes_and_methods_are_json_errors(server):
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        response = httpx.request(method, server.url + path, timeout=10)
        assert response.status_code == status and "error" in response.json()


# ============================================================================================ tool calling


def test_request_tools_render_like_minimind_sft_data(models):
    """A model trained on MiniMind's tool data (schemas in the system message's "functions", tool_calls with
    object arguments, tool replies) must see the same prompt text from an OpenAI request carrying the same
    conversation as `tools`, `content: null` + `tool_calls` and a `tool` message."""
    from model.data.chat import encode_prompt
    sft = [{"role": "system", "content": "You can call tools.", "functions": TOOLS}, *ask("Weather in Paris?"),
           {"role": "assistant", "content": "", "tool_calls": [
               {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
           {"role": "tool", "content": "sunny"}]
    request = server_module.ChatCompletionRequest.model_validate({
        "model": MODEL_ID, "tools": TOOLS, "messages": [
            {"role": "system", "content": "You can call tools."}, *ask("Weather in Paris?"),
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]})
    prepared = server_module.Server(models, server_module.Limits()).prepare(request)
    tokenizer = models[0].tokenizer
    assert tokenizer(prepared.jobs[0].prompt, add_special_tokens=False)["input_ids"] == encode_prompt(tokenizer, sft)
    prompt = prepared.jobs[0].prompt
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) in prompt and "<|im_start|>tool\nsunny" in prompt
    assert CALL_TEXT + "<|im_end|>" in prompt and prepared.tools


def read_tool_stream(chunks) -> tuple[str, list[dict], list[str]]:
    """(content, tool calls, finish reasons) accumulated from streamed chunks as OpenAI's delta format says."""
    content, calls, finish = "", {}, []
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "type": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["type"] += delta.type or ""
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        if choice.finish_reason:
            finish.append(choice.finish_reason)
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
@pytest.mark.parametrize("before", ["", "Let me check.\n"], ids=["call only", "text then call"])
def test_tool_call_comes_back_as_tool_calls(client, models, stream, before):
    with ForcedText(models[0], before + CALL_TEXT):
        response = client.chat.completions.create(model=MODEL_ID, messages=ask("Weather in Paris?"), tools=TOOLS,
                                                  max_tokens=64, stream=stream)
        if stream:
            content, calls, finish = read_tool_stream(response)
        else:
            message = response.choices[0].message
            content, finish = message.content, [response.choices[0].finish_reason]
            calls = [{"id": c.id, "type": c.type, "name": c.function.name, "arguments": c.function.arguments}
                     for c in message.tool_calls]
    assert finish == ["tool_calls"] and len(calls) == 1
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function" and calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert content == (before.strip() or ("" if stream else None))  # no text besides the call: null


def test_tool_result_follow_up(client, models):
    first = client.chat.completions.create(model=MODEL_ID, messages=ask("Weather in Paris?"), tools=TOOLS,
                                           max_tokens=4)  # a random model's answer: text, no call
    with ForcedText(models[0], CALL_TEXT):
        called = client.chat.completions.create(model=MODEL_ID, messages=ask("Weather in Paris?"), tools=TOOLS,
                                                max_tokens=64).choices[0].message
    history = [*ask("Weather in Paris?"), called.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": called.tool_calls[0].id, "content": "sunny, 21°C"}]
    with ForcedText(models[0], "It is sunny."):
        answer = client.chat.completions.create(model=MODEL_ID, messages=history, tools=TOOLS, max_tokens=16)
    assert answer.choices[0].message.content == "It is sunny." and answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.tool_calls is None and first.choices[0].message.role == "assistant"
    request = server_module.ChatCompletionRequest.model_validate({"model": MODEL_ID, "messages": history,
                                                                  "tools": TOOLS})
    prompt = server_module.Server(models, server_module.Limits()).prepare(request).jobs[0].prompt
    assert prompt.endswith("<|im_start|>assistant\n" + CALL_TEXT + "<|im_end|>\n<|im_start|>tool\nsunny, 21°C"
                           "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("text", ['<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>',
                                  "<tool_call>\n[1, 2]\n</tool_call> ok", '<tool_call>\n{"name": "get_weather"'],
                         ids=["not JSON", "not a call", "cut off"])
def test_a_block_that_is_not_a_call_stays_text(client, models, text):
    for stream in (False, True):
        with ForcedText(models[0], text):
            response = client.chat.completions.create(model=MODEL_ID, messages=ask("hi"), tools=TOOLS,
                                                      max_tokens=64, stream=stream)
            if stream:
                content, calls, finish = read_tool_stream(response)
            else:
                message = response.choices[0].message
                content, calls, finish = message.content, message.tool_calls or [], [response.choices[0].finish_reason]
        assert content == text and calls == [] and finish == ["stop"]


def test_tool_choice_none_leaves_tools_out_and_calls_unparsed(client, models):
    request = server_module.ChatCompletionRequest.model_validate(bad(tools=TOOLS, tool_choice="none"))
    prepared = server_module.Server(models, server_module.Limits()).prepare(request)
    assert "<tools>" not in prepared.jobs[0].prompt and not prepared.tools
    with ForcedText(models[0], CALL_TEXT):
        response = client.chat.completions.create(model=MODEL_ID, messages=ask("hi"), tools=TOOLS,
                                                  tool_choice="none", max_tokens=64)
    assert response.choices[0].message.content == CALL_TEXT and response.choices[0].finish_reason == "stop"


def test_several_calls_and_parallel_tool_calls_false(client, models):
    second = CALL_TEXT.replace("Paris", "Rome")
    for parallel, expected in ((None, ["Paris", "Rome"]), (False, ["Paris"])):
        extra = {} if parallel is None else {"parallel_tool_calls": parallel}
        with ForcedText(models[0], CALL_TEXT + "\n" + second):
            message = client.chat.completions.create(model=MODEL_ID, messages=ask("Paris and Rome?"), tools=TOOLS,
                                                     max_tokens=80, **extra).choices[0].message
        assert [json.loads(c.function.arguments)["city"] for c in message.tool_calls] == expected
        assert message.content is None and len({c.id for c in message.tool_calls}) == len(expected)


def test_tool_call_parser_is_the_same_piece_by_piece():
    text = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{"name": "g"}' \
           '\n</tool_call>\nDone. <tool_call>bad</tool_call>  \n'
    whole = server_module.ToolCallParser()
    events = whole.feed(text) + whole.finish()
    pieces = server_module.ToolCallParser()
    events_by_char = [event for char in text for event in pieces.feed(char)] + pieces.finish()

    def plain(events):  # ids are random: compare the rest; adjacent texts joined
        out = []
        for kind, value in events:
            if kind == "text" and out and out[-1][0] == "text":
                out[-1] = ("text", out[-1][1] + value)
            else:
                out.append((kind, value["function"] if kind == "call" else value))
        return out

    assert plain(events) == plain(events_by_char) == [
        ("text", "Sure."), ("call", {"name": "f", "arguments": '{"a": 1}'}), ("call", {"name": "g", "arguments": "{}"}),
        ("text", "Done. <tool_call>bad</tool_call>")]
    no_calls = server_module.ToolCallParser()
    assert "".join(v for _, v in no_calls.feed("a <tool") + no_calls.feed("x>  \n") + no_calls.finish()) == \
        "a <toolx>  \n"  # without calls the text is exactly what the model wrote


def test_langchain_bind_tools_round_trip(server, models):
    """What LangChain users do: ChatOpenAI(...).bind_tools([...]), invoke and stream, then the tool's result."""
    langchain_openai = pytest.importorskip(
        "langchain_openai", reason="langchain-openai is not installed (pip install langchain-openai): the LangChain "
                                   "tool-calling round trip is not checked")
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    llm = langchain_openai.ChatOpenAI(model=MODEL_ID, base_url=server.url + "/v1", api_key="unused", max_retries=0,
                                      temperature=0, max_tokens=64, timeout=60)
    bound = llm.bind_tools([get_weather])
    with ForcedText(models[0], CALL_TEXT):
        message = bound.invoke("Weather in Paris?")
        streamed = None
        for chunk in bound.stream("Weather in Paris?"):
            streamed = chunk if streamed is None else streamed + chunk
    for answer in (message, streamed):
        assert [(c["name"], c["args"]) for c in answer.tool_calls] == [("get_weather", {"city": "Paris"})]
        assert answer.response_metadata["finish_reason"] == "tool_calls"
    result = get_weather.invoke(message.tool_calls[0])  # a ToolMessage with the call's id
    with ForcedText(models[0], "It is sunny."):
        final = bound.invoke([HumanMessage("Weather in Paris?"), message, result])
    assert final.content == "It is sunny." and final.tool_calls == []


# ============================================================================================ completions


def reference_ids(loaded: LoadedModel, prompt: str, max_tokens: int, **sampling) -> tuple[list[int], list[int]]:
    """(prompt ids, generated ids) for a prompt text, computed without the server."""
    ids = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    config = default_generation_config(loaded.tokenizer, max_new_tokens=max_tokens, **sampling)
    with torch.no_grad():
        out = loaded.model.generate(ids, generation_config=config)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()


def test_completions_continue_the_prompt_after_bos(client, models):
    for loaded in models:
        response = client.completions.create(model=loaded.name, prompt=["The king", "床前明月光"], max_tokens=8,
                                             temperature=0)
        assert [c.index for c in response.choices] == [0, 1] and response.object == "text_completion"
        prompt_tokens = completion_tokens = 0
        for choice, prompt in zip(response.choices, ["The king", "床前明月光"]):
            ids, new = reference_ids(loaded, "<|im_start|>" + prompt, 8, temperature=0)
            assert choice.text == loaded.tokenizer.decode(new, skip_special_tokens=True)
            assert choice.finish_reason == ("stop" if new[-1] == 2 else "length")
            prompt_tokens, completion_tokens = prompt_tokens + len(ids), completion_tokens + len(new)
        assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    templated = client.completions.create(model=MODEL_ID, prompt="<|im_start|>user\nhi<|im_end|>\n", max_tokens=2)
    assert templated.usage.prompt_tokens == len(models[0].tokenizer("<|im_start|>user\nhi<|im_end|>\n")["input_ids"])


def test_streamed_completions_equal_the_answer(client):
    kwargs = dict(model="pretrain_64", prompt=["The king", "To be"], max_tokens=12, temperature=0)
    answer = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    for index, choice in enumerate(answer.choices):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_completion_default_length_stop_and_seed(client, models):
    assert client.completions.create(model="pretrain_64", prompt="The king").usage.completion_tokens <= 16
    full = client.completions.create(model="pretrain_64", prompt="The king", max_tokens=16, temperature=0)
    stop = full.choices[0].text.strip()[2:4]
    cut = client.completions.create(model="pretrain_64", prompt="The king", max_tokens=16, temperature=0, stop=stop)
    assert cut.choices[0].text == full.choices[0].text[:full.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=MODEL_ID, prompt=["a", "b", "a"], max_tokens=8, temperature=1,
                                         seed=5).choices for _ in range(2)]
    assert [c.text for c in sampled[0]] == [c.text for c in sampled[1]]
    assert sampled[0][0].text == sampled[0][2].text  # the seed is set before every prompt of the list


def completion(**fields):
    """A completion request that is valid but for `fields`."""
    return {"model": MODEL_ID, "prompt": "hi", "max_tokens": 2, **fields}


BAD_COMPLETIONS = [
    ("no prompt", {"model": MODEL_ID}, 400, "prompt"),
    ("prompt not text", completion(prompt=42), 400, "prompt"),
    ("token ids", completion(prompt=[1, 2, 3]), 400, "prompt[0]"),
    ("empty list", completion(prompt=[]), 400, "prompt"),
    ("too many prompts", completion(prompt=["a"] * 9), 400, "prompt"),
    ("prompt too long", completion(prompt=["ok", "x" * 2001]), 400, "prompt[1]"),
    ("lone surrogate", completion(prompt="\ud800"), 400, "prompt"),
    ("echo", completion(echo=True), 400, "echo"),
    ("suffix", completion(suffix="end"), 400, "suffix"),
    ("best_of", completion(best_of=2), 400, "best_of"),
    ("n", completion(n=2), 400, "n"),
    ("logprobs over 20", completion(logprobs=21), 400, "logprobs"),
    ("logprobs boolean", completion(logprobs=True), 400, "logprobs"),
    ("max_tokens zero", completion(max_tokens=0), 400, "max_tokens"),
    ("max_tokens over context", completion(max_tokens=10 ** 6), 400, "prompt"),
    ("temperature", completion(temperature=3), 400, "temperature"),
    ("stop empty", completion(stop=""), 400, "stop"),
    ("presence_penalty", completion(presence_penalty=1), 400, "presence_penalty"),
    ("unknown model", completion(model="gpt-4"), 404, "model"),
    ("body too large", completion(prompt="x" * 30_000), 413, None),
]


@pytest.mark.parametrize("body,status,param", [c[1:] for c in BAD_COMPLETIONS], ids=[c[0] for c in BAD_COMPLETIONS])
def test_bad_completion_requests_get_4xx_naming_the_field(server, server_log, body, status, param):
    response = httpx.post(server.url + "/v1/completions", content=json.dumps(body),  # json.dumps: ASCII escapes
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param, error
    assert "Traceback" not in response.text + server_log()


# ============================================================================================ logprobs


def expected_logprobs(loaded: LoadedModel, prompt: str, max_tokens: int, top: int) -> list[tuple]:
    """(token bytes, logprob, top ids) of each generated token, from one forward pass over prompt + answer: the
    model's own distribution, whatever the sampling settings."""
    ids, new = reference_ids(loaded, prompt, max_tokens, temperature=0)
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids + new])).logits[0, len(ids) - 1:-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    streamer = server_module.TokenStreamer(loaded.tokenizer)
    return [(streamer.token_bytes(t), logprobs[i, t].item(), logprobs[i].topk(top).indices.tolist())
            for i, t in enumerate(new) if t != loaded.tokenizer.eos_token_id]


def test_chat_logprobs_are_the_models_own_distribution(client, models):
    prompt = build_prompt(models[0].tokenizer, ask("写一首诗"), "chat")
    expected = expected_logprobs(models[0], prompt, 12, 3)
    kwargs = dict(model=MODEL_ID, messages=ask("写一首诗"), max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    answer = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    for entries in (answer.logprobs.content, streamed):
        assert [bytes(e.bytes) for e in entries] == [b for b, _, _ in expected]
        assert all(abs(e.logprob - lp) < 1e-4 for e, (_, lp, _) in zip(entries, expected))
        assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[2].logprob
                   for e in entries)
    assert b"".join(bytes(e.bytes) for e in answer.logprobs.content).decode("utf-8", "replace") == \
        answer.message.content
    assert client.chat.completions.create(model=MODEL_ID, messages=ask("hi"), max_tokens=2).choices[0].logprobs is None


def test_completion_logprobs_and_stop_cut_them_too(client, models):
    expected = expected_logprobs(models[1], "<|im_start|>The king", 16, 2)
    answer = client.completions.create(model="pretrain_64", prompt="The king", max_tokens=16, temperature=0,
                                       logprobs=2).choices[0]
    logprobs = answer.logprobs
    assert len(logprobs.tokens) == len(expected) and all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert all(abs(a - lp) < 1e-4 for a, (_, lp, _) in zip(logprobs.token_logprobs, expected))
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    stop = answer.text.strip()[2:4]
    cut = client.completions.create(model="pretrain_64", prompt="The king", max_tokens=16, temperature=0,
                                    logprobs=0, stop=stop).choices[0]
    spelled = b"".join(b for b, _, _ in expected[:len(cut.logprobs.tokens)]).decode("utf-8", "replace")
    assert spelled.startswith(cut.text) and len(cut.logprobs.tokens) < len(expected)  # up to the stop sequence
    assert cut.logprobs.top_logprobs is None


@pytest.mark.parametrize("response_format", [None, {"type": "text"}])
def test_response_format_text_is_accepted(client, response_format):
    extra = {} if response_format is None else {"response_format": response_format}
    assert client.chat.completions.create(model=MODEL_ID, messages=ask("hi"), max_tokens=2, **extra).choices


class BrokenGeneration:
    """Replaces ServedGeneration: fails before the first token, as torch.manual_seed did on a seed out of range."""

    def __init__(self, *args):
        raise RuntimeError("the generation could not start")


@pytest.mark.parametrize("where", ["start", "decode"])
def test_generation_failure_is_an_error_event_then_done_or_a_500(server, client, models, server_log, monkeypatch,
                                                                  where):
    def fail_at_the_third_step(module, inputs, output):
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("a decode step failed")

    steps, handle = [], None
    if where == "start":
        monkeypatch.setattr(server_module, "ServedGeneration", BrokenGeneration)
    else:
        handle = models[0].model.register_forward_hook(fail_at_the_third_step)
    try:
        body = bad(max_tokens=50, stream=True)
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line]
        assert events[-1] == "data: [DONE]", events
        error = json.loads(events[-2][len("data: "):])["error"]
        assert error["type"] == "server_error" and error["message"] == "generation failed"
        steps.clear()
        with pytest.raises(openai.APIError, match="generation failed"):  # how the openai client reports it
            list(client.chat.completions.create(**body))
        steps.clear()
        response = httpx.post(server.url + "/v1/chat/completions", json=bad(max_tokens=50), timeout=30)
        assert response.status_code == 500 and response.json()["error"]["message"] == "generation failed"
        for stream in (True, False):
            steps.clear()
            response = httpx.post(server.url + "/v1/completions", json=completion(max_tokens=50, stream=stream),
                                  timeout=30)
            if stream:
                events = [line for line in response.text.splitlines() if line]
                assert response.status_code == 200 and events[-1] == "data: [DONE]"
                assert json.loads(events[-2][len("data: "):])["error"]["message"] == "generation failed"
            else:
                assert response.status_code == 500 and response.json()["error"]["message"] == "generation failed"
    finally:
        if handle is not None:
            handle.remove()
    log = server_log()
    assert "generation failed for chatcmpl-" in log and "generation failed for cmpl-" in log and "Traceback" not in log
    monkeypatch.undo()
    assert client.chat.completions.create(model=MODEL_ID, messages=ask("hi"), max_tokens=2).choices  # still serving


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_client_that_disconnects_stops_its_generation(server, client, models, stream, endpoint):
    body = (bad(messages=ask("long"), max_tokens=20_000, stream=stream) if endpoint == "chat"
            else completion(prompt="long", max_tokens=20_000, stream=stream))
    with DecodeSteps(models[0]) as steps:
        connection = open_request(server.url, body)
        wait_until(lambda: steps.count > 20, "the generation did not start")
        connection.close()
        stopped = steps.wait_until_stopped()  # fails if it keeps generating for nobody
        assert stopped < 5_000
        wait_until(lambda: health(server.url)["waiting"] == 0 and not server.app.state.server.lock.locked(),
                   "the model is still locked", timeout=5)
        started = time.time()
        answer = client.chat.completions.create(model=MODEL_ID, messages=ask("hi"), max_tokens=4)
        assert time.time() - started < 5, "the abandoned generation delayed the next request"
        assert answer.usage.completion_tokens == 4 and steps.count - stopped <= 4  # only the new request's steps
    assert server.app.state.server.active == 0


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_client_that_disconnects_while_waiting_leaves_the_line(server, models, endpoint):
    with DecodeSteps(models[0]):
        holder = open_request(server.url, bad(max_tokens=20_000, stream=True))
        read_until(holder, b"data: ")  # generating, the model locked
        waiting = open_request(server.url, bad(max_tokens=2) if endpoint == "chat" else completion())
        wait_until(lambda: health(server.url)["waiting"] == 1, "the second request is not waiting")
        waiting.close()
        wait_until(lambda: health(server.url)["waiting"] == 0, "the client that left is still in line", timeout=5)
        wait_until(lambda: health(server.url)["active"] == 1, "its place was not freed", timeout=5)  # the holder's
        holder.close()
        wait_until(lambda: server.app.state.server.active == 0, "the holder's place was not freed", timeout=5)


def test_queue_limit_answers_503_and_frees_places(models):
    app_server = server_module.Server(models, server_module.Limits(max_queue=2))
    tickets = [app_server.admit() for _ in range(3)]  # one generating, two waiting
    with pytest.raises(server_module.APIError) as caught:
        app_server.admit()
    assert caught.value.status == 503 and caught.value.code == "server_busy"
    tickets[0].release()
    tickets[0].release()  # twice is once
    tickets.append(app_server.admit())
    assert app_server.active == 3
    with pytest.raises(server_module.APIError):
        app_server.admit()


def test_queue_limit_is_exact_under_a_burst(models):
    """One request generating, max_queue waiting: of a burst of max_queue + extra more, exactly extra get 503."""
    max_queue, extra = 3, 6
    burst = max_queue + extra
    running = RunningServer(server_module.create_app(models, server_module.Limits(max_queue=max_queue)))
    replies = [b""] * burst

    def read_reply(i, connection):
        while piece := connection.recv(65536):
            replies[i] += piece

    try:
        with DecodeSteps(models[0]):
            holder = open_request(running.url, bad(max_tokens=20_000, stream=True))
            read_until(holder, b"data: ")  # generating, the model locked
            connections = [connect(running.url) for _ in range(burst)]
            # Mostly streams (a stream used to join the line only after its 200 header was on the way), some of them
            # completions, sent back to back so that the server reads them all at once.
            for i, connection in enumerate(connections):
                connection.sendall(request_bytes(completion(stream=True) if i % 4 == 1 else bad(stream=i % 3 != 0)))
            readers = [threading.Thread(target=read_reply, args=(i, c)) for i, c in enumerate(connections)]
            for reader in readers:
                reader.start()

            def refused():
                return sum(reply.startswith(b"HTTP/1.1 503") for reply in replies)

            wait_until(lambda: refused() + health(running.url)["waiting"] == burst,
                       "the burst was not all refused or in line")
            assert refused() == extra
            holder.close()
            for reader in readers:
                reader.join(timeout=60)
        for reply in replies:
            if reply.startswith(b"HTTP/1.1 503"):
                assert b'"code":"server_busy"' in reply
            else:
                assert reply.startswith(b"HTTP/1.1 200") and (b"data: [DONE]" in reply or b'"choices"' in reply)
        wait_until(lambda: running.app.state.server.active == 0, "places were not all freed", timeout=5)
    finally:
        running.stop()


def test_api_key_is_required_when_set(models):
    running = RunningServer(server_module.create_app(models, api_key="sk-test"))
    try:
        body = {"model": MODEL_ID, "messages": ask("hi"), "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
            response = httpx.post(running.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(running.url + "/v1/models", timeout=10).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=running.url + "/v1", api_key="sk-test", max_retries=0, timeout=60)
        assert good.chat.completions.create(model=MODEL_ID, messages=ask("hi"), max_tokens=2).choices
        assert httpx.get(running.url + "/", timeout=10).status_code == 200  # the page itself is public
    finally:
        running.stop()


def test_chat_page_is_served(server):
    response = httpx.get(server.url + "/", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "/v1/chat/completions" in page and "/v1/models" in page and "getReader" in page and "[DONE]" in page


@pytest.mark.slow
def test_command_line_server(tmp_path, models):
    out = tmp_path / "out"
    save_weights(models[0].model, str(out / "full_sft_64.pth"))
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "scripts.serve_openai_api", "--save_dir", str(out),
                                "--tokenizer_path", TOKENIZER, "--port", str(port), "--device", "cpu"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        deadline = time.time() + 120
        while True:
            try:
                assert [m.id for m in client.models.list().data] == ["full_sft_64"]
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.time() < deadline, process.stdout.read()
                time.sleep(0.5)
        answer = client.chat.completions.create(model="full_sft_64", messages=ask("hi"), max_tokens=3)
        assert answer.usage.completion_tokens <= 3
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_web_demo_loads_every_checkpoint_and_the_page(tmp_path, models, monkeypatch):
    out = tmp_path / "out"
    save_weights(models[0].model, str(out / "full_sft_64.pth"))
    save_weights(models[1].model, str(out / "pretrain_64.pth"))
    torch.save({}, out / "full_sft_64_resume.pth")  # resume checkpoints are not servable models
    captured = {}
    monkeypatch.setattr(web_demo, "serve", lambda args: captured.update(vars(args)))
    web_demo.main(["--save_dir", str(out), "--tokenizer_path", TOKENIZER])
    assert captured["weight"] == ["all"] and captured["web_ui"] == 1 and captured["host"] == "127.0.0.1"
    loaded = server_module.load_models(argparse.Namespace(**captured))
    assert [(m.name, m.mode) for m in loaded] == [("full_sft_64", "chat"), ("pretrain_64", "continue")]
