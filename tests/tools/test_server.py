"""scripts/serve_openai_api.py on a free 127.0.0.1 port, called with the official openai client: streamed and not,
concurrent clients that must not mix, stop sequences, usage, API keys, malformed requests (4xx + JSON naming the
field, never a traceback), body limits (413 chunked or not, 408 for a body that never ends), generation failures
(a 500, or an error event and [DONE] in a stream), clients that disconnect (the generation stops, the place in
line is freed), an exact --max_queue under a burst, and the chat page."""
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


def wait_until(condition, what, timeout=20.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.02)


def connect(url: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30)


def request_bytes(body: dict) -> bytes:
    """A whole POST; the server closes the connection after answering it."""
    payload = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
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
    ("unknown model", {"model": "gpt-4", "messages": ask("hi")}, 404, "model"),
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


class BrokenGeneration:
    """Replaces GenerationStream: fails before the first token, as torch.manual_seed did on a seed out of range."""

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
        monkeypatch.setattr(server_module, "GenerationStream", BrokenGeneration)
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
    finally:
        if handle is not None:
            handle.remove()
    log = server_log()
    assert "generation failed for chatcmpl-" in log and "Traceback" not in log
    monkeypatch.undo()
    assert client.chat.completions.create(model=MODEL_ID, messages=ask("hi"), max_tokens=2).choices  # still serving


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_client_that_disconnects_stops_its_generation(server, client, models, stream):
    body = bad(messages=ask("long"), max_tokens=20_000, stream=stream)
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


def test_client_that_disconnects_while_waiting_leaves_the_line(server, models):
    with DecodeSteps(models[0]):
        holder = open_request(server.url, bad(max_tokens=20_000, stream=True))
        read_until(holder, b"data: ")  # generating, the model locked
        waiting = open_request(server.url, bad(max_tokens=2))
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
            # Mostly streams (a stream used to join the line only after its 200 header was on the way), sent back to
            # back so that the server reads them all at once.
            for i, connection in enumerate(connections):
                connection.sendall(request_bytes(bad(stream=i % 3 != 0)))
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
