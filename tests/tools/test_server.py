"""scripts/serve_openai_api.py on a free 127.0.0.1 port, called with the official openai client: streamed and not,
concurrent clients that must not mix, stop sequences, usage, API keys, malformed requests (4xx + JSON, never a
traceback), a client that disconnects mid-stream, and the chat page."""
import argparse
import json
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


BAD_REQUESTS = [
    ("not json", "{bad", 400),
    ("no messages", {"model": MODEL_ID}, 400),
    ("empty messages", {"model": MODEL_ID, "messages": []}, 400),
    ("no model", {"messages": ask("hi")}, 400),
    ("bad role", {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("content not text", {"model": MODEL_ID, "messages": [{"role": "user", "content": 42}]}, 400),
    ("image part", {"model": MODEL_ID, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
    ("temperature", {"model": MODEL_ID, "messages": ask("hi"), "temperature": 3}, 400),
    ("temperature type", {"model": MODEL_ID, "messages": ask("hi"), "temperature": "hot"}, 400),
    ("top_p zero", {"model": MODEL_ID, "messages": ask("hi"), "top_p": 0}, 400),
    ("max_tokens zero", {"model": MODEL_ID, "messages": ask("hi"), "max_tokens": 0}, 400),
    ("max_tokens over context", {"model": MODEL_ID, "messages": ask("hi"), "max_tokens": 10 ** 6}, 400),
    ("too many messages", {"model": MODEL_ID, "messages": ask("hi") * 9}, 400),
    ("message too long", {"model": MODEL_ID, "messages": ask("长" * 2001)}, 400),
    ("too many stops", {"model": MODEL_ID, "messages": ask("hi"), "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("n", {"model": MODEL_ID, "messages": ask("hi"), "n": 2}, 400),
    ("unknown model", {"model": "gpt-4", "messages": ask("hi")}, 404),
    ("body too large", {"model": MODEL_ID, "messages": ask("x" * 30_000)}, 413),
]


@pytest.mark.parametrize("body,status", [(b, s) for _, b, s in BAD_REQUESTS], ids=[n for n, _, _ in BAD_REQUESTS])
def test_bad_requests_get_4xx_and_a_json_error(server, body, status):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(server.url + "/v1/chat/completions", content=content,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and "Traceback" not in response.text


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


def test_client_that_disconnects_frees_the_model(server, client):
    body = {"model": MODEL_ID, "messages": ask("long"), "max_tokens": 20_000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        next(response.iter_lines())  # the first event arrives, then we hang up
    started = time.time()
    client.chat.completions.create(model=MODEL_ID, messages=ask("hi"), max_tokens=4)
    assert time.time() - started < 20, "the abandoned generation kept the lock"


def test_queue_limit_answers_503(models):
    app_server = server_module.Server(models, server_module.Limits(max_queue=2))
    app_server.waiting = 2
    with pytest.raises(server_module.APIError) as caught:
        app_server.admit()
    assert caught.value.status == 503


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
